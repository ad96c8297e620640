"""Replication under failure, end to end: two real `rblock up` nodes on loopback.

What a user relies on (DESIGN.md, "Durability contract"): a write the NBD client saw
acknowledged survives the loss of either node; a node that comes back resyncs only what
differs; a link that is cut and restored heals itself; a corrupted frame never reaches a disk;
a peer without the shared secret is refused.

The writers here record, for every 4 KiB block, each content they submitted (block number, a
write counter and random bytes, so no two writes are alike) and which writes were
acknowledged. Two writes to the same block are never in flight at once, so "the last
acknowledged write" of a block is well defined, and a block read back later must hold either
that write, a later submitted (unacknowledged) one, or, if no write to it was acknowledged,
zeroes or any submitted write.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from rblock.replica import wire
from rblock.replica.link import auth_digest
from rblock.replica.state import Disk, Generation, Role, Side
from rblock.replica.wire import Frame, T

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096
DISK_BYTES = 64 * MiB
SECRET = "test-secret"  # tests/cluster.py's default
MAGIC = b"RBTESTWR"
HEADER = struct.Struct(">8sQQ")  # magic, block number, write counter

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
needs_nbdcopy = pytest.mark.skipif(shutil.which("nbdcopy") is None,
                                   reason="nbdcopy is not installed")


# --- helpers ------------------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def fast_res(c, node: str) -> dict:
    """Status straight from the control API (the CLI costs a Python start, ~0.2 s)."""
    url = f"http://127.0.0.1:{c.ports[node]['control']}/v1/status"
    with _NO_PROXY.open(url, timeout=5) as r:
        return json.loads(r.read())["resources"][0]


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def fio_job(uri: str, workdir: Path, *extra: str) -> subprocess.Popen:
    argv = ["fio", "--name=rblock", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--randrepeat=0", "--output-format=json", *extra]
    # cwd: fio may leave state files in its working directory
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=workdir)


def fio_result(proc: subprocess.Popen, timeout_s: float = 60) -> dict:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, f"fio exited {proc.returncode}\n{out}\n{err}"
    job = json.loads(out[out.index("{"):])["jobs"][0]  # the nbd engine prints a line first
    assert job["error"] == 0, job
    return job


def read_file_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def nbd_read_range(uri: str, offset: int, length: int) -> bytes:
    h = connect(uri)
    try:
        chunks = []
        for pos in range(offset, offset + length, MiB):
            chunks.append(h.pread(min(MiB, offset + length - pos), pos))
        return b"".join(chunks)
    finally:
        h.shutdown()


@dataclass
class AckedWriter:
    """aio writes of WRITE_BLOCKS x 4 KiB through libnbd, DEPTH in flight, to blocks
    [FIRST, FIRST + COUNT) (aligned to WRITE_BLOCKS), never two to one block at once. Runs in
    a thread until stop() or the connection dies."""

    uri: str
    first_block: int
    block_count: int
    depth: int = 16
    write_blocks: int = 1
    submitted: dict[int, dict[int, bytes]] = field(default_factory=dict)  # block -> ctr -> hash
    last_acked: dict[int, int] = field(default_factory=dict)  # block -> counter
    ack_times: list[float] = field(default_factory=list)
    errors: list[tuple[int, int, int]] = field(default_factory=list)  # block, counter, errno
    failure: str = ""
    inflight: dict[int, int] = field(default_factory=dict)  # first block -> counter

    def __post_init__(self) -> None:
        assert self.block_count % self.write_blocks == 0
        assert self.block_count // self.write_blocks > self.depth
        self._stop = threading.Event()
        self._counter = 0
        self._rng = random.Random(os.getpid() ^ int(time.time()))
        # One buffer per write in flight, reused: libnbd 1.14's aio_pwrite keeps a reference
        # to the nbd.Buffer it is given, so a new one per write is never freed (a 600 s
        # endurance run grew the test process to 24 GB and the OOM killer took it).
        self._free = [nbd.Buffer.from_bytearray(bytearray(BLOCK * self.write_blocks))
                      for _ in range(self.depth)]
        self.h = connect(self.uri)
        self.thread = threading.Thread(target=self._run, name="acked-writer", daemon=True)

    def start(self) -> AckedWriter:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 20, check: bool = True) -> None:
        """Stop submitting; wait for the writes in flight (at most TIMEOUT_S)."""
        self._stop.set()
        self.thread.join(timeout_s)
        assert not (check and self.thread.is_alive()), "writes in flight did not finish"

    @property
    def acked_count(self) -> int:
        return len(self.ack_times)

    def _content(self, first: int, counter: int) -> bytes:
        parts = []
        for block in range(first, first + self.write_blocks):
            data = HEADER.pack(MAGIC, block, counter) + self._rng.randbytes(BLOCK - HEADER.size)
            self.submitted.setdefault(block, {})[counter] = _digest(data)
            parts.append(data)
        return b"".join(parts)

    def _submit(self) -> None:
        slots = self.block_count // self.write_blocks
        while True:
            first = self.first_block + self._rng.randrange(slots) * self.write_blocks
            if first not in self.inflight:
                break
        self._counter += 1
        counter = self._counter
        buf = self._free.pop()
        buf.to_buffer()[:] = self._content(first, counter)
        self.inflight[first] = counter

        def done(err, first=first, counter=counter, buf=buf) -> int:
            del self.inflight[first]
            self._free.append(buf)
            if err.value:
                self.errors.append((first, counter, err.value))
            else:
                for block in range(first, first + self.write_blocks):
                    self.last_acked[block] = counter
                    # Older writes to the block need no digest any more: a block holding
                    # one is wrong whatever its content (and the records stay small).
                    subs = self.submitted[block]
                    for old in [c for c in subs if c < counter]:
                        del subs[old]
                self.ack_times.append(time.monotonic())
            return 1

        self.h.aio_pwrite(buf, first * BLOCK, done)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.errors:
                while len(self.inflight) < self.depth:
                    self._submit()
                self.h.poll(100)
            while self.inflight:  # stop: let the writes in flight finish
                self.h.poll(100)
            self.h.shutdown()
        except nbd.Error as e:
            self.failure = str(e)

    def check(self, data: bytes, first_block: int) -> list[str]:
        """Problems with DATA, the content of blocks from FIRST_BLOCK on."""
        bad = []
        zero = bytes(BLOCK)
        for i in range(len(data) // BLOCK):
            block = first_block + i
            got = data[i * BLOCK:(i + 1) * BLOCK]
            acked = self.last_acked.get(block)
            if got == zero:
                if acked is not None:
                    bad.append(f"block {block}: zeroes, but write #{acked} was acknowledged")
                continue
            magic, in_block, counter = HEADER.unpack_from(got)
            digest = self.submitted.get(block, {}).get(counter)
            if magic == MAGIC and in_block == block and acked is not None and counter < acked:
                bad.append(f"block {block}: holds write #{counter}, older than acknowledged "
                           f"write #{acked}")
            elif magic != MAGIC or in_block != block or digest is None:
                bad.append(f"block {block}: foreign data (magic {magic!r}, block {in_block}, "
                           f"write #{counter})")
            elif _digest(got) != digest:
                bad.append(f"block {block}: write #{counter} torn or corrupted")
        return bad


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def check_region(writer: AckedWriter, data: bytes) -> None:
    bad = writer.check(data, writer.first_block)
    assert not bad, f"{len(bad)} bad blocks, first ones:\n" + "\n".join(bad[:20])


def assert_synced_identical(c) -> None:
    c.wait_synced()
    assert c.files_identical(), "alpha's and beta's disks differ after the sync"


# --- 1. full sync, bulk copy and random writes ---------------------------------------------------


@needs_fio
@needs_nbdcopy
def test_full_sync_and_random_data_identical(cluster, tmp_path):
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    src = tmp_path / "random.img"
    src.write_bytes(os.urandom(DISK_BYTES))
    res = subprocess.run(["nbdcopy", str(src), c.nbd_uri("alpha")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert c.disk("alpha").read_bytes() == src.read_bytes(), "nbdcopy's data is not on alpha"
    c.wait_synced()
    assert c.disk("beta").read_bytes() == src.read_bytes(), "beta misses nbdcopy's data"

    job = fio_result(fio_job(c.nbd_uri("alpha"), tmp_path, "--size=64M", "--time_based",
                             "--runtime=3"))
    assert job["write"]["io_bytes"] >= MiB, job["write"]
    assert_synced_identical(c)
    assert c.disk("beta").read_bytes() != src.read_bytes(), "fio's writes did not reach beta"


# --- 2. the secondary dies during writes ------------------------------------------------------


@needs_fio
def test_secondary_killed_during_writes_resyncs_only_what_changed(cluster, tmp_path):
    region = 8 * MiB
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    fio = fio_job(c.nbd_uri("alpha"), tmp_path, f"--size={region}", "--time_based",
                  "--runtime=4")
    time.sleep(1.5)
    c.kill("beta")
    job = fio_result(fio)  # every write completed without error: alpha went on alone
    assert job["write"]["io_bytes"] >= MiB, job["write"]

    res = fast_res(c, "alpha")
    peer = res["peers"][0]
    assert res["role"] == "Primary" and res["disk"] == "UpToDate", res
    assert peer["connection"] != "Connected", peer
    oos = peer["out_of_sync_bytes"]
    # more than the writes in flight when beta died: writes went on being acknowledged after
    assert 16 * BLOCK < oos <= region, peer

    c.up("beta")
    c.wait_synced()
    beta_peer, alpha_peer = c.peer("beta"), c.peer("alpha")
    assert "bitmap resync" in (alpha_peer["last_decision"] or ""), alpha_peer
    received = beta_peer["resync_received_bytes"]
    assert received == alpha_peer["resync_sent_bytes"], (beta_peer, alpha_peer)
    assert 0 < received <= 2 * region, beta_peer
    assert received <= DISK_BYTES // 4, beta_peer
    assert c.files_identical()
    print(f"{job['write']['io_bytes'] // BLOCK} writes; {oos} bytes out of sync while beta was "
          f"down; {received} bytes resynced")


# --- 3. the primary dies during writes --------------------------------------------------------


def test_primary_killed_acknowledged_writes_survive(cluster):
    region_blocks = 4096  # 16 MiB
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    writer = AckedWriter(c.nbd_uri("alpha"), 0, region_blocks).start()
    time.sleep(1.5)
    inflight_at_kill = len(writer.inflight)
    c.kill("alpha")
    writer.stop()
    assert writer.acked_count > 100, f"only {writer.acked_count} writes acknowledged"
    assert inflight_at_kill > 0, "no write was in flight when alpha was killed"

    c.wait(lambda: fast_res(c, "beta")["peers"][0]["connection"] != "Connected",
           timeout_s=10, what="beta notices alpha is gone")
    c.rblock("beta", "primary", "r0")
    res = fast_res(c, "beta")
    assert res["role"] == "Primary" and res["disk"] == "UpToDate", res
    check_region(writer, nbd_read_range(c.nbd_uri("beta"), 0, region_blocks * BLOCK))

    c.up("alpha")
    early = fast_res(c, "alpha")
    assert early["role"] == "Secondary", early
    if early["peers"][0]["replication"] == "Off" or early["disk"] != "UpToDate":
        # caught before the resync finished (it clears the flag)
        assert early["crashed_primary"] is True, json.dumps(early)
    assert "last stop was not clean (this node was Primary)" in c.log("alpha"), c.log("alpha")
    c.wait_synced()
    alpha = c.res("alpha")
    assert alpha["role"] == "Secondary", alpha
    assert "bitmap resync, this node is the target" in (
        alpha["peers"][0]["last_decision"] or ""), alpha
    assert c.files_identical()
    check_region(writer, read_file_range(c.disk("alpha"), 0, region_blocks * BLOCK))
    print(f"{writer.acked_count} writes acknowledged, {inflight_at_kill} in flight at the kill; "
          f"crashed_primary seen: {early['crashed_primary']} "
          f"({early['peers'][0]['replication']})")


# --- 4. the link is cut and restored ------------------------------------------------------------


def nft(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                          timeout=10)


class LinkCut:
    """Drop every TCP packet to or from the given ports (loopback: the output hook sees both
    directions)."""

    def __init__(self, ports: list[int]):
        self.table = f"rblock_test_{os.getpid()}_{ports[0]}"
        self.ports = ports
        self.active = False

    def cut(self) -> None:
        rules = "".join(f"        tcp dport {p} drop\n        tcp sport {p} drop\n"
                        for p in self.ports)
        res = nft(f"table inet {self.table} {{\n"
                  f"    chain out {{\n"
                  f"        type filter hook output priority 0; policy accept;\n"
                  f"{rules}    }}\n}}\n")
        assert res.returncode == 0, res.stderr
        self.active = True

    def restore(self) -> None:
        if self.active:
            res = nft(f"delete table inet {self.table}\n")
            assert res.returncode == 0, res.stderr
            self.active = False


def nft_usable() -> str:
    """Empty if nft may add and delete a table here, else why not."""
    if shutil.which("nft") is None:
        return "nft is not installed"
    probe = f"rblock_probe_{os.getpid()}"
    res = nft(f"table inet {probe} {{\n}}\n")
    if res.returncode != 0:
        return f"nft is not permitted here: {res.stderr.strip()}"
    nft(f"delete table inet {probe}\n")
    return ""


@pytest.mark.parametrize("write_kib", [4, 1024], ids=["4k-writes", "1M-writes"])
def test_link_cut_and_restored_mid_write(cluster, write_kib):
    """4 KiB writes: what is in flight fits in the kernel's socket buffer. 1 MiB writes, 16 in
    flight: it does not, so the link's own send buffer holds data that can never drain while
    the link is cut; the peer timeout must still end the link and let writes go on."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    region_blocks = 8192  # 32 MiB
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    cut = LinkCut([c.ports["beta"]["replication"], c.ports["alpha"]["replication"]])
    writer = AckedWriter(c.nbd_uri("alpha"), 0, region_blocks,
                         write_blocks=write_kib * KiB // BLOCK).start()
    try:
        try:
            time.sleep(1.0)
            cut.cut()
            cut_at = time.monotonic()
            time.sleep(4.0)
            alone = fast_res(c, "alpha")
        finally:
            cut.restore()
        restored_at = time.monotonic()
        acked_alone = sum(1 for t in writer.ack_times if cut_at + 2.5 < t < restored_at)
        assert not writer.errors and not writer.failure, (writer.errors[:5], writer.failure)
        assert alone["peers"][0]["connection"] != "Connected", (
            f"alpha still Connected 4 s into the cut (peer timeout 2 s); "
            f"{acked_alone} writes acknowledged after the timeout\n{c.log('alpha')[-1500:]}")
        assert acked_alone > 10, f"only {acked_alone} writes acknowledged while alone"
        assert alone["peers"][0]["out_of_sync_bytes"] > 0, alone
        c.wait(lambda: fast_res(c, "alpha")["peers"][0]["connection"] == "Connected",
               timeout_s=30, what="the link reconnects")
        reconnect_s = time.monotonic() - restored_at
        time.sleep(0.5)  # writes during the resync too
    finally:
        writer.stop(check=False)
    assert not writer.thread.is_alive(), "writes in flight did not finish"
    assert not writer.errors and not writer.failure, (writer.errors[:5], writer.failure)
    # writes never stalled for much longer than the peer timeout (2 s)
    times = writer.ack_times
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    assert gap < 5.0, f"writes stalled for {gap:.1f}s"
    c.wait_synced()
    assert "bitmap resync" in c.log("alpha"), c.log("alpha")
    assert c.files_identical()
    check_region(writer, read_file_range(c.disk("beta"), 0, region_blocks * BLOCK))
    print(f"reconnected {reconnect_s:.1f}s after the cut ended; {writer.acked_count} writes "
          f"acknowledged, {acked_alone} while alone; longest stall {gap:.1f}s")


# --- 5. a corrupted frame ---------------------------------------------------------------------


class FakeAlpha:
    """Speaks the peer protocol to beta from a raw socket, as alpha would."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.seen: list[T] = []

    def send(self, bufs: list[bytes | memoryview]) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in bufs))

    def recv_frame(self, timeout_s: float = 10) -> Frame | None:
        """The next frame (PINGs answered and skipped); None at EOF or reset."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = wire.decode(self.buf, 0, len(self.buf))
            if got is not None:
                f, nxt = got
                f.payload = bytes(f.payload)
                self.buf = self.buf[nxt:]
                self.seen.append(f.type)
                if f.type is T.PING:
                    self.send(wire.encode(Frame(T.PONG)))
                    continue
                return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame from beta in {timeout_s}s; seen {self.seen}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buf += chunk

    def expect(self, t: T) -> Frame:
        f = self.recv_frame()
        assert f is not None and f.type is t, f"expected {t.name}, got {f}; seen {self.seen}"
        return f

    def handshake(self) -> None:
        challenge = os.urandom(32)
        self.send(wire.encode_json(T.HELLO, {
            "version": wire.PROTOCOL_VERSION, "node": "alpha", "resource": "r0",
            "size_bytes": DISK_BYTES, "challenge": challenge.hex()}))
        hello = self.expect(T.HELLO).json()
        assert hello["node"] == "beta" and hello["resource"] == "r0", hello
        beta_challenge = bytes.fromhex(hello["challenge"])
        self.send(wire.encode(Frame(T.AUTH, payload=auth_digest(SECRET, beta_challenge,
                                                                "alpha", "r0"))))
        auth = self.expect(T.AUTH)
        assert auth.payload == auth_digest(SECRET, challenge, "beta", "r0")
        self.expect(T.AUTH_OK)
        self.send(wire.encode(Frame(T.AUTH_OK)))
        side = Side(node="alpha", gen=Generation(current=0x123456), disk=Disk.UPTODATE,
                    role=Role.PRIMARY)
        self.send(wire.encode_json(T.STATE, side.to_json()))
        self.send(wire.encode(Frame(T.BITMAP, wire.FLAG_LAST)))
        state = Side.from_json(self.expect(T.STATE).json())
        assert state.node == "beta" and state.gen.fresh, state

    def wait_closed(self, timeout_s: float = 10) -> list[Frame]:
        """Frames beta sends until it closes the connection."""
        frames = []
        while (f := self.recv_frame(timeout_s)) is not None:
            frames.append(f)
        return frames

    def close(self) -> None:
        self.sock.close()


def test_corrupted_frame_never_reaches_disk(cluster):
    c = cluster(size="64M", protocol="C")
    c.create_md("beta")
    c.up("beta")
    port = c.ports["beta"]["replication"]
    payload = b"\xab" * BLOCK

    peer = FakeAlpha(port)
    try:
        peer.handshake()
        c.wait(lambda: fast_res(c, "beta")["peers"][0]["replication"] == "SyncTarget",
               timeout_s=10, what="beta decides to sync from the fake alpha")
        bufs = wire.encode(Frame(T.DATA, 0, 1, 0, 1, payload))
        body = bytearray(bufs[1])
        body[100] ^= 0x04
        peer.send([bufs[0], bytes(body), bufs[2]])
        frames = peer.wait_closed()
    finally:
        peer.close()
    assert T.WRITE_ACK not in [f.type for f in frames], frames
    c.wait(lambda: "CRC-32C mismatch" in c.log("beta"), timeout_s=5, what="CRC in beta's log")
    assert read_file_range(c.disk("beta"), 0, BLOCK) != payload, "corrupted data was written"

    # Control: the same frame with a correct CRC is acknowledged and lands on the disk.
    c.wait(lambda: fast_res(c, "beta")["peers"][0]["connection"] != "Connected",
           timeout_s=10, what="beta drops the corrupted link")
    peer = FakeAlpha(port)
    try:
        peer.handshake()
        peer.send(wire.encode(Frame(T.DATA, 0, 1, 0, 1, payload)))
        while True:
            f = peer.recv_frame()
            assert f is not None, f"beta closed the link; seen {peer.seen}\n{c.log('beta')}"
            if f.type is T.WRITE_ACK:
                break
        assert f.id == 1, f
        assert read_file_range(c.disk("beta"), 0, BLOCK) == payload
    finally:
        peer.close()


def test_out_of_range_peer_write_never_reaches_disk(cluster):
    """A DATA frame past the end of the resource is refused before any byte is written
    (DESIGN.md: assert invariants before writing to the disk)."""
    c = cluster(size="64M", protocol="C")
    c.create_md("beta")
    c.up("beta")
    size_before = c.disk("beta").stat().st_size
    peer = FakeAlpha(c.ports["beta"]["replication"])
    try:
        peer.handshake()
        peer.send(wire.encode(Frame(T.DATA, 0, 1, DISK_BYTES, 1, b"\xcd" * BLOCK)))
        while (f := peer.recv_frame()) is not None and f.type not in (T.WRITE_ACK, T.NEG_ACK):
            pass
    finally:
        peer.close()
    assert f is None or f.type is T.NEG_ACK, f"a write past the end was acknowledged: {f}"
    assert c.disk("beta").stat().st_size == size_before, (
        f"beta's disk grew from {size_before} to {c.disk('beta').stat().st_size} bytes: the "
        f"write past the end reached it\n{c.log('beta')[-600:]}")


# --- 6. wrong secret ---------------------------------------------------------------------------


def test_wrong_secret_is_refused(cluster):
    c = cluster(size="64M", protocol="C", secrets={"beta": "other"})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    c.wait(lambda: all("authentication failed" in c.log(n) for n in ("alpha", "beta")),
           timeout_s=10, what="both nodes log the authentication failure")
    deadline = time.monotonic() + 3.0
    seen = set()
    while time.monotonic() < deadline:
        for node in ("alpha", "beta"):
            peer = fast_res(c, node)["peers"][0]
            seen.add((node, peer["connection"], peer["replication"]))
            assert peer["connection"] in ("Connecting", "StandAlone"), (node, peer)
            assert peer["replication"] == "Off", (node, peer)
        time.sleep(0.1)
    assert "refused" in c.log("alpha") + c.log("beta"), seen


def test_refused_dialer_backs_off(cluster):
    """A link refused at authentication is redialed with a growing backoff (up to
    connect_retry_max_s = 1 s in the harness), not every 0.1 s forever."""
    c = cluster(size="64M", protocol="C", secrets={"beta": "other"})
    c.create_md()
    c.up("beta")
    c.up("alpha")
    marker = "dial to beta not established"
    c.wait(lambda: marker in c.log("alpha"), timeout_s=10, what="the first refused dial")
    first = c.log("alpha").count(marker)
    time.sleep(3.0)
    attempts = c.log("alpha").count(marker) - first
    # backoff 0.2, 0.4, 0.8, 1, 1 s: about 5 attempts in 3 s
    assert attempts <= 8, f"{attempts} refused dials in 3 s:\n{c.log('alpha')[-1200:]}"


# --- 7. protocols A and B ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["A", "B"])
def test_protocols_a_and_b_replicate(cluster, protocol):
    c = cluster(size="64M", protocol=protocol)
    c.start_fresh()
    assert c.res("alpha")["protocol"] == protocol
    data = os.urandom(16 * MiB)
    h = connect(c.nbd_uri("alpha"))
    try:
        for pos in range(0, len(data), MiB):
            h.pwrite(data[pos:pos + MiB], 8 * MiB + pos)
        h.flush()
    finally:
        h.shutdown()
    # FLUSH replied: everything written before it is on beta too
    assert read_file_range(c.disk("beta"), 8 * MiB, len(data)) == data
    assert_synced_identical(c)


# --- 8. a small resync moves each out-of-sync block once ----------------------------------------


def test_small_resync_transfers_each_block_once(cluster):
    """One block written while beta is away: the resync moves exactly that block."""
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    c.stop("beta")
    block = os.urandom(BLOCK)
    h = connect(c.nbd_uri("alpha"))
    try:
        h.pwrite(block, 5 * MiB)
        h.flush()
    finally:
        h.shutdown()
    assert fast_res(c, "alpha")["peers"][0]["out_of_sync_bytes"] == BLOCK
    c.up("beta")
    c.wait_synced()
    assert read_file_range(c.disk("beta"), 5 * MiB, BLOCK) == block
    beta_peer, alpha_peer = c.peer("beta"), c.peer("alpha")
    assert "bitmap resync" in (beta_peer["last_decision"] or ""), beta_peer
    assert (beta_peer["resync_received_bytes"], alpha_peer["resync_sent_bytes"]) == \
        (BLOCK, BLOCK), "the resync moved the one out-of-sync block more than once"
