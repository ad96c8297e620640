"""Endurance, in the spirit of LINBIT's drbd9-tests: fio randrw all over a resource four times
the activity log's span while the secondary is killed, stopped and cut off again and again.

alpha is Primary, beta Secondary; al_extents = 16 (16 x 4 MiB = 64 MiB hot) on a 256 MiB
resource, so the AL fills all the time (an extent also stays pinned until the peer has
flushed its writes, PEER_FLUSH_INTERVAL_S). fio (randrw, 4k and 64k, iodepth 16,
time_based) writes [0, 248 MiB) of alpha's export while two AckedWriters (4k and 64k writes,
depth 4 each) write [248, 256 MiB) and record what was acknowledged. Meanwhile a schedule of disruptions runs,
round robin:

    kill-resync  SIGKILL beta, keep it down, `up` it again, SIGKILL it again as soon as its
                 resync has started (an interrupted resync must resume, not lose bits), up
    term         SIGTERM beta (a clean stop), keep it down, `up` it again
    cut-resync   drop the replication ports (nftables) for longer than peer_timeout_s (2 s),
                 restore them: the nodes reconnect by themselves and resync; cut again as
                 soon as the resync has started, restore
    kill         SIGKILL beta, keep it down, `up` it again: a bitmap resync under load
    cut          one cut (as cut-resync without the second one)

After each disruption the test waits until both nodes are in sync again (fio writing all the
while) and records how long that took. At the end: fio saw no error (the Primary went on
alone), both backing files are byte-identical after the last resync, no acknowledged write of
the AckedWriters is missing on either disk, every reconnection was a bitmap resync (never a
full sync), alpha's log shows a finished resync per reconnection, and no metadata operation
failed. fio reports its progress every second; no progress for STALL_S fails the test at once
(FioStalled) with alpha's state and log: a full activity log once hung every write for good
(ActivityLogFull lost in the metadata worker, then a lost wakeup in the core).

RBLOCK_ENDURANCE_S sets how long fio runs (default 45 s: the short version in `make test`);
e.g. RBLOCK_ENDURANCE_S=600 for ten minutes. RBLOCK_ENDURANCE_SEED fixes the random down
times (the seed is printed either way).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
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
    needs_fio,
    nft_usable,
    read_file_range,
)

DISK = 256 * MiB
FIO_BYTES = 248 * MiB  # fio: [0, 248 MiB); the AckedWriters: [248, 256 MiB), two AL extents
W4K_FIRST, W4K_BLOCKS = FIO_BYTES // BLOCK, 4 * MiB // BLOCK
W64K_FIRST, W64K_BLOCKS = W4K_FIRST + W4K_BLOCKS, 4 * MiB // BLOCK
AL_EXTENTS = 16
PEER_TIMEOUT_S = 2.0  # tests/cluster.py's config
DURATION_S = float(os.environ.get("RBLOCK_ENDURANCE_S", "45"))
RESYNC_TIMEOUT_S = 120.0
STALL_S = 10.0  # fio making no progress this long is a hang (a link cut stalls it ~2 s)
TAIL_S = 5.0  # no new disruption this close to fio's end
# Round robin in this order: the short run's three cover a kill, a clean stop and a cut, and
# an interrupted resync after a kill and after a cut.
KINDS = ("kill-resync", "term", "cut-resync", "kill", "cut")


class FioStalled(Exception):
    """fio made no progress for STALL_S (not an AssertionError: Cluster.wait retries those)."""


class FioMonitor:
    """fio run with --status-interval=1: a thread parses each JSON status it prints."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.last: dict | None = None  # the last JSON status (the final result, at the end)
        self.progress_at = time.monotonic()
        self._io = -1
        self._err: list[str] = []
        self._out = threading.Thread(target=self._read_out, daemon=True)
        self._errt = threading.Thread(target=lambda: self._err.extend(proc.stderr),
                                      daemon=True)
        self._out.start()
        self._errt.start()

    def _read_out(self) -> None:
        buf: list[str] = []
        decoder = json.JSONDecoder()
        for line in self.proc.stdout:
            if not buf and not line.startswith("{"):
                continue  # "fio: connected to NBD server"
            buf.append(line)
            if line.rstrip() == "}":  # the end of one top-level object
                status, _ = decoder.raw_decode("".join(buf))
                buf = []
                job = status["jobs"][0]
                io = job["write"]["io_bytes"] + job["read"]["io_bytes"]
                if io > self._io:
                    self._io, self.progress_at = io, time.monotonic()
                self.last = status

    def check(self, c) -> None:
        """Raise FioStalled if fio has made no progress for STALL_S."""
        stalled = time.monotonic() - self.progress_at
        if self.proc.poll() is None and stalled > STALL_S:
            raise FioStalled(f"fio made no progress for {stalled:.0f}s (after "
                             f"{max(self._io, 0) / MiB:.0f} MiB)\n{cluster_state(c)}")

    def result(self, timeout_s: float) -> dict:
        self.proc.wait(timeout_s)
        self._out.join(10)
        self._errt.join(10)
        assert self.proc.returncode == 0, f"fio exited {self.proc.returncode}: {self._err}"
        assert self.last is not None, f"no result from fio: {self._err}"
        job = self.last["jobs"][0]
        assert job["error"] == 0, job
        return job


