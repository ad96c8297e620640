"""A deterministic simulation of a two-node resource: the real `ResourceCore` and the real
`Metadata` of each node, on simulated disks, a simulated link and a virtual clock, with a
guest writing to the primary and seeded faults (DESIGN.md, "Sans-IO cores").

Everything that is I/O in the shell is simulated here, as the `Effects` of each core:

- the data disk: 4 KiB blocks, a volatile image (the page cache) and a stable one. A write
  lands in the volatile image when it completes (FUA: in both); a flush makes what was
  written before it started stable. A crash (power cut) keeps the stable image, plus, for
  every block written since the last flush, maybe the newer content (the kernel may have
  written it back): torn multi-block writes included.
- the metadata file: a byte image with the same volatile/stable split, torn at 512-byte
  sectors on a crash (a superblock slot or bitmap page half written).
- the link: in-order frame delivery with random latency; a cut (both sides notice after a
  timeout, frames in flight are lost) or a partition that heals before the timeout (frames
  arrive late); reconnection by the node whose name sorts first, with backoff.
- disk faults: a node's disk starts failing writes (EIO or ENOSPC), reads or flushes, and is
  repaired and attached again later.
- the metadata worker: one operation at a time; with `late_meta_results` its result reaches
  the core some time after it ran, as in the shell, where a thread runs it and the loop hears
  later (the activity log can be found full, then an extent unpinned before the core knows).
- the operator (an HA manager, minus fencing): promotes a node when there is no primary and
  the node cannot have missed a write (it was connected whenever one was acknowledged), and
  moves the guest there.
- with `fencing=True`: etcd (`SimEtcd`: keys, leases that expire, nodes cut off from it,
  lost quorum, answers lost after etcd applied them), each node's lease kept alive as
  rblock/fencer.py does, and the real transactions of rblock/replica/fence_txn.py. The
  operator then promotes whenever the guest's node looks gone (and now and then for no
  reason), and demotes a deposed Primary: fencing must refuse every unsafe promotion.

Every event is drawn from one `random.Random(seed)`: a seed replays exactly.

Invariants, checked as the run goes (an AssertionError names the seed's event log tail):

- ack: when the guest hears "done", the primary holds the write (if it has a disk), and the
  peer holds it too, or the primary's bitmap marks its blocks; a peer that was connected
  and lacks it does not claim UpToDate (it knows it failed: defect 1 of issue 8).
- flush: when a FLUSH is answered, every write acknowledged before it is on the primary's
  stable image (if UpToDate), and on the peer's or marked in the primary's bitmap.
- promote: a node the operator may promote holds every acknowledged write, except those it
  lost in its own crash before they were flushed (or got from a resync source that had).
- bitmap: whenever nothing is in flight, every block that differs between the two disks is
  marked out of sync on one of them.
- fencing (with `fencing=True`): a write acknowledged without the peer's copy was
  acknowledged by the holder of the primary key under a live lease, with the peer recorded
  Outdated; an Outdated record is deleted only once its node holds every acknowledged write.
- converge: at the end, once every fault is healed and the resync is done, the two disks
  are byte-identical and hold what the guest was promised.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import heapq
import json
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rblock.config import ResourceConfig
from rblock.etcd import KV, TxnResult
from rblock.replica import fence_txn
from rblock.replica.core import DECIDED, ResourceCore
from rblock.replica.effects import Event
from rblock.replica.fencing import Answer, Ev, Fencing, Key, Txn
from rblock.replica.state import PERSISTED_DISK, Conn, Disk, Generation, Role
from rblock.replica.wire import Frame, T
from rblock.store.metadata import AL_EXTENT_BYTES, BITMAP_OFFSET, ActivityLogFull, Metadata

BLOCK = 4096
SECTOR = 512
EXTENTS = 6  # disk size in activity-log extents
DISK_BYTES = EXTENTS * AL_EXTENT_BYTES
NBLOCKS = DISK_BYTES // BLOCK
AL_EXTENTS = 3  # fewer than the disk has, so extents are evicted
HOT_BLOCKS = 48  # the guest writes to few blocks, spread over every extent
PEER_TIMEOUT_S = 2.0
LEASE_TTL_S = 2.0  # fencing: the nodes' etcd leases
ETCD_TIMEOUT_S = 0.3  # a request to an unreachable etcd fails after this long
KEYS = fence_txn.Keys("/rblock", "r0")
NODES = ("alpha", "beta")
ZERO = bytes(BLOCK)
WID = struct.Struct(">Q")


def _raise(e: BaseException) -> None:
    raise e


def block_of(wid: int) -> bytes:
    """The content a write puts in each of its blocks: its id, then filler."""
    return WID.pack(wid) * (BLOCK // 8)


def wid_in(data: bytes) -> int:
    """Which write's content a block holds (0: zeroes; -1: anything else)."""
    if data == ZERO:
        return 0
    w = WID.unpack_from(data)[0]
    return w if data == block_of(w) else -1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0

    def at(self, delay_s: float, fn: Callable[..., None], *args: Any) -> Timer:
        t = Timer(fn, args)
        self._seq += 1
        heapq.heappush(self._heap, (self.now + max(0.0, delay_s), self._seq, t))
        return t

    def step(self) -> bool:
        while self._heap:
            when, _, t = heapq.heappop(self._heap)
            if t.cancelled:
                continue
            self.now = when
            t.cancelled = True
            t.fn(*t.args)
            return True
        return False

    def pending(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)


@dataclass(eq=False)
class Timer:
    fn: Callable[..., None]
    args: tuple
    cancelled: bool = False


