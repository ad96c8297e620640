"""Endurance, in the spirit of LINBIT's drbd9-tests: fio randrw all over a resource four times
the activity log's span while the secondary is killed, stopped and cut off again and again.

alpha is Primary, beta Secondary; al_extents = 16 (16 x 4 MiB = 64 MiB hot) on a 256 MiB
resource. fio (randrw, 4k and 64k, iodepth 16, time_based) writes over [0, 224 MiB) of alpha's
export while two AckedWriters (4k and 64k writes) write [224, 256 MiB) and record what was
acknowledged. Meanwhile a schedule of disruptions runs, round robin:

    kill         SIGKILL beta, keep it down, `up` it again: a bitmap resync under load
    term         SIGTERM beta (a clean stop), keep it down, `up` it again
    cut          drop the replication ports (nftables) for longer than peer_timeout_s (2 s),
                 restore them: the nodes reconnect by themselves and resync
    kill-resync  like kill, but beta is killed again as soon as its resync has started, then
                 brought back (an interrupted resync must resume, not lose bits)
    cut-resync   like cut, the link cut again as soon as the resync after a cut has started

After each disruption but the interrupted ones the test waits until both nodes are in sync
again (while fio goes on writing) and records how long that took. At the end: fio saw no
error (the Primary went on alone), both backing files are byte-identical after the last
resync, no acknowledged write of the AckedWriters is missing on either disk, every
reconnection was a bitmap resync (never a full sync), and alpha's log shows one finished
resync per reconnection.

RBLOCK_ENDURANCE_S sets how long fio runs (default 40 s: the short version in `make test`,
about 60 s of wall time); e.g. RBLOCK_ENDURANCE_S=600 for ten minutes. RBLOCK_ENDURANCE_SEED
fixes the random down times (the seed is printed either way).
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field

import pytest

from rblock.control_client import in_sync
from tests.test_replication_failures import (
    BLOCK,
    AckedWriter,
    LinkCut,
    MiB,
    check_region,
    fast_res,
    fio_job,
    fio_result,
    needs_fio,
    nft_usable,
    read_file_range,
)

DISK = 256 * MiB
FIO_BYTES = 224 * MiB  # fio: [0, 224 MiB); the AckedWriters: [224, 256 MiB)
W4K_FIRST, W4K_BLOCKS = FIO_BYTES // BLOCK, 16 * MiB // BLOCK
W64K_FIRST, W64K_BLOCKS = W4K_FIRST + W4K_BLOCKS, 16 * MiB // BLOCK
AL_EXTENTS = 16
PEER_TIMEOUT_S = 2.0  # tests/cluster.py's config
DURATION_S = float(os.environ.get("RBLOCK_ENDURANCE_S", "40"))
RESYNC_TIMEOUT_S = 120.0
KINDS = ("kill", "term", "cut", "kill-resync", "cut-resync")


@dataclass
class Disruption:
    kind: str
    at_s: float  # since fio started
    down_s: float = 0.0  # beta down / the link cut (the last time, for the -resync kinds)
    oos_bytes: int = 0  # out of sync on alpha just before beta came back / the link healed
    interrupted: bool = False  # -resync kinds: the second disruption hit a running resync
    reconnect_s: float = 0.0  # from `up` / restore to Connected (last reconnection)
    resync_s: float = 0.0  # from `up` / restore to both nodes in sync (last reconnection)
    resync_sent: int = 0  # alpha's resync_sent_bytes of the last resync

    def line(self) -> str:
        return (f"{self.at_s:6.1f}s {self.kind:<11} down {self.down_s:4.1f}s, "
                f"{self.oos_bytes / MiB:6.1f} MiB out of sync, reconnect {self.reconnect_s:4.1f}s, "
                f"in sync after {self.resync_s:4.1f}s, {self.resync_sent / MiB:6.1f} MiB resynced"
                + (" (interrupted a running resync)" if self.interrupted else ""))


@dataclass
class Endurance:
    c: object
    cut: LinkCut
    rng: random.Random
    done: list[Disruption] = field(default_factory=list)
    reconnections: int = 0  # times beta came back / the link healed

    def alpha_peer(self) -> dict:
        return fast_res(self.c, "alpha")["peers"][0]

    def wait(self, cond, timeout_s: float, what: str) -> float:
        """Poll COND until true (Cluster.wait); the seconds it took."""
        t0 = time.monotonic()
        self.c.wait(cond, timeout_s, what)
        return time.monotonic() - t0

    def wait_disconnected(self) -> None:
        self.wait(lambda: self.alpha_peer()["connection"] != "Connected",
                  PEER_TIMEOUT_S + 10, "alpha notices beta is gone")

    def both_in_sync(self) -> bool:
        return in_sync(fast_res(self.c, "alpha")) and in_sync(fast_res(self.c, "beta"))

    def take_down(self, kind: str) -> float:
        """Disrupt (kill / term / cut) and stay down a random while; the down time."""
        t0 = time.monotonic()
        if kind == "kill":
            self.c.kill("beta")
        elif kind == "term":
            self.c.stop("beta")
        else:
            self.cut.cut()
        self.wait_disconnected()
        time.sleep(self.rng.uniform(0.5, 3.0))
        return time.monotonic() - t0

    def bring_back(self, kind: str, d: Disruption) -> float:
        """Undo take_down; returns the monotonic time it was undone."""
        d.oos_bytes = self.alpha_peer()["out_of_sync_bytes"]
        if kind == "cut":
            self.cut.restore()
            t = time.monotonic()
        else:
            t = time.monotonic()
            self.c.up("beta")
        self.reconnections += 1
        d.reconnect_s = self.wait(lambda: self.alpha_peer()["connection"] == "Connected",
                                  30, f"{d.kind}: reconnected")
        return t

    def run(self, kind: str, at_s: float) -> Disruption:
        d = Disruption(kind, at_s)
        base = "cut" if kind.startswith("cut") else ("term" if kind == "term" else "kill")
        if kind.endswith("-resync"):
            # The first disruption keeps beta away long enough for a resync worth catching.
            d.down_s = self.take_down(base) + self._sleep(2.0, 4.0)
            self.bring_back(base, d)
            self.wait(lambda: self.alpha_peer()["replication"] != "Off", 30,
                      f"{kind}: the resync starts")
            d.interrupted = self.alpha_peer()["replication"] == "SyncSource"
            d.down_s = self.take_down(base)
        else:
            d.down_s = self.take_down(base)
        back = self.bring_back(base, d)
        self.wait(self.both_in_sync, RESYNC_TIMEOUT_S, f"{kind}: both nodes in sync again")
        d.resync_s = time.monotonic() - back
        d.resync_sent = self.alpha_peer()["resync_sent_bytes"]
        self.done.append(d)
        return d

    def _sleep(self, lo: float, hi: float) -> float:
        s = self.rng.uniform(lo, hi)
        time.sleep(s)
        return s


def fio_randrw(c, workdir, runtime_s: int):
    return fio_job(c.nbd_uri("alpha"), workdir, "--rw=randrw", "--rwmixread=30",
                   "--bssplit=4k/80:64k/20", "--offset=0", f"--size={FIO_BYTES}",
                   "--time_based", f"--runtime={runtime_s}")


@pytest.mark.slow
@needs_fio
def test_endurance_secondary_restarts_and_link_cuts_under_fio(cluster, tmp_path):
    why = nft_usable()
    if why:
        pytest.skip(why)
    seed = int(os.environ.get("RBLOCK_ENDURANCE_SEED", str(int(time.time()))))
    print(f"\nseed {seed} (RBLOCK_ENDURANCE_SEED), fio for {DURATION_S:.0f}s "
          f"(RBLOCK_ENDURANCE_S)")
    c = cluster(size=f"{DISK // MiB}M", protocol="C",
                extra_resource=f"al_extents = {AL_EXTENTS}\n")
    t_setup = time.monotonic()
    c.start_fresh()
    print(f"initial full sync of {DISK // MiB} MiB: {time.monotonic() - t_setup:.1f}s")
    cut = LinkCut([c.ports["beta"]["replication"], c.ports["alpha"]["replication"]])
    e = Endurance(c, cut, random.Random(seed))

    writers = [AckedWriter(c.nbd_uri("alpha"), W4K_FIRST, W4K_BLOCKS, depth=4),
               AckedWriter(c.nbd_uri("alpha"), W64K_FIRST, W64K_BLOCKS, depth=4,
                           write_blocks=16)]
    fio = fio_randrw(c, tmp_path, int(DURATION_S))
    start = time.monotonic()
    for w in writers:
        w.start()
    # Leave the last disruption room to finish (resync included) while fio still writes.
    tail_s = 12.0
    try:
        try:
            time.sleep(2.0)
            i = 0
            while time.monotonic() - start < DURATION_S - tail_s and fio.poll() is None:
                d = e.run(KINDS[i % len(KINDS)], time.monotonic() - start)
                print(d.line())
                i += 1
                time.sleep(e.rng.uniform(0.5, 2.0))  # Established and writing for a while
        finally:
            cut.restore()
            if "beta" not in c.procs:
                c.up("beta")
        job = fio_result(fio, timeout_s=DURATION_S + 120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        for w in writers:
            w.stop(check=False)
    for w in writers:
        assert not w.thread.is_alive(), "AckedWriter: writes in flight did not finish"
        assert not w.errors and not w.failure, (w.errors[:5], w.failure)
    wall_s = time.monotonic() - start

    t_sync = time.monotonic()
    c.wait_synced(timeout_s=RESYNC_TIMEOUT_S)
    final_sync_s = time.monotonic() - t_sync
    assert c.files_identical(), (
        "alpha's and beta's disks differ after the resync; disruptions:\n"
        + "\n".join(d.line() for d in e.done)
        + f"\n{describe_difference(c)}\n--- alpha ---\n{c.log('alpha')[-4000:]}"
        f"\n--- beta ---\n{c.log('beta')[-4000:]}")
    for w in writers:
        for node in ("alpha", "beta"):
            check_region(w, read_file_range(c.disk(node), w.first_block * BLOCK,
                                            w.block_count * BLOCK))

    # The disruptions happened and each reconnection was a bitmap resync, never a full sync.
    counts = {k: sum(1 for d in e.done if d.kind == k) for k in KINDS}
    # (On a loaded 2-core machine the 40 s schedule fits four of the five kinds.)
    assert len(e.done) >= min(len(KINDS), 4) or DURATION_S < 40, counts
    assert all(counts[k] for k in KINDS[:min(len(KINDS), len(e.done))]), counts
    alog = c.log("alpha")
    finished = alog.count("resync to beta finished")
    full = len(re.findall(r"full sync, this node is the source", alog))
    bitmap = len(re.findall(r"bitmap resync, this node is the source", alog))
    assert full == 1, f"{full} full syncs in alpha's log (1 expected: the first one)"
    # every reconnection decided on a bitmap resync; all but the interrupted ones finished
    interrupted = sum(1 for d in e.done if d.interrupted)
    assert bitmap >= e.reconnections, (bitmap, e.reconnections)
    assert finished >= 1 + e.reconnections - interrupted, (finished, e.reconnections,
                                                           interrupted)
    assert "protocol error" not in alog + c.log("beta")

    wr, rd = job["write"], job["read"]
    acked = sum(w.acked_count for w in writers)
    resyncs = sorted(d.resync_s for d in e.done)
    print(f"fio: {wall_s:.0f}s, written {wr['io_bytes'] / MiB:.0f} MiB "
          f"({wr['iops']:.0f} write IOPS, max latency {wr['clat_ns']['max'] / 1e9:.2f}s), "
          f"read {rd['io_bytes'] / MiB:.0f} MiB ({rd['iops']:.0f} read IOPS)")
    print(f"disruptions: {len(e.done)} {counts}, {e.reconnections} reconnections, "
          f"{interrupted} resyncs interrupted; alpha's log: {bitmap} bitmap resyncs decided, "
          f"{finished} resyncs finished (the first full sync included)")
    print(f"resync to in sync: min {resyncs[0]:.1f}s, median {resyncs[len(resyncs) // 2]:.1f}s, "
          f"max {resyncs[-1]:.1f}s; final sync {final_sync_s:.1f}s")
    print(f"AckedWriters: {acked} writes acknowledged, all on both disks; disks identical")


def describe_difference(c) -> str:
    """Where the backing files differ: the first differing 4 KiB blocks and how many."""
    bad = []
    chunk = MiB
    with open(c.disk("alpha"), "rb") as fa, open(c.disk("beta"), "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                break
            if x != y:
                for i in range(0, max(len(x), len(y)), BLOCK):
                    if x[i:i + BLOCK] != y[i:i + BLOCK]:
                        bad.append(pos + i)
            pos += chunk
    extents = sorted({b // (4 * MiB) for b in bad})
    return (f"{len(bad)} blocks of 4 KiB differ, in 4 MiB extents {extents[:40]}; first "
            f"offsets {[hex(b) for b in bad[:20]]}")