def cluster_state(c) -> str:
    """alpha's status and the errors and tail of its log, for a failure message."""
    try:
        st = json.dumps(fast_res(c, "alpha"))
    except OSError as e:
        st = f"(no status: {e})"
    log = c.log("alpha")
    errors = [ln for ln in log.splitlines() if " ERROR " in ln or "Error" in ln]
    return (f"alpha status: {st}\nalpha's errors:\n" + "\n".join(errors[-10:])
            + f"\n--- alpha's log, the end ---\n{log[-2500:]}")


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
                f"{self.oos_bytes / MiB:6.1f} MiB out of sync, reconnected after "
                f"{self.reconnect_s:4.1f}s, in sync after {self.resync_s:4.1f}s, "
                f"{self.resync_sent / MiB:6.1f} MiB resynced"
                + (" (interrupted a running resync first)" if self.interrupted else ""))


@dataclass
class Endurance:
    c: object
    cut: LinkCut
    rng: random.Random
    fio: FioMonitor
    done: list[Disruption] = field(default_factory=list)
    reconnections: int = 0  # times beta came back / the link healed

    def alpha_peer(self) -> dict:
        return fast_res(self.c, "alpha")["peers"][0]

    def wait(self, cond, timeout_s: float, what: str) -> float:
        """Poll COND until true (Cluster.wait), fio watched; the seconds it took."""
        t0 = time.monotonic()

        def watched() -> bool:
            self.fio.check(self.c)
            return cond()
        self.c.wait(watched, timeout_s, what)
        return time.monotonic() - t0

    def sleep(self, lo: float, hi: float) -> float:
        s = self.rng.uniform(lo, hi)
        end = time.monotonic() + s
        while time.monotonic() < end:
            self.fio.check(self.c)
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))
        return s

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
        self.wait(lambda: self.alpha_peer()["connection"] != "Connected",
                  PEER_TIMEOUT_S + 10, "alpha notices beta is gone")
        self.sleep(0.5, 2.0)
        return time.monotonic() - t0

    def bring_back(self, kind: str, d: Disruption) -> float:
        """Undo take_down; returns the monotonic time it was undone."""
        d.oos_bytes = self.alpha_peer()["out_of_sync_bytes"]
        t = time.monotonic()
        if kind == "cut":
            self.cut.restore()
        else:
            self.c.up("beta")
        self.reconnections += 1
        d.reconnect_s = self.wait(lambda: self.alpha_peer()["connection"] == "Connected",
                                  30, f"{d.kind}: reconnected")
        return t

    def run(self, kind: str, at_s: float) -> Disruption:
        d = Disruption(kind, at_s)
        base = "cut" if kind.startswith("cut") else ("term" if kind == "term" else "kill")
        if kind.endswith("-resync"):
            # Away long enough for a resync worth catching, back, and away again at once.
            self.take_down(base)
            self.bring_back(base, d)
            self.wait(lambda: self.alpha_peer()["replication"] != "Off", 30,
                      f"{kind}: the resync starts")
            d.interrupted = self.alpha_peer()["replication"] == "SyncSource"
        d.down_s = self.take_down(base)
        back = self.bring_back(base, d)
        self.wait(self.both_in_sync, RESYNC_TIMEOUT_S, f"{kind}: both nodes in sync again")
        d.resync_s = time.monotonic() - back
        d.resync_sent = self.alpha_peer()["resync_sent_bytes"]
        self.done.append(d)
        return d