class SimFile:
    """The metadata file (a MetaFile): bytes, split into what is volatile and stable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = bytearray()
        self.stable = bytearray()
        self.dirty: set[int] = set()  # sectors written since the last sync
        self.fail = False

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        if self.fail:
            raise OSError(errno.EIO, f"{self.name}: injected write error")
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data
        self.dirty.update(range(offset // SECTOR, (end - 1) // SECTOR + 1))

    def sync(self) -> None:
        if self.fail:
            raise OSError(errno.EIO, f"{self.name}: injected sync error")
        if len(self.stable) != len(self.data):
            self.stable = bytearray(self.data)
        else:
            for s in self.dirty:
                self.stable[s * SECTOR:(s + 1) * SECTOR] = self.data[s * SECTOR:(s + 1) * SECTOR]
        self.dirty.clear()

    def size(self) -> int:
        return len(self.data)

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        self.dirty.update(range(0, (size + SECTOR - 1) // SECTOR))

    def close(self) -> None:
        pass

    def crash(self, rng: random.Random) -> None:
        """Power cut: each sector written since the last sync may or may not have made it."""
        stable = bytearray(self.stable)
        if len(stable) < len(self.data):
            stable.extend(bytes(len(self.data) - len(stable)))
        for s in sorted(self.dirty):
            if rng.random() < 0.5:
                stable[s * SECTOR:(s + 1) * SECTOR] = self.data[s * SECTOR:(s + 1) * SECTOR]
        self.stable = bytearray(stable)
        self.data = bytearray(stable)
        self.dirty.clear()


class SimDisk:
    """The data disk: 4 KiB blocks, volatile and stable (absent blocks are zeroes)."""

    def __init__(self) -> None:
        self.vol: dict[int, bytes] = {}
        self.stable: dict[int, bytes] = {}
        self.dirty: set[int] = set()
        self.version: dict[int, int] = {}  # block -> writes to it so far
        self.stable_version: dict[int, int] = {}
        self.fail_writes = 0  # an errno, or 0
        self.fail_reads = False
        self.fail_flushes = False

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        assert offset % BLOCK == 0 and length % BLOCK == 0, (offset, length)
        return b"".join(self.vol.get(b, ZERO) for b in range(offset // BLOCK,
                                                              (offset + length) // BLOCK))

    def write(self, offset: int, data: bytes, durable: bool = False) -> None:
        if self.fail_writes:
            raise OSError(self.fail_writes, "injected write error")
        assert offset % BLOCK == 0 and len(data) % BLOCK == 0, (offset, len(data))
        for i in range(len(data) // BLOCK):
            b = offset // BLOCK + i
            self.vol[b] = bytes(data[i * BLOCK:(i + 1) * BLOCK])
            v = self.version[b] = self.version.get(b, 0) + 1
            if durable:
                self.stable[b] = self.vol[b]
                self.stable_version[b] = v
                self.dirty.discard(b)
            else:
                self.dirty.add(b)

    def snapshot(self) -> dict[int, tuple[int, bytes]]:
        """What a flush starting now makes durable."""
        if self.fail_flushes:
            raise OSError(errno.EIO, "injected flush error")
        return {b: (self.version.get(b, 0), self.vol.get(b, ZERO)) for b in self.dirty}

    def make_stable(self, snap: dict[int, tuple[int, bytes]]) -> None:
        """A flush completes: what it saw is durable; a later write stays volatile, and an
        older flush finishing last never undoes a newer one."""
        for b, (v, data) in snap.items():
            if v > self.stable_version.get(b, 0):
                self.stable[b] = data
                self.stable_version[b] = v
            if self.version.get(b, 0) == v:
                self.dirty.discard(b)

    def crash(self, rng: random.Random, inflight: list[tuple[int, bytes]]) -> None:
        for b in self.dirty:
            if rng.random() < 0.5:
                self.stable[b] = self.vol.get(b, ZERO)
        for offset, data in inflight:  # writes under way: any of their blocks may be there
            for i in range(len(data) // BLOCK):
                if rng.random() < 0.5:
                    self.stable[offset // BLOCK + i] = bytes(data[i * BLOCK:(i + 1) * BLOCK])
        self.vol = dict(self.stable)
        self.dirty.clear()
        self.version = {b: self.version.get(b, 0) + 1 for b in self.stable}
        self.stable_version = dict(self.version)

    def content(self, b: int) -> bytes:
        return self.vol.get(b, ZERO)


@dataclass(eq=False)
class SimLink:
    id: int
    queues: dict[str, deque] = field(default_factory=lambda: {n: deque() for n in NODES})
    last_at: dict[str, float] = field(default_factory=lambda: {n: 0.0 for n in NODES})
    up: set[str] = field(default_factory=set)  # sides whose core has it up
    partitioned: bool = False
    held: list[tuple[str, Frame]] = field(default_factory=list)



class SimEtcd:
    """etcd as fencing sees it: keys, leases that expire, and whether a node reaches a
    member with a quorum. Transactions are the real ones (fence_txn.build), run here on a
    dict with etcd's compare semantics, their answers read by fence_txn.interpret."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.kv: dict[str, tuple[str, int, int]] = {}  # key -> (value, lease, version)
        self.leases: dict[int, float] = {}  # lease -> expiry (etcd's clock: the world's)
        self.next_lease = 0x1000
        self.cut: set[str] = set()  # nodes that reach no member with a quorum
        self.quorum = True

    def reachable(self, node: str) -> bool:
        return self.quorum and node not in self.cut

    def expire(self) -> None:
        now = self.world.clock.now
        for lid, exp in list(self.leases.items()):
            if exp <= now:
                del self.leases[lid]
                for k, (_v, lease, _ver) in list(self.kv.items()):
                    if lease == lid:
                        self.world.log(f"etcd: lease {lid:x} expired, {k} deleted")
                        del self.kv[k]

    def grant(self) -> int:
        self.expire()
        self.next_lease += 1
        self.leases[self.next_lease] = self.world.clock.now + LEASE_TTL_S
        return self.next_lease

    def keepalive(self, lid: int) -> bool:
        self.expire()
        if lid not in self.leases:
            return False
        self.leases[lid] = self.world.clock.now + LEASE_TTL_S
        return True

    def _cmp(self, c: dict) -> bool:
        key = base64.b64decode(c["key"]).decode()
        got = self.kv.get(key)
        if c["target"] == "VERSION":
            return (got[2] if got else 0) == int(c["version"])
        if c["target"] == "VALUE":
            return got is not None and got[0] == base64.b64decode(c["value"]).decode()
        assert c["target"] == "LEASE"
        return (got[1] if got else 0) == int(c["lease"])

    def _op(self, op: dict) -> list[KV] | None:
        if "request_put" in op:
            r = op["request_put"]
            key = base64.b64decode(r["key"]).decode()
            lease = int(r.get("lease", 0))
            assert not lease or lease in self.leases, "put with a lease etcd does not know"
            ver = self.kv[key][2] + 1 if key in self.kv else 1
            self.kv[key] = (base64.b64decode(r["value"]).decode(), lease, ver)
            return None
        if "request_delete_range" in op:
            key = base64.b64decode(op["request_delete_range"]["key"]).decode()
            if key.startswith(KEYS.outdated_dir) and key in self.kv:
                # Invariant outdated: a record is deleted only once its node holds every
                # acknowledged write (outdated-cleared-by-resync).
                self.world.check_holds_all(key[len(KEYS.outdated_dir):], "outdated record cleared")
            self.kv.pop(key, None)
            return None
        r = op["request_range"]
        key = base64.b64decode(r["key"]).decode()
        if "range_end" in r:
            end = base64.b64decode(r["range_end"]).decode()
            keys = sorted(k for k in self.kv if key <= k < end)
        else:
            keys = [key] if key in self.kv else []
        return [KV(k, self.kv[k][0], self.kv[k][1], self.kv[k][2], 0) for k in keys]

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict]) -> TxnResult:
        self.expire()
        ok = all(self._cmp(c) for c in compare)
        ranges = [r for op in (success if ok else failure) if (r := self._op(op)) is not None]
        return TxnResult(ok, ranges)

    def holds(self, node: str, lease: int) -> bool:
        self.expire()
        got = self.kv.get(KEYS.primary)
        return got is not None and got[0] == node and got[1] == lease

    def outdated(self, node: str) -> bool:
        self.expire()
        return KEYS.outdated(node) in self.kv