@pytest.mark.slow
@needs_fio
def test_endurance_secondary_restarts_and_link_cuts_under_fio(cluster, tmp_path):
    why = nft_usable()
    if why:
        pytest.skip(why)
    seed = int(os.environ.get("RBLOCK_ENDURANCE_SEED", str(int(time.time()))))
    print(f"\nal_extents {AL_EXTENTS} ({AL_EXTENTS * 4} MiB of {DISK // MiB} MiB), seed {seed} "
          f"(RBLOCK_ENDURANCE_SEED), fio for {DURATION_S:.0f}s (RBLOCK_ENDURANCE_S)")
    c = cluster(size=f"{DISK // MiB}M", protocol="C",
                extra_resource=f"al_extents = {AL_EXTENTS}\n")
    t_setup = time.monotonic()
    c.start_fresh()
    print(f"initial full sync of {DISK // MiB} MiB: {time.monotonic() - t_setup:.1f}s")
    cut = LinkCut([c.ports["beta"]["replication"], c.ports["alpha"]["replication"]])

    writers = [AckedWriter(c.nbd_uri("alpha"), W4K_FIRST, W4K_BLOCKS, depth=4),
               AckedWriter(c.nbd_uri("alpha"), W64K_FIRST, W64K_BLOCKS, depth=4,
                           write_blocks=16)]
    fio = FioMonitor(fio_job(c.nbd_uri("alpha"), tmp_path, "--rw=randrw", "--rwmixread=30",
                             "--bssplit=4k/80:64k/20", "--offset=0", f"--size={FIO_BYTES}",
                             "--time_based", f"--runtime={int(DURATION_S)}",
                             "--status-interval=1"))
    e = Endurance(c, cut, random.Random(seed), fio)
    start = time.monotonic()
    for w in writers:
        w.start()
    try:
        try:
            e.sleep(2.0, 2.0)
            i = 0
            while time.monotonic() - start < DURATION_S - TAIL_S and fio.proc.poll() is None:
                d = e.run(KINDS[i % len(KINDS)], time.monotonic() - start)
                print(d.line())
                i += 1
                e.sleep(0.5, 1.5)  # Established and writing for a while
        finally:
            cut.restore()
            if "beta" not in c.procs:
                c.up("beta")
        while fio.proc.poll() is None:  # the tail: the last resync under load, then the end
            fio.check(c)
            time.sleep(0.2)
        job = fio.result(timeout_s=30)
    finally:
        if fio.proc.poll() is None:
            fio.proc.kill()
            fio.proc.wait()
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
    assert len(e.done) >= (len(KINDS) if DURATION_S >= 120 else 3), counts
    alog = c.log("alpha")
    finished = alog.count("resync to beta finished")
    full = len(re.findall(r"full sync, this node is the source", alog))
    bitmap = len(re.findall(r"bitmap resync, this node is the source", alog))
    assert full == 1, f"{full} full syncs in alpha's log (1 expected: the first one)"
    interrupted = sum(1 for d in e.done if d.interrupted)
    assert bitmap >= e.reconnections, (bitmap, e.reconnections)
    # every reconnection's resync finished but the interrupted ones (one of those may have
    # finished just before its cut), plus the first sync
    assert finished >= 1 + e.reconnections - interrupted, (finished, e.reconnections,
                                                           interrupted)
    assert "protocol error" not in alog + c.log("beta")
    assert "metadata operation failed" not in alog + c.log("beta")

    wr, rd = job["write"], job["read"]
    acked = sum(w.acked_count for w in writers)
    resyncs = sorted(d.resync_s for d in e.done) or [0.0]
    print(f"fio: {wall_s:.0f}s, written {wr['io_bytes'] / MiB:.0f} MiB "
          f"({wr['iops']:.0f} write IOPS, max completion latency "
          f"{wr['clat_ns']['max'] / 1e9:.2f}s), read {rd['io_bytes'] / MiB:.0f} MiB "
          f"({rd['iops']:.0f} read IOPS)")
    print(f"disruptions: {len(e.done)} {counts}, {e.reconnections} reconnections, "
          f"{interrupted} of them interrupted a running resync; alpha's log: {bitmap} bitmap "
          f"resyncs decided, {finished} resyncs finished (the first full sync included)")
    print(f"up/restore to in sync: min {resyncs[0]:.1f}s, median "
          f"{resyncs[len(resyncs) // 2]:.1f}s, max {resyncs[-1]:.1f}s; final sync "
          f"{final_sync_s:.1f}s")
    print(f"AckedWriters: {acked} writes acknowledged, all on both disks; disks identical")


def describe_difference(c) -> str:
    """Where the backing files differ: how many 4 KiB blocks, in which 4 MiB extents."""
    bad = []
    with open(c.disk("alpha"), "rb") as fa, open(c.disk("beta"), "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if not x and not y:
                break
            if x != y:
                bad.extend(pos + i for i in range(0, max(len(x), len(y)), BLOCK)
                           if x[i:i + BLOCK] != y[i:i + BLOCK])
            pos += MiB
    extents = sorted({b // (4 * MiB) for b in bad})
    return (f"{len(bad)} blocks of 4 KiB differ, in 4 MiB extents {extents[:40]}; first "
            f"offsets {[hex(b) for b in bad[:20]]}")