class SimNode:
    """One node: its core, its disk and metadata, and the Effects they need."""

    def __init__(self, world: World, name: str, peer: str, cfg: ResourceConfig) -> None:
        self.world = world
        self.name = name
        self.peer = peer
        self.cfg = cfg
        self.disk = SimDisk()
        self.file = SimFile(f"{name}.meta")
        Metadata.create_on(self.file, name, cfg.name, cfg.size_bytes,
                           al_extents_max=self.world.al_extents).close()
        self.alive = False
        self.core: ResourceCore | None = None
        self.meta: Metadata | None = None
        self.disk_attached = True
        self.ops: dict[int, tuple[Timer, tuple | None]] = {}  # token -> (timer, write)
        self.meta_q: deque = deque()
        self.meta_busy = False
        self.timers: dict[str, Timer] = {}
        self.paused = False
        self.boots = 0
        self.lease = 0  # fencing: this node's etcd lease (0: none)
        self.lease_deadline = 0.0

    # --- life --------------------------------------------------------------------------------

    def boot(self) -> None:
        self.boots += 1
        meta = Metadata.open_on(self.file, self.name, self.cfg.name, self.cfg.size_bytes,
                                al_extents_max=self.world.al_extents)
        sb = meta.sb
        crashed_primary = False
        if not sb.clean_shutdown:
            meta.recover_crash()
            crashed_primary = sb.role_primary
        meta.mark_open()
        self.meta = meta
        self.alive = True
        self.disk_attached = True
        self.paused = False
        self.core = ResourceCore(
            self.name, self.cfg, self.peer, self, lambda: self.world.clock.now,
            Generation(sb.uuid_current, sb.uuid_bitmap, tuple(sb.uuid_history)),
            PERSISTED_DISK[sb.disk_state], crashed_primary, meta.bitmap, meta,
            uuids=lambda: (self.world.rng.getrandbits(64) & ~1) | 0x10000,
            fence=(Fencing(self.cfg.name, self.name, self.peer, self.world.on_no_quorum,
                           lambda: self.world.clock.now) if self.world.fencing else None))
        self.core.wall_clock = lambda: 1.7e9 + self.world.clock.now  # deterministic
        self.core.promoted_at = sb.promoted_at
        self.world.log(f"{self.name} boots ({sb.disk_state}, gen {sb.uuid_current:x})")
        self.lease, self.lease_deadline = 0, 0.0
        if self.world.fencing:
            self.lease_tick()

    # --- fencing: the lease and the transactions ---------------------------------------------

    def lease_tick(self) -> None:
        """Keep the lease alive (a new one if etcd forgot it); its deadline runs from the
        keepalive's send time, as in rblock/fencer.py."""
        if not self.alive:
            return
        w, boot, sent = self.world, self.boots, self.world.clock.now

        def at_etcd() -> None:
            e = w.etcd
            if not e.reachable(self.name):
                return  # lost: the node's request times out
            lid = self.lease if self.lease and e.keepalive(self.lease) else e.grant()

            def reply() -> None:
                if not self.alive or self.boots != boot or self.core is None:
                    return
                if lid != self.lease:
                    if self.core.fence is not None and self.core.fence.lease_valid:
                        self.core.lease_changed(False)  # the old lease and its keys are gone
                    self.lease = lid
                self.lease_deadline = sent + LEASE_TTL_S
                w.clock.at(max(0.0, self.lease_deadline - w.clock.now), self.lease_check, boot)
                self.core.lease_changed(True)
            w.clock.at(w.etcd_delay(), reply)
        w.clock.at(w.etcd_delay(), at_etcd)
        w.clock.at(LEASE_TTL_S / 3, self.lease_tick)

    def lease_check(self, boot: int) -> None:
        if (self.alive and self.boots == boot and self.core is not None
                and self.world.clock.now >= self.lease_deadline):
            self.core.lease_changed(False)

    def fence(self, token: int, kind: Txn) -> None:
        w, boot, lease = self.world, self.boots, self.lease

        def deliver(answer: Answer) -> None:
            if self.alive and self.boots == boot and self.core is not None:
                self.core.disk_done(token, answer, None)

        if not lease or w.clock.now >= self.lease_deadline:
            w.clock.at(0.001, deliver, Answer(Ev.UNREACHABLE, reason="no lease"))
            return

        def at_etcd() -> None:
            e = w.etcd
            if not e.reachable(self.name):
                w.clock.at(ETCD_TIMEOUT_S, deliver,
                           Answer(Ev.UNREACHABLE, reason="no etcd member answered"))
                return
            r = e.txn(*fence_txn.build(kind, KEYS, self.name, self.peer, lease, w.clock.now))
            answer = fence_txn.interpret(kind, KEYS, self.name, lease, r)
            w.log(f"etcd: {self.name} {kind.value} -> {answer.event.value} {answer.reason}")
            if not e.reachable(self.name) or w.rng.random() < 0.05:
                # Done in etcd, the answer lost (the node is cut off now, or a timeout).
                w.clock.at(ETCD_TIMEOUT_S, deliver,
                           Answer(Ev.UNREACHABLE, reason="the answer did not come"))
                return
            w.clock.at(w.etcd_delay(), deliver, answer)
        w.clock.at(w.etcd_delay(), at_etcd)

    def crash(self) -> None:
        """Power cut: the process, the page cache and everything in flight are gone."""
        rng = self.world.rng
        inflight = [w for _t, w in self.ops.values() if w is not None]
        for t, _w in self.ops.values():
            t.cancelled = True
        self.ops.clear()
        for t in self.timers.values():
            t.cancelled = True
        self.timers.clear()
        self.meta_q.clear()
        self.meta_busy = False
        self.disk.crash(rng, inflight)
        self.file.crash(rng)
        self.alive = False
        self.core = None
        self.meta = None
        self.world.log(f"{self.name} crashes")

    # --- effects: the link -------------------------------------------------------------------

    def send_frame(self, t: int, flags: int, fid: int, offset: int, aux: int,
                   payload: bytes | memoryview = b"") -> None:
        self.world.transmit(self.name, Frame(T(t), flags, fid, offset, aux, bytes(payload)))

    def send_json(self, t: T, obj: dict) -> None:
        self.world.transmit(self.name, Frame(t, payload=json.dumps(obj).encode()))

    def send_write_ack(self, seq: int) -> None:
        self.world.transmit(self.name, Frame(T.WRITE_ACK, 0, seq, 0, 1))

    def flush_link(self) -> None:
        pass

    def link_congested(self) -> bool:
        return False

    def pause_link(self) -> None:
        self.paused = True

    def resume_link(self) -> None:
        if self.paused:
            self.paused = False
            self.world.kick_delivery(self.name)

    def close_link(self, reason: str, refuse: bool = False) -> None:
        self.world.close_link(self.name, reason)

    # --- effects: the data disk --------------------------------------------------------------

    def pwrite_now(self, offset: int, data: bytes | memoryview) -> OSError | None:
        if not self.disk_attached:
            return OSError(errno.ENODEV, "detached")
        try:
            self.disk.write(offset, bytes(data))
        except OSError as e:
            return e
        return None

    def _later(self, token: int, fn: Callable[[], Any], write: tuple | None = None,
               event: Callable[[int, Any, BaseException | None], None] | None = None) -> None:
        """Run FN after a random delay and deliver its outcome to the core."""
        def run() -> None:
            self.ops.pop(token, None)
            if not self.alive:
                return
            try:
                result, exc = fn(), None
            except OSError as e:
                result, exc = None, e
            assert self.core is not None
            (event or self.core.disk_done)(token, result, exc)
        t = self.world.clock.at(self.world.io_delay(), run)
        self.ops[token] = (t, write)

    def _attached_disk(self) -> SimDisk:
        if not self.disk_attached:
            raise OSError(errno.ENODEV, "detached")
        return self.disk

    def disk_write(self, token: int, offset: int, data: bytes | memoryview, fua: bool) -> None:
        data = bytes(data)
        self._later(token, lambda: self._attached_disk().write(offset, data, durable=fua),
                    write=(offset, data))

    def disk_trim(self, token: int, offset: int, length: int, fua: bool) -> None:
        self.disk_write(token, offset, bytes(length), fua)

    def disk_zeroes(self, token: int, offset: int, length: int, fua: bool, may_punch: bool,
                    fast_only: bool) -> None:
        self.disk_write(token, offset, bytes(length), fua)

    def disk_read(self, token: int, offset: int, length: int, once: bool) -> None:
        self._later(token, lambda: self._attached_disk().read(offset, length))

    def disk_flush(self, token: int) -> None:
        try:
            snap = self._attached_disk().snapshot()
        except OSError as e:
            self._later(token, lambda e=e: _raise(e))
            return
        self._later(token, lambda: self._attached_disk().make_stable(snap))

    def detach_disk(self) -> None:
        def close() -> None:
            self.disk_attached = False
        self._meta(None, close)

    def outdate_detached(self, token: int) -> None:
        def run() -> None:
            meta = Metadata.open_on(self.file, self.name, self.cfg.name, self.cfg.size_bytes,
                                    al_extents_max=self.world.al_extents)
            meta.write_superblock(disk_state="outdated")
        self._meta(token, run)

    # --- effects: metadata -------------------------------------------------------------------

    def _meta(self, token: int | None, fn: Callable[[], Any]) -> None:
        self.meta_q.append((token, fn))
        self._meta_next()

    def _meta_next(self) -> None:
        if self.meta_busy or not self.meta_q or not self.alive:
            return
        self.meta_busy = True
        token, fn = self.meta_q.popleft()

        def deliver(exc: BaseException | None) -> None:
            self.meta_busy = False
            if token is not None:
                assert self.core is not None
                self.core.meta_done(token, exc)
            self._meta_next()

        def run() -> None:
            self.ops.pop(-id(t), None)
            if not self.alive:
                self.meta_busy = False
                return
            try:
                fn()
                exc = None
            except (OSError, ActivityLogFull) as e:
                exc = e
            if not self.world.late_meta_results:
                deliver(exc)
                return

            def late() -> None:
                self.ops.pop(-id(t2), None)
                if self.alive:
                    deliver(exc)
                else:
                    self.meta_busy = False
            t2 = self.world.clock.at(self.world.io_delay(), late)
            self.ops[-id(t2)] = (t2, None)
        t = self.world.clock.at(self.world.io_delay(), run)
        self.ops[-id(t)] = (t, None)

    def _data_sync(self) -> None:
        disk = self._attached_disk()
        disk.make_stable(disk.snapshot())

    def persist(self, token: int, changes: dict) -> None:
        meta = self.meta
        self._meta(token, lambda: meta.write_superblock(**changes))  # type: ignore[union-attr]

    def flush_bitmap(self, token: int) -> None:
        meta = self.meta

        def run() -> None:
            self._data_sync()
            meta.flush_bitmap()  # type: ignore[union-attr]
        self._meta(token, run)

    def activate_al(self, token: int, extents: list[int]) -> None:
        meta = self.meta

        def run() -> None:
            self._data_sync()  # an extent leaves the AL only once its data is durable
            meta.al_activate(extents)  # type: ignore[union-attr]
        self._meta(token, run)

    # --- effects: timers, events -------------------------------------------------------------

    def set_timer(self, name: str, delay_s: float) -> None:
        self.cancel_timer(name)

        def fire() -> None:
            self.timers.pop(name, None)
            if self.alive and self.core is not None:
                self.core.timer(name)
        self.timers[name] = self.world.clock.at(delay_s, fire)

    def cancel_timer(self, name: str) -> None:
        t = self.timers.pop(name, None)
        if t is not None:
            t.cancelled = True

    def emit(self, event: Event) -> None:
        self.world.on_event(self.name, event)

    def victim_begin(self, info: dict) -> bool:
        self.world.log(f"{self.name} is a split-brain victim: {info['decision']}")
        return True

    def victim_end(self) -> None:
        pass

    # --- attach after a repair -----------------------------------------------------------------

    def attach(self) -> None:
        assert self.core is not None and not self.core.has_disk and self.meta_q == deque()
        self.disk.fail_writes, self.disk.fail_reads, self.disk.fail_flushes = 0, False, False
        self.file.fail = False
        meta = Metadata.open_on(self.file, self.name, self.cfg.name, self.cfg.size_bytes,
                                al_extents_max=self.world.al_extents)
        if not meta.sb.clean_shutdown:
            meta.recover_crash()
        meta.mark_open()
        self.meta = meta
        self.disk_attached = True
        sb = meta.sb
        self.core.attached(Generation(sb.uuid_current, sb.uuid_bitmap, tuple(sb.uuid_history)),
                           PERSISTED_DISK[sb.disk_state], meta.bitmap, meta)
        if self.core.disk is Disk.UPTODATE:
            # Invariant promote: a disk that comes back UpToDate may be promoted without
            # --force: it must hold every acknowledged write.
            self.world.check_promotable(self)


@dataclass
class GuestWrite:
    wid: int
    first: int  # block
    count: int
    fua: bool
    node: str
    acked: bool = False
    at: float = 0.0  # submitted (virtual time)


class World:
    def __init__(self, seed: int, *, protocol: str = "C", faults: bool = True,
                 crashes: bool = True, disk_faults: bool = True, log_max: int = 3000,
                 al_extents: int = AL_EXTENTS, guest_depth: int = 8,
                 late_meta_results: bool = False, fencing: bool = False,
                 on_no_quorum: str = "suspend-io") -> None:
        self.seed = seed
        # Fencing through a simulated etcd: the operator then promotes whenever the guest's
        # node looks gone, and the rules must refuse what is not safe.
        self.fencing = fencing
        self.on_no_quorum = on_no_quorum
        self.al_extents = al_extents
        # More guest requests in flight than the AL has extents: writes queue for extents.
        self.guest_depth = guest_depth
        # A metadata operation runs, then its result reaches the core later, as in the shell
        # (the worker thread runs it; the loop hears of it afterwards): what the core does in
        # between (an extent unpinned) must not be lost when the result arrives.
        self.late_meta_results = late_meta_results
        self.rng = random.Random(seed)
        self.clock = Clock()
        cfg = ResourceConfig(name="r0", size_bytes=DISK_BYTES, protocol=protocol,
                             secret="s", peer_timeout_s=PEER_TIMEOUT_S, ack_timeout_s=10.0,
                             resync_rate_bytes_per_s=64 << 20, nodes=NODES)
        cfg = dataclasses.replace(cfg, al_extents=al_extents)
        self.nodes = {n: SimNode(self, n, [m for m in NODES if m != n][0], cfg) for n in NODES}
        self.link: SimLink | None = None
        self.side_link: dict[str, SimLink] = {}  # the link each node last brought up
        self._link_ids = 0
        self.faults, self.crashes, self.disk_faults = faults, crashes, disk_faults
        self.events: deque[str] = deque(maxlen=log_max)
        # The guest and what it was promised.
        self.writes: dict[int, GuestWrite] = {}
        self.history: dict[int, list[int]] = {}  # block -> write ids, in submission order
        self.busy: set[int] = set()  # blocks with a write in flight
        self.next_wid = 1
        self.guest_ops: dict[int, tuple[str, list[int]]] = {}  # op -> its node, its blocks
        self.next_op = 1
        self.excused: dict[str, set[int]] = {n: set() for n in NODES}
        self.missed: dict[str, bool] = {n: False for n in NODES}
        self.guest_node: str | None = None  # where the guest runs now
        self.last_guest_node = "alpha"  # ... or ran last
        self.acks = 0
        self.failed_writes = 0
        self.flushes = 0
        self.promotions = 0
        self.checks = 0
        self.stopping = False
        self.split_brains = 0
        self.etcd = SimEtcd(self)
        self.refusals = 0
        self.single_copy_acks = 0
        self._demoting: dict[str, bool] = {}
        self.crashed_at: dict[str, float] = {}

    # --- log -----------------------------------------------------------------------------------

    def log(self, what: str) -> None:
        self.events.append(f"{self.clock.now:9.4f} {what}")

    def fail(self, what: str) -> None:
        tail = "\n".join(self.events)
        raise AssertionError(f"seed {self.seed}: {what}\n--- last events ---\n{tail}")

    def on_event(self, node: str, ev: Event) -> None:
        self.log(f"{node} {ev.what} {ev.old} -> {ev.new} {ev.detail}")
        if ev.what == "sync-done" and ev.new == "target":
            # Its data is now its peer's: so are the losses the peer is excused from (and
            # its own stay excused: what it lost in a crash is still lost).
            peer = self.nodes[node].peer
            self.excused[node] |= self.excused[peer]
            self.missed[node] = False

    def etcd_delay(self) -> float:
        return self.rng.choice((0.0005, 0.001, 0.002, 0.01))

    def io_delay(self) -> float:
        return self.rng.choice((0.0001, 0.0005, 0.001, 0.003, 0.02))

    # --- the link ------------------------------------------------------------------------------

    def transmit(self, src: str, f: Frame) -> None:
        link = self.link
        if link is None or src not in link.up:
            return
        dst = self.nodes[src].peer
        if link.partitioned:
            link.held.append((src, f))
            return
        self._schedule(link, src, dst, f)

    def _schedule(self, link: SimLink, src: str, dst: str, f: Frame) -> None:
        at = max(link.last_at[src], self.clock.now + self.rng.choice((0.0001, 0.0003, 0.001)))
        link.last_at[src] = at
        link.queues[dst].append(f)
        self.clock.at(at - self.clock.now, self._deliver, link, dst)

    def _deliver(self, link: SimLink, dst: str) -> None:
        if link is not self.link or dst not in link.up or not link.queues[dst]:
            return
        node = self.nodes[dst]
        if node.paused:
            return  # kick_delivery resumes
        f = link.queues[dst].popleft()
        assert node.core is not None
        node.core.frame(f)

    def kick_delivery(self, dst: str) -> None:
        link = self.link
        if link is not None:
            for _ in range(len(link.queues[dst])):
                self.clock.at(0.0, self._deliver, link, dst)

    def connect(self) -> None:
        a, b = self.nodes["alpha"], self.nodes["beta"]
        if self.link is not None or not (a.alive and b.alive):
            return
        if a.core.conn is Conn.STANDALONE or b.core.conn is Conn.STANDALONE:  # type: ignore[union-attr]
            return
        if a.core.link_is_up:  # type: ignore[union-attr]
            return  # the dialer dials again only once it has seen its old link go
        old = self.side_link.get("beta")
        if old is not None and "beta" in old.up:
            # The acceptor takes the new connection in place of one it still thinks is up.
            old.up.discard("beta")
            b.core.link_down("replaced by a new connection")  # type: ignore[union-attr]
        self._link_ids += 1
        link = self.link = SimLink(self._link_ids)
        self.log(f"link {link.id} up")
        order = list(NODES)
        self.rng.shuffle(order)
        for n in order:
            link.up.add(n)
            self.side_link[n] = link
            self.nodes[n].core.link_up()  # type: ignore[union-attr]

    def close_link(self, closer: str, reason: str) -> None:
        """CLOSER drops the link: it hears at once, the peer after the frames in flight."""
        link = self.link
        if link is None:
            return
        self.link = None
        self.log(f"link {link.id} closed by {closer}: {reason}")
        other = self.nodes[closer].peer
        self._down(link, closer, reason, 0.0)
        # Frames the closer sent before closing still arrive (the real link flushes them).
        if other in link.up:
            for f in list(link.queues[other]):
                self.clock.at(0.0005, self._late_frame, link, other, f)
            self._down(link, other, f"peer closed: {reason}", 0.001)

    def _late_frame(self, link: SimLink, dst: str, f: Frame) -> None:
        node = self.nodes[dst]
        if dst in link.up and node.alive:
            node.core.frame(f)  # type: ignore[union-attr]

    def _down(self, link: SimLink, node: str, reason: str, delay: float) -> None:
        def down() -> None:
            if node in link.up:
                link.up.discard(node)
                n = self.nodes[node]
                if n.alive:
                    n.core.link_down(reason)  # type: ignore[union-attr]
        if delay:
            self.clock.at(delay, down)
        else:
            down()

    def cut(self, delay_alpha: float, delay_beta: float, why: str) -> None:
        """The network fails: each side notices after its delay; nothing more arrives."""
        link = self.link
        if link is None:
            return
        self.link = None
        self.log(f"link {link.id} cut ({why})")
        self._down(link, "alpha", why, delay_alpha)
        self._down(link, "beta", why, delay_beta)

    def partition(self) -> None:
        link = self.link
        if link is None or link.partitioned:
            return
        link.partitioned = True
        self.log(f"link {link.id} partitioned")
        if self.rng.random() < 0.5:  # heals before anyone times out: frames arrive late
            self.clock.at(self.rng.uniform(0.05, PEER_TIMEOUT_S * 0.8), self._heal, link)
        else:
            self.clock.at(PEER_TIMEOUT_S, self._partition_timeout, link)

    def _heal(self, link: SimLink) -> None:
        if link is not self.link:
            return
        link.partitioned = False
        self.log(f"link {link.id} partition heals")
        held, link.held = link.held, []
        for src, f in held:
            self._schedule(link, src, self.nodes[src].peer, f)

    def _partition_timeout(self, link: SimLink) -> None:
        if link is self.link:
            self.cut(0.0, self.rng.uniform(0.0, 0.3), "peer timed out")

    # --- the guest -------------------------------------------------------------------------------

    def primary(self) -> SimNode | None:
        g = self.nodes.get(self.guest_node) if self.guest_node else None
        if g is not None and g.alive and g.core is not None and g.core.role is Role.PRIMARY:
            return g  # (with fencing, a deposed old primary may still be Primary too)
        for n in self.nodes.values():
            if n.alive and n.core is not None and n.core.role is Role.PRIMARY:
                return n
        return None

    def guest_write(self) -> None:
        p = self.primary()
        if p is None or p.name != self.guest_node or self.inflight_ops >= self.guest_depth:
            return
        count = self.rng.choice((1, 1, 1, 2, 3))
        first = self.rng.choice(self._hot_blocks())
        blocks = range(first, min(first + count, NBLOCKS))
        if any(b in self.busy for b in blocks):
            return
        wid = self.next_wid
        self.next_wid += 1
        w = GuestWrite(wid, first, len(blocks), self.rng.random() < 0.1, p.name,
                       at=self.clock.now)
        self.writes[wid] = w
        for b in blocks:
            self.history.setdefault(b, []).append(wid)
        op = self._op_begin(p.name, list(blocks))
        data = memoryview(block_of(wid) * len(blocks))
        core = p.core
        assert core is not None
        core.start_write(first * BLOCK, data, w.fua,
                         lambda token, exc, p=p: self._write_done(p, w, exc, op), wid)

    def _hot_blocks(self) -> list[int]:
        if not hasattr(self, "_hot"):
            r = random.Random(self.seed ^ 0x5EED)
            self._hot = sorted(r.sample(range(NBLOCKS - 4), HOT_BLOCKS))
        return self._hot

    @property
    def inflight_ops(self) -> int:
        return len(self.guest_ops)

    def _op_begin(self, node: str, blocks: list[int]) -> int:
        op = self.next_op
        self.next_op += 1
        self.guest_ops[op] = (node, blocks)
        self.busy.update(blocks)
        return op

    def _op_end(self, op: int) -> None:
        _node, blocks = self.guest_ops.pop(op)
        self.busy.difference_update(blocks)

    def _write_done(self, p: SimNode, w: GuestWrite, exc: BaseException | None,
                    op: int) -> None:
        self._op_end(op)
        if exc is not None:
            self.failed_writes += 1
            self.log(f"write {w.wid} failed: {exc}")
            return
        w.acked = True
        self.acks += 1
        self._check_ack(p, w)

    def guest_flush(self) -> None:
        p = self.primary()
        if p is None or p.name != self.guest_node or self.inflight_ops >= self.guest_depth:
            return
        before = [w for w in self.writes.values() if w.acked and w.node == p.name]
        op = self._op_begin(p.name, [])
        core = p.core
        assert core is not None
        core.start_flush(lambda token, exc: self._flush_done(p, before, exc, op), None)

    def _flush_done(self, p: SimNode, before: list[GuestWrite],
                    exc: BaseException | None, op: int) -> None:
        self._op_end(op)
        if exc is not None or not p.alive:
            return
        self.flushes += 1
        self._check_flush(p, before)

    def guest_read(self) -> None:
        p = self.primary()
        if p is None or p.name != self.guest_node or self.inflight_ops >= self.guest_depth:
            return
        b = self.rng.choice(self._hot_blocks())
        if b in self.busy:
            return
        core = p.core
        assert core is not None
        if core.read_local_ok(b * BLOCK, BLOCK) and p.disk_attached:
            try:
                self._check_read(p, b, p.disk.read(b * BLOCK, BLOCK))
                return
            except OSError as e:
                core.local_read_failed(e, b * BLOCK, BLOCK)
        op = self._op_begin(p.name, [b])

        def done(token: Any, data: Any, exc: BaseException | None) -> None:
            self._op_end(op)
            if exc is None and p.alive:
                self._check_read(p, b, data)
        core.start_read(b * BLOCK, BLOCK, done, None)

    # --- what the guest was promised -------------------------------------------------------------

    def required(self, node: str, b: int) -> int:
        """The newest acknowledged write to block B that NODE must hold (0: none)."""
        for wid in reversed(self.history.get(b, ())):
            if self.writes[wid].acked and wid not in self.excused[node]:
                return wid
        return 0

    def _holds(self, node: SimNode, b: int, wid: int, stable: bool = False) -> bool:
        """NODE's block B is write WID or a later one to that block."""
        data = node.disk.stable.get(b, ZERO) if stable else node.disk.content(b)
        got = wid_in(data)
        return got == wid or (got > wid and got in self.history.get(b, ()))

    def _marked(self, node: SimNode, b: int) -> bool:
        core = node.core
        return core is not None and core.bitmap is not None and core.bitmap.test_block(b)

    def _marked_durably(self, node: SimNode, b: int) -> bool:
        """Block B is out of sync in NODE's bitmap as its metadata file holds it on stable
        storage (what a crash of NODE leaves)."""
        pos = BITMAP_OFFSET + b // 8
        stable = node.file.stable
        return pos < len(stable) and bool(stable[pos] >> (b % 8) & 1)

    def persisted_disk_state(self, node: SimNode) -> str:
        """The disk state NODE's metadata holds on stable storage (what a restart reads)."""
        view = SimFile(node.file.name)
        view.data = bytearray(node.file.stable)
        try:
            meta = Metadata.open_on(view)
        except Exception:  # noqa: BLE001 -- unreadable metadata: the node cannot start
            return "unreadable"
        return meta.sb.disk_state

    def _check_ack(self, p: SimNode, w: GuestWrite) -> None:
        """Invariant ack."""
        core = p.core
        assert core is not None
        peer = self.nodes[p.peer]
        link = self.link
        connected = (link is not None and p.name in link.up and peer.name in link.up
                     and core.phase in DECIDED and peer.core is not None
                     and peer.core.phase in DECIDED)
        if not core.has_disk and self.persisted_disk_state(p) != "outdated":
            # Its detached disk misses this write and its metadata could not say so (it
            # failed too): only fencing can keep that disk from being promoted later.
            self.missed[p.name] = True
        for b in range(w.first, w.first + w.count):
            if core.has_disk and core.disk is Disk.UPTODATE and not self._holds(p, b, w.wid):
                self.fail(f"write {w.wid} acknowledged, block {b} not on primary {p.name}")
            if peer.alive and self._holds(peer, b, w.wid):
                continue
            if self.fencing and (peer.alive or w.at > self.crashed_at.get(peer.name, -1.0)):
                # Rule no-ack-lost: on this copy only, so the peer is recorded Outdated
                # (or its disk says it is not good data). (A write sent before the peer's
                # power cut may have been confirmed by it and lost with its page cache:
                # rule peer-durable's business, below.)
                self.single_copy_acks += 1
                if (not self.etcd.outdated(peer.name)
                        and self.persisted_disk_state(peer) == "uptodate"):
                    self.fail(f"write {w.wid} acknowledged by {p.name} without block {b} on "
                              f"{peer.name}, which is not recorded Outdated in etcd")
                # Rule lease-lost: only the holder of the primary key acknowledges alone.
                if not self.etcd.holds(p.name, p.lease):
                    self.fail(f"write {w.wid} acknowledged by {p.name} on its copy alone, "
                              f"but it does not hold the primary key in etcd (lease "
                              f"{p.lease:x})")
            if not peer.alive:
                # It may have applied the write and lost it with its page cache, or died
                # before it came: the primary marks the write's extent out of sync when it
                # sees the link go (rule peer-durable; invariant bitmap checks that).
                self.missed[peer.name] = True
                continue
            if peer.core is not None and not peer.core.has_disk:
                # Its disk is detached: attached again, it is resynced in full; restarted,
                # its metadata says it is not good, unless that failed too (fencing's job).
                if self.persisted_disk_state(peer) not in ("outdated", "inconsistent"):
                    self.missed[peer.name] = True
                continue
            if not core.has_disk:
                self.fail(f"write {w.wid} acknowledged by diskless {p.name}, block {b} not on "
                          f"{peer.name}")
            if (peer.core is not None and peer.core.disk is Disk.INCONSISTENT
                    and self.persisted_disk_state(peer) == "inconsistent"):
                # A resync target: the resync may have sent the block already (the bit is
                # clear here); until it ends the peer is no copy of the data, and when it
                # ends invariant promote (and converge) check that it holds the write.
                continue
            if not self._marked(p, b):
                self.fail(f"write {w.wid} acknowledged, block {b} neither on {peer.name} nor "
                          f"marked out of sync on {p.name}")
            if connected and peer.core.disk is Disk.UPTODATE:  # type: ignore[union-attr]
                self.fail(f"write {w.wid}: connected peer {peer.name} lacks block {b} and "
                          f"still says UpToDate")
            if not connected:
                self.missed[peer.name] = True

    def _check_flush(self, p: SimNode, before: list[GuestWrite]) -> None:
        """Invariant flush."""
        core = p.core
        assert core is not None
        peer = self.nodes[p.peer]
        latest: dict[int, int] = {}  # block -> newest write acknowledged before the FLUSH
        for w in before:
            if w.wid in self.excused[p.name]:
                continue  # lost in a crash of this node before a flush covered it
            for b in range(w.first, w.first + w.count):
                latest[b] = max(latest.get(b, 0), w.wid)
        for b, wid in latest.items():
            if (core.has_disk and core.disk is Disk.UPTODATE
                    and not self._holds(p, b, wid, stable=True)):
                self.fail(f"FLUSH answered, write {wid} block {b} not stable on {p.name}")
            # A peer that lacks it is resynced there: the union of both bitmaps marks it
            # (a Diskless peer gets every block when it attaches a disk again).
            if (peer.alive and peer.core is not None and peer.core.has_disk
                    and core.has_disk and not self._holds(peer, b, wid, stable=True)
                    and not self._marked(p, b) and not self._marked_durably(peer, b)):
                self.fail(f"FLUSH answered, write {wid} block {b} neither stable on "
                          f"{peer.name} nor marked out of sync")

    def _serving(self, n: SimNode) -> SimNode:
        """The node whose disk N serves: its own, or its peer's while N is Diskless."""
        if n.core is not None and not n.core.has_disk:
            return self.nodes[n.peer]
        return n

    def _check_read(self, p: SimNode, b: int, data: bytes) -> None:
        got = wid_in(bytes(data))
        need = self.required(self._serving(p).name, b)
        ok = got == need or (got > need and got in self.history.get(b, ())) or (
            need == 0 and (got == 0 or got in self.history.get(b, ())))
        if not ok:
            self.fail(f"read of block {b} on {p.name} returned write {got}, the guest was "
                      f"promised write {need} or later")

    def check_holds_all(self, name: str, why: str) -> None:
        """NAME's disk holds every acknowledged write it must (invariant outdated)."""
        n = self.nodes[name]
        for b in self.history:
            need = self.required(name, b)
            if need and not self._holds(n, b, need):
                self.fail(f"{why}: {name} lacks block {b} of acknowledged write {need}")

    def check_promotable(self, n: SimNode) -> None:
        """Invariant promote: N (about to be, or just, promoted) holds what it must."""
        self.checks += 1
        d = self._serving(n)
        for b in self.history:
            need = self.required(d.name, b)
            if need and not self._holds(d, b, need):
                self.fail(f"{n.name} promoted without block {b} of acknowledged write {need} "
                          f"(the disk of {d.name} holds {wid_in(d.disk.content(b))})")

    def quiescent(self) -> bool:
        if self.inflight_ops:
            return False
        for n in self.nodes.values():
            if not n.alive or n.ops or n.meta_q or n.meta_busy:
                return False
        link = self.link
        return link is None or not any(link.queues.values()) and not link.held

    def check_bitmaps(self) -> None:
        """Invariant bitmap: blocks that differ are marked out of sync on one node."""
        a, b = self.nodes["alpha"], self.nodes["beta"]
        if not (a.alive and b.alive and a.core and b.core and a.core.has_disk
                and b.core.has_disk):
            return
        self.checks += 1
        for blk in set(a.disk.vol) | set(b.disk.vol):
            if a.disk.content(blk) != b.disk.content(blk):
                if not (self._marked(a, blk) or self._marked(b, blk)):
                    self.fail(f"block {blk} differs (alpha {wid_in(a.disk.content(blk))}, "
                              f"beta {wid_in(b.disk.content(blk))}) and neither bitmap marks it")

    # --- faults and the operator -----------------------------------------------------------------

    def crash(self, name: str) -> None:
        n = self.nodes[name]
        if not n.alive:
            return
        other = self.nodes[n.peer]
        if self.guest_node == name:
            self.guest_node = None
        for op, (node, _blocks) in list(self.guest_ops.items()):
            if node == name:  # never answered: the guest died with its host
                self._op_end(op)
        before = {b: wid_in(n.disk.content(b)) for b in self.history}
        self.crashed_at[name] = self.clock.now
        n.crash()
        old = self.side_link.pop(name, None)
        if old is not None:
            old.up.discard(name)  # a restarted node never hears of its old links
        # Acknowledged writes it held but lost with its page cache: excused, on it.
        for b in self.history:
            if wid_in(n.disk.content(b)) != before[b]:
                for wid in self.history[b]:
                    if self.writes[wid].acked and not self._holds(n, b, wid):
                        self.excused[name].add(wid)
        link = self.link
        if link is not None:
            self.link = None
            self.log(f"link {link.id} lost with {name}")
            # The survivor notices at once (the process died: a reset) or after a timeout.
            delay = self.rng.choice((0.001, PEER_TIMEOUT_S))
            self._down(link, other.name, f"{name} crashed", delay)
        self.clock.at(self.rng.uniform(0.5, 4.0), self.restart, name)

    def restart(self, name: str) -> None:
        n = self.nodes[name]
        if n.alive:
            return
        try:
            n.boot()
        except OSError as e:  # `rblock up` fails on a broken disk: tried again later
            self.log(f"{name} cannot start: {e}")
            n.alive, n.core, n.meta = False, None, None
            self.clock.at(1.0, self.restart, name)

    def disk_fault(self, name: str) -> None:
        n = self.nodes[name]
        if not n.alive or not n.disk_attached or n.core is None or not n.core.has_disk:
            return
        kind = self.rng.choice(("eio", "enospc", "reads", "flushes", "meta"))
        self.log(f"{name} disk starts failing: {kind}")
        if kind == "eio":
            n.disk.fail_writes = errno.EIO
        elif kind == "enospc":
            n.disk.fail_writes = errno.ENOSPC
        elif kind == "reads":
            n.disk.fail_reads = True
        elif kind == "flushes":
            n.disk.fail_flushes = True
        else:
            n.file.fail = True
        self.clock.at(self.rng.uniform(0.5, 3.0), self.repair, name)

    def repair(self, name: str) -> None:
        n = self.nodes[name]
        if not n.alive or n.core is None:
            n.disk.fail_writes, n.disk.fail_reads, n.disk.fail_flushes = 0, False, False
            n.file.fail = False
            return
        if n.core.has_disk:
            # The fault never tripped a detach (nothing touched the disk): just clear it.
            n.disk.fail_writes, n.disk.fail_reads, n.disk.fail_flushes = 0, False, False
            n.file.fail = False
            return
        if n.meta_q or n.meta_busy:
            self.clock.at(0.05, self.repair, name)
            return
        self.log(f"{name} disk repaired, attach")
        n.attach()

    def operate_fenced(self) -> None:
        """The HA manager with fencing: it promotes whenever the guest's node looks gone
        (crashed, or cut off from etcd), and now and then for no reason at all; fencing
        must refuse every promotion that could lose an acknowledged write. A Primary that
        does not run the guest (it was deposed: its guest destroyed by self-fencing) is
        demoted."""
        for n in self.nodes.values():
            c = n.core
            if (n.alive and c is not None and c.role is Role.PRIMARY and n.name != self.guest_node
                    and not c.link_is_up and not c._promoting and not self._demoting.get(n.name)
                    and c.fence is not None
                    and c.fence.key not in (Key.HELD, Key.TAKING, Key.RETAKING)):
                self._demoting[n.name] = True
                self.log(f"operator: demote {n.name} (fence key {c.fence.key.value})")
                c.demote(lambda msg, exc, n=n: self._demoted(n, msg, exc))
        g = self.nodes.get(self.guest_node) if self.guest_node else None
        looks_gone = (g is None or not g.alive or g.core is None
                      or g.core.role is not Role.PRIMARY or not self.etcd.reachable(g.name))
        if not looks_gone and self.rng.random() > 0.05:
            return
        for n in self.rng.sample(list(self.nodes.values()), 2):
            c = n.core
            if not n.alive or c is None or c.role is Role.PRIMARY or c._promoting:
                continue
            try:
                c.promote(False, lambda msg, exc, n=n: self._promoted(n, msg, exc))
            except Exception as e:  # noqa: BLE001 -- a refusal (ResourceError) is fine
                self.log(f"promote {n.name} refused: {e}")
                continue
            return

    def _demoted(self, n: SimNode, msg: str, exc: BaseException | None) -> None:
        self._demoting[n.name] = False
        self.log(f"{n.name} demoted: {msg} {exc or ''}")

    def operate(self) -> None:
        """The operator: keep the guest running on a primary that holds its data."""
        if self.fencing:
            self.operate_fenced()
            return
        p = self.primary()
        if p is not None:
            if self.guest_node is None:
                self.guest_node = p.name
            return
        for n in self.rng.sample(list(self.nodes.values()), 2):
            if not n.alive or n.core is None or self.missed[n.name]:
                continue
            other = self.nodes[n.peer]
            if other.alive and other.core is not None and not (
                    self.link is not None and n.name in self.link.up and other.name in self.link.up
                    and n.core.phase in DECIDED):
                continue  # the peer lives but is cut off: promoting needs fencing
            try:
                n.core.promote(False, lambda msg, exc, n=n: self._promoted(n, msg, exc))
            except Exception as e:  # noqa: BLE001 -- a refusal (ResourceError) is fine
                self.log(f"promote {n.name} refused: {e}")
                continue
            return

    def _resolve_split_brain(self) -> None:
        """The README's recovery: the node the guest did not run on last discards its
        changes. (A split brain happens here only when a detached disk could not record
        that it is Outdated: its metadata failed too. Fencing closes that gap.)"""
        cores = {name: n.core for name, n in self.nodes.items()}
        if any(c is None for c in cores.values()):
            return
        refused = [c for c in cores.values() if c.conn is Conn.STANDALONE
                   and c.last_decision is not None and not c.last_decision.sync.connects]
        if not refused:
            return
        keep = self.last_guest_node
        victim = self.nodes[keep].peer
        self.split_brains += 1
        self.log(f"operator: split brain ({refused[0].last_decision}): {victim} discards "
                 f"its data, {keep} keeps")
        vcore = cores[victim]
        if vcore.role is Role.PRIMARY:
            return  # (not in these runs: the guest runs on `keep`)
        vcore.connect(discard_my_data=True)  # type: ignore[union-attr]
        cores[keep].connect()  # type: ignore[union-attr]

    def _force_if_stuck(self) -> None:
        """The documented recovery when no disk is UpToDate but both hold the same data
        (both Outdated after the primary's disk failed with no good peer): an operator
        runs 'rblock primary --force' on one."""
        cores = [n.core for n in self.nodes.values()]
        if any(c is None for c in cores):
            return
        if all(c.link_is_up and c.phase.value == "Established" and c.disk is Disk.OUTDATED
               and c.bitmap is not None and not c.bitmap.count() for c in cores):
            n = self.primary() or self.nodes["alpha"]
            self.log(f"operator: primary --force on {n.name} (both Outdated, in sync)")
            n.core.promote(True, lambda msg, exc: self._promoted(n, msg, exc))  # type: ignore[union-attr]

    def _promoted(self, n: SimNode, msg: str, exc: BaseException | None) -> None:
        if exc is not None:
            self.refusals += 1
            self.log(f"promote {n.name} failed: {exc}")
            return
        self.promotions += 1
        self.log(f"{n.name} promoted: {msg}")
        self.check_promotable(n)
        self.guest_node = self.last_guest_node = n.name

    # --- the run -----------------------------------------------------------------------------------

    def start(self) -> None:
        for n in self.nodes.values():
            n.boot()
        self.connect()
        # The first promotion of fresh data (create-md on both, then primary --force).
        self.clock.at(0.01, self._first_promotion)
        if self.fencing:
            self.clock.at(1.0, self._first_promotion_watch)

    def _first_promotion_watch(self) -> None:
        """A crash in the middle of the first promotion answers nobody: try again."""
        if self.promotions:
            return
        a = self.nodes["alpha"]
        if a.alive and a.core is not None and not a.core._promoting:
            self._first_promotion()
        self.clock.at(1.0, self._first_promotion_watch)

    def _first_promotion(self) -> None:
        a = self.nodes["alpha"]
        if self.promotions:
            return
        if not a.alive or a.core is None:
            self.clock.at(0.05, self._first_promotion)  # (crashed first: after its restart)
            return
        fence = a.core.fence
        if fence is not None and not fence.lease_valid:
            self.clock.at(0.01, self._first_promotion)  # the lease first
            return
        if a.core.phase in DECIDED:  # type: ignore[union-attr]
            def done(msg: str, exc: BaseException | None) -> None:
                self._promoted(a, msg, exc)
                if exc is not None and a.alive and self.promotions == 0:
                    self.clock.at(0.01, self._first_promotion)  # etcd did not answer
            try:
                a.core.promote(True, done)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 -- refused (ResourceError): again later
                self.log(f"first promotion refused: {e}")
                self.clock.at(0.05, self._first_promotion)
        else:
            self.clock.at(0.01, self._first_promotion)

    def drive(self) -> None:
        """One random external event, then reschedule."""
        r = self.rng.random()
        if r < 0.55:
            self.guest_write()
        elif r < 0.62:
            self.guest_flush()
        elif r < 0.72:
            self.guest_read()
        elif self.faults and r < 0.735:
            what = self.rng.random()
            if what < 0.4:
                self.partition()
            elif what < 0.8:
                self.cut(self.rng.uniform(0, 0.01), self.rng.uniform(0, 0.01), "connection reset")
            elif self.link is not None and self.link.up:
                node = self.rng.choice(NODES)
                if self.nodes[node].alive:
                    self.nodes[node].core.disconnect()  # type: ignore[union-attr]
                    self.clock.at(self.rng.uniform(0.1, 1.0), self._reconnect_cmd, node)
        elif self.fencing and self.faults and r < 0.737:
            self.etcd_fault()
        elif self.crashes and r < 0.74:
            self.crash(self.rng.choice(NODES))
        elif self.disk_faults and r < 0.745:
            self.disk_fault(self.rng.choice(NODES))
        if not self.stopping:
            self.clock.at(self.rng.choice((0.0002, 0.001, 0.003, 0.01)), self.drive)

    def etcd_fault(self) -> None:
        """A node cut off from etcd (alone, or from the peer too: isolated), or etcd
        without a quorum, for a while."""
        e = self.etcd
        what = self.rng.random()
        if what < 0.35:
            node = self.rng.choice(NODES)
            e.cut.add(node)
            self.log(f"{node} cut off from etcd")
            self.clock.at(self.rng.uniform(0.5, 4.0), self._etcd_heal, node)
        elif what < 0.75:
            node = self.rng.choice(NODES)
            e.cut.add(node)
            self.log(f"{node} isolated (etcd and peer)")
            self.cut(PEER_TIMEOUT_S, PEER_TIMEOUT_S, f"{node} isolated")
            self.clock.at(self.rng.uniform(0.5, 5.0), self._etcd_heal, node)
        elif e.quorum:
            e.quorum = False
            self.log("etcd loses its quorum")
            self.clock.at(self.rng.uniform(0.5, 3.0), self._etcd_quorum_back)

    def _etcd_heal(self, node: str) -> None:
        self.etcd.cut.discard(node)
        self.log(f"{node} reaches etcd again")

    def _etcd_quorum_back(self) -> None:
        self.etcd.quorum = True
        self.log("etcd has a quorum again")

    def _reconnect_cmd(self, node: str) -> None:
        n = self.nodes[node]
        if n.alive and n.core is not None:
            n.core.connect()

    def housekeeping(self) -> None:
        self.connect()
        self.operate()
        if self.stopping:
            for name, n in self.nodes.items():
                if not n.alive:
                    self.restart(name)
                if (n.core is not None and not n.core.has_disk and not n.meta_q
                        and not n.meta_busy):
                    self.log(f"{name} attach at the end")
                    n.attach()
                if n.core is not None and n.core.conn is Conn.STANDALONE and not (
                        n.core.last_decision and not n.core.last_decision.sync.connects):
                    n.core.connect()
            self._resolve_split_brain()
            self._force_if_stuck()
        self.clock.at(self.rng.uniform(0.05, 0.3), self.housekeeping)

    def run(self, duration_s: float) -> None:
        self.start()
        self.clock.at(0.05, self.drive)
        self.clock.at(0.02, self.housekeeping)
        end = self.clock.now + duration_s
        while self.clock.now < end and self.clock.step():
            if self.quiescent():
                self.check_bitmaps()
        self.converge()

    def converge(self) -> None:
        """Stop the faults, heal everything, let the resync finish: invariant converge."""
        self.faults = self.crashes = self.disk_faults = False
        self.stopping = True
        self.etcd.cut.clear()
        self.etcd.quorum = True
        for n in self.nodes.values():
            n.disk.fail_writes, n.disk.fail_reads, n.disk.fail_flushes = 0, False, False
            n.file.fail = False
        deadline = self.clock.now + 120.0
        while self.clock.now < deadline:
            if not self.clock.step():
                break
            if self._synced():
                break
        if not self._synced():
            st = {n: (m.core.role.value, m.core.disk.value, m.core.phase.value,
                      m.core.conn.value, m.core.bitmap.count() if m.core.bitmap else None,
                      str(m.core.last_decision))
                  for n, m in self.nodes.items() if m.core}
            busy = {n: (len(m.ops), len(m.meta_q), m.meta_busy, len(m.core.tracker.pending),
                        len(m.core._writes), len(m.core._reads), len(m.core._guest_flushes),
                        len(m.core.applyq), len(m.core._held), len(m.core._al_waiting),
                        len(m.core._locks))
                    for n, m in self.nodes.items() if m.core}
            self.fail(f"did not converge: {st}; guest ops in flight {self.inflight_ops}; "
                      f"(ops, meta queue, meta busy, pending, writes, reads, flushes, applyq, "
                      f"held, al waiting, locks): {busy}")
        a, b = self.nodes["alpha"], self.nodes["beta"]
        for blk in set(a.disk.vol) | set(b.disk.vol):
            if a.disk.content(blk) != b.disk.content(blk):
                self.fail(f"in sync, but block {blk} differs: alpha "
                          f"{wid_in(a.disk.content(blk))}, beta {wid_in(b.disk.content(blk))}")
        p = self.primary()
        if p is not None:
            self.check_promotable(p)

    def _synced(self) -> bool:
        if self.inflight_ops:
            # Let the guest's last operations finish first.
            return False
        cores = [n.core for n in self.nodes.values()]
        if any(c is None for c in cores):
            return False
        return all(c.link_is_up and c.phase.value == "Established" and c.disk is Disk.UPTODATE
                   and c.peer_disk is Disk.UPTODATE and c.bitmap is not None
                   and c.bitmap.count() == 0 for c in cores) and self.quiescent()
