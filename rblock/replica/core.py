"""One replicated resource on one node, as a pure state machine. No I/O, no await.

Theory of operation
-------------------
The core holds everything the resource knows (role, disk and connection states, generation
UUIDs, the dirty bitmap, writes in flight, the resync under way) and decides. It is fed
events and does all I/O through its `Effects` (rblock/replica/effects.py):

    events in                                   actions out (Effects)
    link_up / link_down(reason)                 send_frame, send_json, close_link, ...
    frame(f)            (the peer's frames)     pwrite_now, disk_write/read/flush/...
    disk_done / meta_done(token, result, exc)   persist, flush_bitmap, activate_al
    timer(name)                                 set_timer, cancel_timer
    start_write/read/flush/trim/zeroes          done(token, exc) of the guest's request
    promote, demote, connect, disconnect, ...   done(message, exc) of the command

The asyncio shell (resource.py) and the deterministic simulator (tests/simulation.py) are
two implementations of the same effects, so every decision below runs the same way under
both; the simulator adds seeded network, disk and crash faults and checks the invariants.

Phases and the frame table. `phase` says where the connection is:

    IDLE        no link (connection Connecting or StandAlone)
    HANDSHAKE   link up: both sides send STATE and their BITMAP, then decide (state.decide)
    ESTABLISHED replicating; SYNC_SOURCE / SYNC_TARGET a resync; VERIFY_SOURCE /
                VERIFY_TARGET an online verify (each also replicates guest writes)

A peer frame is handled by `FRAMES[(phase, frame type)]`, with the role it needs, if any.
A frame the table does not list for the phase, or that arrives in the wrong role, is a
protocol error: the link is refused and dropped, nothing of it is applied. (Once, frames
were accepted in any state: a SYNC_DONE outside a resync cleared the whole bitmap, and a
second BITMAP|LAST re-ran the decision.) Each link gets a new `_link_gen`; a continuation
started on an older link (a disk read for an answer, say) never sends on a newer one.

Rules, each named where it is decided:

- write-routing: a guest write goes to the local disk and, while the peer replicates and
  has a disk, to the peer; the guest hears "done" when every copy that counts has it
  (protocol C: applied on the peer; B: received; A: handed to the link). A copy the peer
  misses is a bit in the dirty bitmap. With no copy at all holding it, the write fails.
- on-io-error=detach (DRBD): a read or write error of the local disk detaches it (Failed,
  then Diskless); the node carries on through the peer: reads from it, writes to it only.
  Its ranges that failed are sent as OUT_OF_SYNC so the peer marks them. A node whose peer
  loses its disk starts a new generation, tracked by its bitmap, so the returning disk is
  resynced.
- peer-durable: a write the peer applied is in its page cache, not on its disk, until a
  FLUSH covers it. The 4 MiB extents holding such writes are kept in `_peer_volatile`
  (pinned in the activity log) until the peer acknowledges a flush; if the link breaks
  first they are marked out of sync, so a peer that lost its page cache (a power cut) is
  resynced there. A FLUSH goes to the peer every PEER_FLUSH_INTERVAL_S while any are held.
- ordered-read: a read whose answer goes to the peer (resync, verify, remote read) sees
  exactly the writes that precede it on the link: on a primary it waits for guest writes in
  flight to its range and holds new ones until the answer is queued (a range lock); on a
  secondary it runs in the apply queue, after the earlier writes to its range.
- durable-before-claim: data reaches stable storage before the bitmap bits that say it was
  copied, and before the superblock that says the disk is UpToDate.
- handshake-holds-writes: while a handshake decides where writes go, new guest writes wait.

Commands validate synchronously (raising ResourceError with the reason and the fix) and
finish through their `done` callback once what they changed is durable.
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c

from rblock.config import ResourceConfig
from rblock.replica import wire
from rblock.replica.effects import Effects, Event, ResourceError
from rblock.replica.resync import RateLimiter, SweepPlanner, all_blocks
from rblock.replica.state import (
    DISK_PERSISTED,
    Conn,
    Decision,
    Disk,
    Generation,
    PeerCounters,
    Repl,
    Role,
    Side,
    Sync,
    check_promote,
    decide,
    new_uuid,
    sync_progress,
)
from rblock.replica.wire import Frame, LinkError, T
from rblock.replica.writes import ApplyQueue, PendingWrite, WriteTracker
from rblock.store.device import DeviceError
from rblock.store.metadata import AL_EXTENT_BYTES, BLOCK_BYTES, ActivityLogFull, Bitmap

log = logging.getLogger("rblock.resource")

BITMAP_CHUNK_BYTES = 64 * 1024  # bitmap bytes per BITMAP frame
BITMAP_FLUSH_INTERVAL_S = 1.0  # a resync target persists its progress this often
PEER_FLUSH_INTERVAL_S = 1.0  # writes applied on the peer are made durable there this often
SYNC_RATE_WINDOW_S = 5.0  # sync rate is measured over this much recent history
PROGRESS_SAMPLE_S = 0.1
PROGRESS_SAMPLES_MAX = 100
# Writes up to this size (without FUA) are copied into the page cache on the event loop, on
# both nodes, not in the volume's thread pool. Measured on 1 MiB writes (2 cores, fio and
# both nodes busy): the pool's hand-off (futexes, GIL ping-pong, 6 context switches per
# write) cost more CPU than the copy; inline, the secondary went from 373 to 245 us of CPU
# per write and the primary from 540 to 430. The loop stalls for the copy (~0.1 ms/MiB).
INLINE_WRITE_BYTES_MAX = 4 * 1024 * 1024
LINK_FLUSH_BYTES_MIN = 64 * 1024  # a DATA frame this big goes out before the local write
AL_EXTENT_SHIFT = AL_EXTENT_BYTES.bit_length() - 1

_PENDING, _OK, _FAILED, _SKIPPED, _NONE = range(5)  # parts of a guest write


class ActivityLogView(Protocol):
    """The metadata's in-memory activity-log queries (no I/O: `Metadata` provides them)."""

    def al_pin_range(self, offset_bytes: int, length_bytes: int) -> tuple[int, int, bool]: ...

    def al_unpin_range(self, first: int, last: int) -> None: ...

    def al_missing(self, extents: list[int]) -> list[int]: ...

    def al_touch(self, extents: list[int]) -> None: ...


class Phase(enum.Enum):
    IDLE = "Off"
    HANDSHAKE = "Handshake"
    ESTABLISHED = "Established"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    VERIFY_SOURCE = "VerifyS"
    VERIFY_TARGET = "VerifyT"


_REPL = {Phase.IDLE: Repl.OFF, Phase.HANDSHAKE: Repl.OFF, Phase.ESTABLISHED: Repl.ESTABLISHED,
         Phase.SYNC_SOURCE: Repl.SYNC_SOURCE, Phase.SYNC_TARGET: Repl.SYNC_TARGET,
         Phase.VERIFY_SOURCE: Repl.VERIFY_SOURCE, Phase.VERIFY_TARGET: Repl.VERIFY_TARGET}
DECIDED = frozenset({Phase.ESTABLISHED, Phase.SYNC_SOURCE, Phase.SYNC_TARGET,
                     Phase.VERIFY_SOURCE, Phase.VERIFY_TARGET})
_NO_DISK = frozenset({Disk.DISKLESS, Disk.FAILED})

# Looked up once: an enum member costs a class attribute lookup each time it is named, and
# these are named on every guest write.
_PRIMARY = Role.PRIMARY
_ESTABLISHED = Phase.ESTABLISHED
_SYNC_TARGET = Phase.SYNC_TARGET
_DATA = int(T.DATA)
_FUA = wire.FLAG_FUA


@dataclass(slots=True, eq=False)
class GuestWrite:
    """A guest write (DATA, TRIM or ZEROES) on the general path, until it is answered."""

    kind: T
    offset: int
    length: int
    fua: bool
    payload: bytes | memoryview  # DATA: the data; TRIM/ZEROES: the frame's u64 length
    done: Callable[[Any, BaseException | None], None]
    token: Any
    may_punch: bool = True
    fast_only: bool = False
    wid: int = 0
    al: tuple[int, int, ActivityLogView] | None = None  # pinned extents, and where
    started: bool = False  # admitted: it may touch the disks (range locks wait for it)
    local: int = _PENDING
    peer: int = _NONE
    needs_apply: bool = False  # the peer's copy is the only good one: wait for its apply
    error: BaseException | None = None
    disk_gen: int = -1  # which attachment of the local disk took the local write
    peer_counts: bool = False  # sent to a peer whose disk was UpToDate: its copy is good data


@dataclass(eq=False)
class RangeLock:
    """Rule ordered-read on a primary: `then` runs once the guest writes in flight to
    [start, end) are done; writes admitted after the lock wait for its release."""

    start: int
    end: int
    then: Callable[[RangeLock], None]  # given the lock, which it must release
    waiting_for: set[int] = field(default_factory=set)  # write ids
    acquired: bool = False
    blocked: list[GuestWrite] = field(default_factory=list)


@dataclass(eq=False)
class Sweep:
    kind: str  # "resync" or "verify"
    planner: SweepPlanner
    link_gen: int
    deferred: tuple[int, int, int] | None = None  # (rid, first, count) waiting for the rate
    found: int = 0  # verify: blocks that differ


@dataclass(slots=True, eq=False)
class ApplyJob:
    """A received frame waiting in the apply queue (secondary, or a SyncTarget)."""

    kind: T
    seq: int  # DATA/TRIM/ZEROES: the write's seq (0 for others); requests: their id
    offset: int
    length: int
    payload: bytes | memoryview = b""
    flags: int = 0
    link_gen: int = 0
    track: bool = False  # a write of a Diskless primary: marked out of sync first
    reply: Callable[[bytes | memoryview], None] | None = None  # an ordered read's answer
    fail: Callable[[], None] | None = None  # ... and what to send if the read fails


class ResourceCore:
    def __init__(self, node: str, cfg: ResourceConfig, peer_node: str, fx: Effects,
                 clock: Callable[[], float], gen: Generation, disk: Disk,
                 crashed_primary: bool, bitmap: Bitmap, al: ActivityLogView,
                 uuids: Callable[[], int] = new_uuid):
        self.node = node
        self.cfg = cfg
        self.name = cfg.name
        self.peer_node = peer_node
        self.size_bytes = cfg.size_bytes
        self.nblocks = cfg.size_bytes // BLOCK_BYTES
        self.fx = fx
        self.clock = clock
        self._new_uuid = uuids  # where generation UUIDs come from (the simulator: its seed)
        self.gen = gen
        self.disk = disk
        self.crashed_primary = crashed_primary
        self.bitmap: Bitmap | None = bitmap
        self.al: ActivityLogView | None = al
        self.role = Role.SECONDARY
        self.conn = Conn.CONNECTING
        self.phase = Phase.IDLE
        self.peer_role = Role.UNKNOWN
        self.peer_disk = Disk.UNKNOWN
        self.peer_gen: Generation | None = None
        self.peer_side: Side | None = None
        self.last_decision: Decision | None = None
        self.refusal = ""  # why the connection is StandAlone or was last refused
        self.counters = PeerCounters()
        self.tracker = WriteTracker()
        self.applyq = ApplyQueue()
        self.discard_my_data = False
        self.closing = False
        self.link_is_up = False
        self._link_gen = 0
        self._peer_chunks: list[tuple[int, bytes]] = []
        self._epoch_seen = 0  # secondary: highest epoch received from the primary
        self._epoch_base = 0
        self._next = 0  # ids for tokens, writes, requests
        self._ops: dict[int, Callable[[Any, BaseException | None], None]] = {}
        self._writes: dict[int, GuestWrite] = {}  # general-path writes not yet answered
        self._held: list[GuestWrite] = []  # waiting for the handshake (handshake-holds-writes)
        self._al_waiting: list[GuestWrite] = []  # waiting for activity-log extents
        self._al_busy = False  # an activation is on its way to the disk
        self._al_full = False  # the last one failed: every extent was pinned
        self._locks: list[RangeLock] = []
        self._rs_locks: dict[int, RangeLock] = {}  # primary SyncTarget: rid -> its range lock
        self._flushes: dict[int, int] = {}  # peer flush id -> its peer-flush generation
        self._guest_flushes: dict[int, list] = {}  # flush id -> [done, token, local, peer]
        self._reads: dict[int, tuple[Callable, Any, int, int]] = {}  # rid -> remote read
        self._jobs: dict[int, ApplyJob] = {}  # apply-queue key -> job
        self._pumping = False
        self._pump_again = False
        self._sweep: Sweep | None = None
        self._stale_answers: set[int] = set()  # requests of a stopped sweep, on this link
        self._rate = RateLimiter(cfg.resync_rate_bytes_per_s)
        self._diverge_pending = ""  # why the next diverging write starts a generation
        self._diverging: list[Callable[[], None]] = []  # writes waiting for that superblock
        self._disk_gen = 0  # counts detaches: a write's local copy counts on its own disk only
        self._detached: tuple[Generation, Disk] | None = None  # what the detached disk held
        self._detached_cap: Disk | None = None  # the best an attach may make of it (_detach)
        self._detached_unmarked = False  # ... and its metadata does not say Outdated yet
        self._outdating: list[Callable[[], None]] = []  # writes waiting for that mark
        self._invalidating: Callable[[], None] | None = None  # waits for the peer's applies
        self._promoting = False
        self._invalidate_seq = 0
        self._drain_waiters: list[GuestWrite] = []  # protocol A: waiting for the link
        # Rule peer-durable: extent -> the peer-flush generation its last write belongs to.
        self._peer_volatile: dict[int, int] = {}
        self._peer_flush_gen = 0  # peer flushes sent on this link
        self._peer_flush_timer = False
        self._watch: tuple | None = None  # the ack watchdog's last look at what is pending
        self._protocol_a = cfg.protocol == "A"
        self._protocol_b = cfg.protocol == "B"
        self._fast = False  # start_write's fast path may run (kept by _refresh)
        self._fast_apply = False  # the secondary's DATA fast path may run

    # --- small helpers ---------------------------------------------------------------------

    @property
    def repl(self) -> Repl:
        return _REPL[self.phase]

    @property
    def has_disk(self) -> bool:
        return self.disk not in _NO_DISK

    def _id(self) -> int:
        self._next += 1
        return self._next

    def _op(self, then: Callable[[Any, BaseException | None], None]) -> int:
        tok = self._id()
        self._ops[tok] = then
        return tok

    def disk_done(self, token: int, result: Any, exc: BaseException | None) -> None:
        """Event: a disk effect finished (RESULT: the data of a read)."""
        self._ops.pop(token)(result, exc)

    def meta_done(self, token: int, exc: BaseException | None) -> None:
        """Event: a metadata effect finished."""
        self._ops.pop(token)(None, exc)

    def _set(self, what: str, value: Role | Disk | Conn) -> None:
        attr = {"role": "role", "connection": "conn", "peer-role": "peer_role",
                "peer-disk": "peer_disk", "disk": "disk"}[what]
        old = getattr(self, attr)
        if old is value:
            return
        setattr(self, attr, value)
        self._refresh()
        self.fx.emit(Event(self.name, what, old.value, value.value))

    def _set_phase(self, phase: Phase) -> None:
        old = self.phase
        if old is phase:
            return
        self.phase = phase
        self._refresh()
        if _REPL[old] is not _REPL[phase]:
            self.fx.emit(Event(self.name, "replication", _REPL[old].value, _REPL[phase].value))

    def _refresh(self) -> None:
        """Keep the fast paths' one-attribute tests true exactly when they may run: a
        primary replicating to a peer with a disk, this disk UpToDate, no handshake, no
        invalidate under way (start_write); a secondary with a disk whose peer has one
        too (the DATA fast path)."""
        replicating = self.link_is_up and self.phase in DECIDED
        self._fast = (replicating and self.role is _PRIMARY and self.disk is Disk.UPTODATE
                      and self.peer_disk not in _NO_DISK and self._invalidating is None)
        self._fast_apply = (self.has_disk and self.peer_disk not in _NO_DISK
                            and self.role is not _PRIMARY)

    def _persist(self, then: Callable[[], None] | None = None, **extra: Any) -> None:
        """Write the superblock with the current generation and disk state."""
        if not self.has_disk:
            if then is not None:
                then()
            return
        changes = dict(uuid_current=self.gen.current, uuid_bitmap=self.gen.bitmap,
                       uuid_history=list(self.gen.history),
                       disk_state=DISK_PERSISTED[self.disk])
        changes.update(extra)

        def after(_r: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self._disk_failed(exc, "writing the superblock")
            if then is not None:
                then()
        self.fx.persist(self._op(after), changes)

    def _flush_bitmap(self, then: Callable[[], None] | None = None) -> None:
        """Persist the bitmap's changed pages, the data disk made durable first (rule
        durable-before-claim: a bit cleared for a block received from the peer reaches the
        disk only after the block does)."""
        if not self.has_disk:
            if then is not None:
                then()
            return

        def after(_r: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self._disk_failed(exc, "writing the dirty bitmap")
            if then is not None:
                then()
        self.fx.flush_bitmap(self._op(after))

    def _mark(self, offset: int, length: int) -> None:
        """The peer's disk misses this range (write-routing)."""
        if self.bitmap is not None and length:
            self.bitmap.set_range(offset, length)

    def _replicating(self) -> bool:
        """Guest writes go to the peer: a decided link to a peer with a disk."""
        return (self.link_is_up and self.phase in DECIDED and self.role is _PRIMARY
                and self.peer_disk not in _NO_DISK)

    # --- the guest's I/O (primary) -------------------------------------------------------------

    def start_write(self, offset: int, data: memoryview, fua: bool,
                    done: Callable[[Any, BaseException | None], None], token: Any) -> None:
        """A guest WRITE (BlockDevice.start_write). The common case, a page-cache write
        while the link replicates, this disk UpToDate, the extents hot in the activity log
        and no range lock in the way, runs here without a queue or a closure: written
        locally, its DATA frame queued, completed by the peer's WRITE_ACK (`_fast_acked`)
        in the loop pass that receives it. Measured (4 KiB random writes, QD16): the
        primary's CPU per write went from 15.4 to 12.7 us and IOPS from 58k to 65k against
        the path through a coroutine and a future. Anything else: `_start_general`."""
        n = len(data)
        if not self._fast or fua or n > INLINE_WRITE_BYTES_MAX or self._locks:
            self._start_general(GuestWrite(T.DATA, offset, n, fua, data, done, token))
            return
        if self._protocol_a and self.fx.link_congested():
            self._start_general(GuestWrite(T.DATA, offset, n, fua, data, done, token))
            return
        al = self.al
        first, last, active = al.al_pin_range(offset, n)  # type: ignore[union-attr]
        if not active:  # an activity-log update (on disk) first
            al.al_unpin_range(first, last)  # type: ignore[union-attr]
            self._start_general(GuestWrite(T.DATA, offset, n, fua, data, done, token))
            return
        w = self.tracker.submit(offset, n)
        if first == last:  # rule peer-durable, the one-extent case inline
            if first not in self._peer_volatile:
                self._peer_volatile_add(first)
            else:
                self._peer_volatile[first] = self._peer_flush_gen
        else:
            self._note_peer_volatile(offset, n)
        fx = self.fx
        fx.send_frame(_DATA, 0, w.seq, offset, w.epoch, data)
        if n >= LINK_FLUSH_BYTES_MIN:
            fx.flush_link()  # a big write: the peer starts on it while we write locally
        err = fx.pwrite_now(offset, data)
        if err is not None:
            # The local copy failed, the peer's may still land: the general path decides.
            g = GuestWrite(T.DATA, offset, n, fua, data, done, token,
                           al=(first, last, al),  # type: ignore[arg-type]
                           started=True, local=_FAILED, peer=_PENDING, needs_apply=True,
                           peer_counts=self.peer_disk is Disk.UPTODATE)
            g.wid = self._id()
            self._writes[g.wid] = g
            w.on_ack, w.ctx = self._general_acked, g
            self._disk_failed(err, f"writing {n} bytes at {offset}", offset, n)
            self._maybe_complete(g)
            return
        if not self._protocol_a:
            w.on_ack = self._fast_acked
            w.ctx = (done, token, first, last, al)
            return
        al.al_unpin_range(first, last)  # type: ignore[union-attr]  # protocol A: handed over
        self.tracker.close_epoch()
        done(token, None)

    def _fast_acked(self, w: PendingWrite, applied: bool) -> None:
        """The end of a fast-path write: the peer applied it (or never will: the link broke
        and the range is marked out of sync; this disk is UpToDate, so the guest's write
        is safe here)."""
        done, token, first, last, al = w.ctx
        al.al_unpin_range(first, last)
        if self._al_full:
            self._al_unpinned()
        self.tracker.close_epoch()
        if not applied and al is not self.al:
            # The local copy was written, but its disk has failed since: no copy counts.
            done(token, DeviceError(errno.EIO, f"{self.name}: the disk on {self.node} failed "
                                               f"and {self.peer_node} did not confirm a "
                                               f"write at {w.offset}"))
            return
        done(token, None)

    def start_trim(self, offset: int, length: int, fua: bool,
                   done: Callable[[Any, BaseException | None], None], token: Any) -> None:
        self._start_general(GuestWrite(T.TRIM, offset, length, fua, wire.u64(length), done,
                                       token))

    def start_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                     fast_only: bool, done: Callable[[Any, BaseException | None], None],
                     token: Any) -> None:
        self._start_general(GuestWrite(T.ZEROES, offset, length, fua, wire.u64(length), done,
                                       token, may_punch=may_punch, fast_only=fast_only))

    def _start_general(self, w: GuestWrite) -> None:
        if self.role is not _PRIMARY:
            w.done(w.token, DeviceError(errno.EPERM, f"resource {self.name} is not Primary "
                                                     f"on {self.node}"))
            return
        w.wid = self._id()
        self._writes[w.wid] = w
        if self.has_disk and self.al is not None:
            # Pinned now: no other write's activation may evict these extents while this
            # write, or the bitmap bit it may set, is not settled.
            first, last, _active = self.al.al_pin_range(w.offset, w.length)
            w.al = (first, last, self.al)
        if self.phase is Phase.HANDSHAKE:
            self._held.append(w)  # rule handshake-holds-writes
            return
        self._admit(w)

    def _admit(self, w: GuestWrite) -> None:
        """Range locks, then the activity log, then `_route`."""
        for lock in self._locks:
            if lock.start < w.offset + w.length and w.offset < lock.end:
                lock.blocked.append(w)
                return
        if w.al is not None and w.al[2] is self.al and self.has_disk:
            extents = list(range(w.al[0], w.al[1] + 1))
            if self.al.al_missing(extents):
                self._al_waiting.append(w)
                self._al_activate()
                return
            self.al.al_touch(extents)
        w.started = True
        self._route(w)

    def _al_activate(self) -> None:
        """One activity-log update at a time, for every write waiting for one. When every
        extent is pinned (ActivityLogFull) the writes wait for an unpin (`_al_unpinned`),
        and a peer flush is sent: extents held for the peer's durability free up then."""
        if self._al_busy or not self._al_waiting or self._al_full or self.al is None:
            return
        wanted: dict[int, None] = {}
        for w in self._al_waiting:
            assert w.al is not None
            wanted.update(dict.fromkeys(range(w.al[0], w.al[1] + 1)))
        missing = self.al.al_missing(list(wanted))
        if not missing:
            self._al_retry()
            return
        # An activation holds at most what fits; the rest waits for the next round.
        missing = missing[:max(1, self.cfg.al_extents // 2)]
        self._al_busy = True

        def after(_r: Any, exc: BaseException | None) -> None:
            self._al_busy = False
            if isinstance(exc, ActivityLogFull):
                al = self.al
                pins = al.al_pinned() if al is not None else {}
                if al is not None and any(e not in pins and e not in wanted
                                          for e in al.al_active()):
                    # Unpinned while the update ran (a peer flush acknowledged, writes
                    # done): nobody would call _al_unpinned again, retry now.
                    self._al_retry()
                    return
                self._al_full = True
                self._send_peer_flush()
            elif exc is not None:
                self._disk_failed(exc, "writing the activity log")
            self._al_retry()
        self.fx.activate_al(self._op(after), missing)

    def _al_retry(self) -> None:
        waiting, self._al_waiting = self._al_waiting, []
        for w in waiting:
            self._admit(w)
        self._al_activate()

    def _al_unpinned(self) -> None:
        if self._al_full:
            self._al_full = False
            self._al_retry()

    def _route(self, w: GuestWrite) -> None:
        """Rule write-routing."""
        if self.phase is Phase.HANDSHAKE:
            # (A write that waited, for the activity log or a new generation, while a link
            # came up.) The bitmap the peer got was taken before it: it waits for the
            # decision like any other write (rule handshake-holds-writes).
            self._held.append(w)
            return
        if not self.has_disk:
            if not (self._replicating() and self.peer_disk is Disk.UPTODATE):
                self._fail_write(w, f"{self.name}: no disk on {self.node} and "
                                    f"{self.peer_node} is not connected with an UpToDate disk")
                return
            self._detached = None  # data goes on without the detached disk: it is behind
            if self._detached_unmarked or self._outdating:
                self._outdate_detached(lambda: self._route(w))
                return
        if not self._replicating():
            if self.disk is not Disk.UPTODATE:
                self._fail_write(w, f"{self.name}: the disk on {self.node} is "
                                    f"{self.disk.value} and {self.peer_node}, which has the "
                                    f"good data, is not connected")
                return
            w.peer = _NONE
            if self._diverge_pending or self._diverging:
                self._diverge(lambda: self._route(w))
                return
            self._mark(w.offset, w.length)  # the peer misses this write
            self._write_local(w)
            return
        w.needs_apply = (not self.has_disk or self.disk is not Disk.UPTODATE
                         or self._invalidating is not None)
        if w.kind is T.ZEROES and w.fast_only and self.has_disk:
            # A fast zero that fails locally must not reach the peer: local first.
            self._write_local(w, then_replicate=True)
            return
        self._replicate(w)
        if self.has_disk:
            self._write_local(w)
        else:
            w.local = _SKIPPED
        self._maybe_complete(w)

    def _replicate(self, w: GuestWrite) -> None:
        pw = self.tracker.submit(w.offset, w.length)
        pw.on_ack, pw.ctx = self._general_acked, w
        w.peer = _PENDING if (not self._protocol_a or w.needs_apply) else _NONE
        w.peer_counts = self.peer_disk is Disk.UPTODATE
        self._note_peer_volatile(w.offset, w.length)
        self.fx.send_frame(w.kind, (_FUA if w.fua else 0)
                           | (0 if w.may_punch else wire.FLAG_NO_HOLE),
                           pw.seq, w.offset, pw.epoch, w.payload)
        if w.length >= LINK_FLUSH_BYTES_MIN and w.kind is T.DATA:
            self.fx.flush_link()
        if w.peer is _NONE and self.fx.link_congested():
            w.peer = _PENDING  # protocol A: bounded by the link's send buffer
            self._drain_waiters.append(w)

    def link_drained(self) -> None:
        """Event: the link's send buffer is below its limit again."""
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if w.peer is _PENDING:
                w.peer = _NONE
                self._maybe_complete(w)

    def _write_local(self, w: GuestWrite, then_replicate: bool = False) -> None:
        fx = self.fx
        w.disk_gen = self._disk_gen
        if w.kind is T.DATA and not w.fua and w.length <= INLINE_WRITE_BYTES_MAX:
            err = fx.pwrite_now(w.offset, w.payload)
            self._local_done(w, err, then_replicate)
            return

        def after(_r: Any, exc: BaseException | None) -> None:
            self._local_done(w, exc, then_replicate)
        tok = self._op(after)
        if w.kind is T.DATA:
            fx.disk_write(tok, w.offset, w.payload, w.fua)
        elif w.kind is T.TRIM:
            fx.disk_trim(tok, w.offset, w.length, w.fua)
        else:
            fx.disk_zeroes(tok, w.offset, w.length, w.fua, w.may_punch, w.fast_only)

    def _local_done(self, w: GuestWrite, exc: BaseException | None,
                    then_replicate: bool) -> None:
        if exc is None:
            w.local = _OK
        elif w.fast_only and getattr(exc, "errno", None) == errno.ENOTSUP:
            w.local, w.error = _FAILED, exc  # not a disk failure: this disk cannot zero fast
            w.peer = _NONE
            then_replicate = False
        else:
            w.local = _FAILED
            self._disk_failed(exc, f"writing {w.length} bytes at {w.offset}", w.offset,
                              w.length)
        if then_replicate and w.local is _OK:
            if self._replicating():
                self._replicate(w)
            else:
                self._mark(w.offset, w.length)
        self._maybe_complete(w)

    def _general_acked(self, pw: PendingWrite, applied: bool) -> None:
        w: GuestWrite = pw.ctx
        w.peer = _OK if applied else _FAILED
        if (applied and w.kind is T.DATA and self.phase is _SYNC_TARGET and w.needs_apply
                and w.local is _OK and w.disk_gen == self._disk_gen
                and self.bitmap is not None):
            self.bitmap.clear_range(w.offset, w.length)  # both disks hold it: no resync
        self._maybe_complete(w)

    def _maybe_complete(self, w: GuestWrite) -> None:
        if w.local is _PENDING or w.peer is _PENDING or w.wid not in self._writes:
            return
        exc = w.error
        if exc is None:
            # A local copy counts only while its disk is attached (not failed since).
            local_ok = w.local is _OK and w.disk_gen == self._disk_gen
            # ... and the peer's only on a disk that was UpToDate: a write that landed only
            # on a resync target's half-copied disk is on no good copy of the data.
            if not local_ok and not (w.peer is _OK and w.peer_counts):
                exc = DeviceError(errno.EIO, f"{self.name}: a write at {w.offset} reached no "
                                             f"disk (the disk on {self.node} is "
                                             f"{self.disk.value}, {self.peer_node} did not "
                                             f"confirm it)")
            elif w.needs_apply and w.peer is not _OK and local_ok:
                # This disk is not UpToDate: the resync overwrites this write here unless
                # the peer, whose copy is the good one, has it.
                exc = DeviceError(errno.EIO, f"{self.name}: {self.peer_node} did not confirm "
                                             f"a write at {w.offset} and the disk on "
                                             f"{self.node} is {self.disk.value}")
        self._finish_write(w, exc)

    def _fail_write(self, w: GuestWrite, message: str) -> None:
        w.started = True
        self._finish_write(w, DeviceError(errno.EIO, message))

    def _finish_write(self, w: GuestWrite, exc: BaseException | None) -> None:
        del self._writes[w.wid]
        if w.al is not None:
            first, last, al = w.al
            al.al_unpin_range(first, last)
            w.al = None
            self._al_unpinned()
        self.tracker.close_epoch()
        if self._locks:
            self._write_left_locks(w.wid)
        w.done(w.token, exc)

    def start_flush(self, done: Callable[[Any, BaseException | None], None],
                    token: Any) -> None:
        """FLUSH: every write answered before it is durable here and on a connected peer
        with a disk. Each part that fails detaches its disk; the flush fails only if no
        disk made the writes durable."""
        epoch = self.tracker.close_epoch()
        fid = self._id()
        entry = [done, token, _PENDING if self.has_disk else _SKIPPED, _NONE, self._disk_gen]
        self._guest_flushes[fid] = entry
        if self._replicating():
            entry[3] = _PENDING
            self._send_flush(fid, epoch)
        if self.has_disk:
            def after(_r: Any, exc: BaseException | None) -> None:
                if exc is not None:
                    entry[2] = _FAILED
                    self._disk_failed(exc, "flushing")
                else:
                    entry[2] = _OK
                self._flush_maybe_done(fid)
            self.fx.disk_flush(self._op(after))
        self._flush_maybe_done(fid)

    def _send_flush(self, fid: int, epoch: int) -> None:
        self._peer_flush_gen += 1
        self._flushes[fid] = self._peer_flush_gen
        self.fx.send_frame(T.FLUSH, 0, fid, 0, epoch)

    def _flush_maybe_done(self, fid: int) -> None:
        entry = self._guest_flushes.get(fid)
        if entry is None or entry[2] is _PENDING or entry[3] is _PENDING:
            return
        del self._guest_flushes[fid]
        done, token, local, peer, disk_gen = entry
        if disk_gen != self._disk_gen:
            local = _FAILED  # its disk failed since: what it made durable does not count
        exc = None
        if local is not _OK and peer is not _OK:
            exc = DeviceError(errno.EIO, f"{self.name}: the flush reached no disk (the disk "
                                         f"on {self.node} is {self.disk.value}, "
                                         f"{self.peer_node} did not confirm it)")
        done(token, exc)

    def read_local_ok(self, offset: int, length: int) -> bool:
        """Whether a guest read of this range may be served from the local disk."""
        if self.disk is Disk.UPTODATE:
            return True
        return (self.disk is Disk.INCONSISTENT and self.bitmap is not None
                and not self.bitmap.any_in_range(offset, length))

    def start_read(self, offset: int, length: int,
                   done: Callable[[Any, Any, BaseException | None], None], token: Any) -> None:
        """A guest read the local disk cannot serve (`read_local_ok` is false, or it
        failed): from the peer, through the link."""
        if self.role is not _PRIMARY:
            done(token, None, DeviceError(errno.EPERM, f"resource {self.name} is not Primary "
                                                       f"on {self.node}"))
            return
        if not (self.link_is_up and self.phase in DECIDED
                and self.peer_disk is Disk.UPTODATE):
            done(token, None, DeviceError(
                errno.EIO, f"{self.name}: blocks at {offset} are not on the disk of "
                           f"{self.node} ({self.disk.value}) and {self.peer_node} is not "
                           f"connected with an UpToDate disk"))
            return
        rid = self._id()
        self._reads[rid] = (done, token, offset, length)
        self.fx.send_frame(T.READ_REQUEST, 0, rid, offset, length)

    def local_read_failed(self, exc: BaseException, offset: int, length: int) -> None:
        """Event: a guest read of the local disk failed (the shell reads it directly):
        detach it; the shell retries the read through `start_read`."""
        self._disk_failed(exc, f"reading {length} bytes at {offset}", 0, 0)

    # --- rule peer-durable -------------------------------------------------------------------

    def _peer_volatile_add(self, extent: int) -> None:
        self._peer_volatile[extent] = self._peer_flush_gen
        self.al.al_pin_range(extent << AL_EXTENT_SHIFT, 1)  # type: ignore[union-attr]
        if not self._peer_flush_timer:
            self._peer_flush_timer = True
            self.fx.set_timer("peer-flush", PEER_FLUSH_INTERVAL_S)

    def _note_peer_volatile(self, offset: int, length: int) -> None:
        if not length or self.al is None:
            return
        gen = self._peer_flush_gen
        for e in range(offset >> AL_EXTENT_SHIFT, ((offset + length - 1) >> AL_EXTENT_SHIFT) + 1):
            if e in self._peer_volatile:
                self._peer_volatile[e] = gen
            else:
                self._peer_volatile_add(e)

    def _peer_durable(self, flush_gen: int) -> None:
        """The peer acknowledged a flush sent as generation FLUSH_GEN: writes sent before it
        are on its disk."""
        done = [e for e, g in self._peer_volatile.items() if g < flush_gen]
        for e in done:
            del self._peer_volatile[e]
            if self.al is not None:
                self.al.al_unpin_range(e, e)
        if done:
            self._al_unpinned()

    def _peer_volatile_lost(self) -> None:
        """The peer may have lost its page cache (link broken, disk gone): what it held
        only there is out of sync."""
        for e in list(self._peer_volatile):
            start = e << AL_EXTENT_SHIFT
            self._mark(start, min(AL_EXTENT_BYTES, self.size_bytes - start))
            if self.al is not None:
                self.al.al_unpin_range(e, e)
        had = bool(self._peer_volatile)
        self._peer_volatile.clear()
        if had:
            self._al_unpinned()

    def _send_peer_flush(self) -> None:
        if not (self._peer_volatile and self._replicating()):
            return
        if any(fid not in self._guest_flushes for fid in self._flushes):
            return  # one background flush at a time
        fid = self._id()
        self._send_flush(fid, self.tracker.close_epoch())

    # --- the link ------------------------------------------------------------------------------

    def link_up(self) -> None:
        """Event: a link to the peer is authenticated. Both sides send STATE and their
        bitmap; each decides on receiving the other's BITMAP|LAST."""
        self._link_gen += 1
        self.link_is_up = True
        self._set("connection", Conn.CONNECTED)
        self.refusal = ""
        self.peer_side = None
        self._peer_chunks = []
        # Epochs restart with each primary's link; offset them so the apply order stays
        # monotonic across links (older applies may still be running).
        self._epoch_base = self._epoch_seen + 1
        self._peer_flush_gen = 0
        self._diverge_pending = ""  # the handshake compares the generations afresh
        self._stale_answers.clear()
        self.counters = PeerCounters()
        self._set_phase(Phase.HANDSHAKE)
        self.fx.send_json(T.STATE, self._local_side().to_json())
        if self.bitmap is not None:
            data = memoryview(self.bitmap.to_bytes())
            for pos in range(0, len(data), BITMAP_CHUNK_BYTES):
                chunk = data[pos:pos + BITMAP_CHUNK_BYTES]
                if any(chunk):
                    self.fx.send_frame(T.BITMAP, 0, 0, pos, 0, chunk)
        self.fx.send_frame(T.BITMAP, wire.FLAG_LAST, 0, 0, 0)
        self._watch = None
        self.fx.set_timer("ack-watch", self.cfg.ack_timeout_s / 2)
        log.info("%s: connected to %s", self.name, self.peer_node)

    def link_down(self, reason: str) -> None:
        """Event: the link broke or was closed. What the peer did not confirm is out of
        sync; writes waiting for it complete without it."""
        if not self.link_is_up:
            return
        self._link_gen += 1
        self.link_is_up = False
        was = self.phase
        lost = self.tracker.link_lost()
        for w in lost:
            self._mark(w.offset, w.length)
        had_volatile = bool(self._peer_volatile)
        self._peer_volatile_lost()
        self._stop_sweep()
        for lock in list(self._rs_locks.values()):
            self._release(lock)  # guest writes waiting on a resync answer go on (or fail)
        self._rs_locks.clear()
        self._set_phase(Phase.IDLE)
        self._set("peer-role", Role.UNKNOWN)
        self._set("peer-disk", Disk.UNKNOWN)
        if self.conn is not Conn.STANDALONE:
            self._set("connection", Conn.CONNECTING)
        self.fx.cancel_timer("ack-watch")
        log.warning("%s: lost %s: %s; %d unacknowledged writes marked out of sync", self.name,
                    self.peer_node, reason, len(lost))
        if self.role is _PRIMARY and was in DECIDED and not self.closing:
            # The peer stops following: a new generation, tracked by the bitmap.
            self._diverge_pending = f"lost {self.peer_node}"
        if lost or had_volatile:
            self._flush_bitmap()
        # Last, with the state above settled: completions may run the NBD server, which may
        # start new writes (they go the no-link way now).
        flushes, self._flushes = self._flushes, {}
        for fid in flushes:
            entry = self._guest_flushes.get(fid)
            if entry is not None:
                entry[3] = _FAILED
                self._flush_maybe_done(fid)
        reads, self._reads = self._reads, {}
        for done, token, offset, _length in reads.values():
            done(token, None, DeviceError(errno.EIO, f"{self.name}: {self.peer_node} lost "
                                                     f"while reading at {offset}: {reason}"))
        if lost:
            # These complete without the peer: the data moves on without it, so the new
            # generation is durable first (rule new-generation).
            self._diverge(lambda: _complete_all(lost))
        self.link_drained()
        if self._invalidating is not None:
            self._invalidating()
        self._settle()

    def frame(self, f: Frame) -> None:
        """Event: a frame from the peer (the link checked its CRC). FRAMES decides."""
        entry = _BY_PHASE[self.phase].get(f.type)
        if entry is None:
            self._protocol_error(f"unexpected {f.type.name} frame in phase "
                                 f"{self.phase.value}")
            return
        role, handler = entry
        if role is not None and self.role is not role:
            if role is Role.SECONDARY:
                self._protocol_error(f"{f.type.name} frame while {self.node} is Primary: "
                                     f"both nodes are Primary")
            else:
                self._protocol_error(f"{f.type.name} frame while {self.node} is "
                                     f"{self.role.value}")
            return
        try:
            handler(self, f)
        except LinkError as e:
            self._protocol_error(str(e))

    def _protocol_error(self, why: str) -> None:
        log.error("%s: protocol error from %s: %s; dropping the link", self.name,
                  self.peer_node, why)
        self.fx.close_link(why, refuse=True)

    # --- connect handshake: STATE, BITMAP, decision --------------------------------------------

    def _local_side(self) -> Side:
        return Side(self.node, self.gen, self.disk if self.has_disk else Disk.DISKLESS,
                    self.role, self.crashed_primary,
                    self.bitmap.count() if self.bitmap is not None else 0,
                    self.discard_my_data, self.cfg.protocol)

    def _on_state_first(self, f: Frame) -> None:
        if self.peer_side is not None:
            raise LinkError("a second STATE during the handshake")
        self.peer_side = _side(f)
        self.peer_gen = self.peer_side.gen

    def _on_bitmap(self, f: Frame) -> None:
        if self.peer_side is None:
            raise LinkError("BITMAP before STATE")
        if f.flags & wire.FLAG_LAST:
            self._decide()
            return
        limit = (self.nblocks + 7) // 8
        if f.offset + len(f.payload) > limit or f.offset % BITMAP_CHUNK_BYTES:
            raise LinkError(f"BITMAP chunk at {f.offset} of {len(f.payload)} bytes is outside "
                            f"the {limit}-byte bitmap")
        self._peer_chunks.append((f.offset, bytes(f.payload)))

    def _decide(self) -> None:
        peer = self.peer_side
        assert peer is not None
        local = self._local_side()
        chunks, self._peer_chunks = self._peer_chunks, []
        if peer.protocol != self.cfg.protocol:
            why = (f"protocol {self.cfg.protocol} on {self.node} but {peer.protocol} on "
                   f"{peer.node}; set the same protocol in [resource.{self.name}] on both "
                   f"nodes and restart them")
            log.error("%s: refusing to replicate with %s: %s", self.name, peer.node, why)
            self.refusal = why
            self.fx.close_link(why, refuse=True)
            return
        d = decide(local, peer)
        self.last_decision = d
        self._set("peer-role", peer.role)
        self._set("peer-disk", peer.disk)
        log.info("%s: %s vs %s: %s", self.name, self.node, peer.node, d)
        self.fx.emit(Event(self.name, "decision", "", d.sync.name, str(d)))
        if self.discard_my_data:
            if d.rule.startswith("discard-my-data") or d.sync is Sync.BOTH_DISCARD:
                log.warning("%s: --discard-my-data: %s", self.name, d)
            else:
                log.warning("%s: --discard-my-data ignored: there was no split brain to "
                            "resolve (%s)", self.name, d)
            self.discard_my_data = False
        if not d.sync.connects or (peer.role is _PRIMARY and self.role is _PRIMARY):
            why = str(d) if not d.sync.connects else "both nodes are Primary"
            if d.sync is Sync.BOTH_DISCARD:
                fix = (f"run 'rblock connect {self.name} --discard-my-data' on the node whose "
                       f"changes are to be thrown away only, and 'rblock connect "
                       f"{self.name}' on the other")
            else:
                fix = (f"resolve with 'rblock connect {self.name} --discard-my-data' on the "
                       f"node whose changes are to be thrown away, then 'rblock connect "
                       f"{self.name}' on the other")
            log.error("%s: refusing to replicate with %s: %s. Data on both nodes is kept; %s",
                      self.name, peer.node, why, fix)
            self.refusal = why
            self._set("connection", Conn.STANDALONE)
            self.fx.emit(Event(self.name, "split-brain", "", why))
            self.fx.send_json(T.DISCONNECT, {"reason": why})
            self.fx.close_link(why)
            return
        bitmap = self.bitmap
        if d.sync in (Sync.BITMAP_SOURCE, Sync.BITMAP_TARGET) and bitmap is not None:
            peer_bits = bytearray(bitmap.nbytes)
            for pos, data in chunks:
                peer_bits[pos:pos + len(data)] = data
            bitmap.merge(bytes(peer_bits))
        elif d.sync in (Sync.FULL_SOURCE, Sync.FULL_TARGET) and bitmap is not None:
            bitmap.set_range(0, self.size_bytes)
        if d.sync in (Sync.BITMAP_TARGET, Sync.FULL_TARGET):
            self._begin_sync_target()
        elif d.sync in (Sync.BITMAP_SOURCE, Sync.FULL_SOURCE):
            self._set_phase(Phase.SYNC_SOURCE)
            self._set("peer-disk", Disk.INCONSISTENT)
            self.counters.reset_resync(bitmap.count() if bitmap is not None else 0)
        elif d.sync is Sync.NONE:
            # The table says "no sync" only when neither side has a block out of sync
            # (rule same-current; tested with hypothesis): anything else is a bug in it.
            assert local.out_of_sync_blocks == 0 and peer.out_of_sync_blocks == 0, \
                f"{d} with {local.out_of_sync_blocks} + {peer.out_of_sync_blocks} blocks " \
                f"out of sync"
            self._set_phase(Phase.ESTABLISHED)
            self.crashed_primary = False
            self._catch_up(peer)
        elif d.sync is Sync.DISKLESS:
            if not self.has_disk and not self._may_use(peer):
                why = (f"{peer.node}'s data ({peer.gen.current:016X}, {peer.disk.value}) is "
                       f"not the data {self.node} served ({self.gen.current:016X}) before its "
                       f"disk went away: it misses writes that only that disk holds; attach "
                       f"that disk ('rblock attach {self.name}') and connect")
                log.error("%s: refusing to serve through %s: %s", self.name, peer.node, why)
                self.refusal = why
                self._set("connection", Conn.STANDALONE)
                self.fx.send_json(T.DISCONNECT, {"reason": why})
                self.fx.close_link(why)
                return
            if not self.has_disk:
                self.gen = peer.gen  # the data this node serves from now on
            self._set_phase(Phase.ESTABLISHED)
            if peer.disk is Disk.DISKLESS:
                self._diverge_pending = f"{peer.node} has no disk"
        else:  # NO_DATA / NO_GOOD_DATA: connected, nothing flows until someone has data
            self._set_phase(Phase.ESTABLISHED)
            self._audit_established(str(d), peer.out_of_sync_blocks)
        self._settle()

    def _may_use(self, peer: Side) -> bool:
        """A Diskless node serves through PEER only if the peer's disk is UpToDate and holds
        the data this node last served, or data that moved on from it (DRBD's exposed
        data UUID): never a copy that is behind."""
        if peer.disk is not Disk.UPTODATE:
            return True  # nothing is served through it anyway (write-routing)
        mine = self.gen.current
        return (self.gen.fresh or peer.gen.current == mine or peer.gen.bitmap == mine
                or mine in peer.gen.history)

    def _settle(self) -> None:
        """The handshake is over (or the link is gone): held guest writes go on."""
        held, self._held = self._held, []
        for w in held:
            self._admit(w)

    def _audit_established(self, why: str, peer_blocks: int = 0) -> None:
        """Established means writes flow and no resync runs, so blocks still marked out of
        sync then stay different until the next connect. That is legitimate after a verify
        (as in DRBD, the operator reconnects to resync what it found) or a write the peer
        failed to apply, and unavoidable when no node has consistent data, but it must never
        pass unnoticed: an error in the log and an event, not an assertion."""
        blocks = self.bitmap.count() if self.bitmap is not None else 0
        if self.phase is not _ESTABLISHED or not (blocks or peer_blocks):
            return
        if self.peer_disk in _NO_DISK or not self.has_disk:
            return  # tracking for a missing disk: that is what the bits are for
        log.error("%s: Established with %s, with %d blocks (%d bytes) out of sync here and "
                  "%d on %s, and no resync running (%s): they stay different until a resync; "
                  "run 'rblock disconnect %s' and 'rblock connect %s' once a node has good data",
                  self.name, self.peer_node, blocks, blocks * BLOCK_BYTES, peer_blocks,
                  self.peer_node, why, self.name, self.name)
        self.fx.emit(Event(self.name, "out-of-sync", "", str(blocks * BLOCK_BYTES), why))

    def _on_state(self, f: Frame) -> None:
        """A later STATE: the peer's role or disk changed."""
        side = _side(f)
        old = self.peer_side
        self.peer_side = side
        self.peer_gen = side.gen
        if side.role is _PRIMARY and self.role is _PRIMARY:
            self._protocol_error("both nodes are Primary")
            return
        self._set("peer-role", side.role)
        if side.disk is Disk.DISKLESS and (old is None or old.disk is not Disk.DISKLESS):
            self._peer_lost_disk()
        self._set("peer-disk", side.disk)
        if self.phase is _ESTABLISHED:
            self._catch_up(side)
        if self.phase in (Phase.VERIFY_SOURCE, Phase.VERIFY_TARGET) and old is not None \
                and old.role is not side.role:
            self._end_verify("a node changed its role")

    def _catch_up(self, peer: Side) -> None:
        """An Outdated disk that holds exactly what a connected UpToDate peer holds (the same
        generation, nothing out of sync on either side) is UpToDate again."""
        if (self.disk is Disk.OUTDATED and peer.disk is Disk.UPTODATE
                and peer.gen.current == self.gen.current and not peer.out_of_sync_blocks
                and self.bitmap is not None and not self.bitmap.count()):
            log.info("%s: the disk on %s holds what %s holds: UpToDate again", self.name,
                     self.node, peer.node)
            self._set("disk", Disk.UPTODATE)
            self._persist()
            self.fx.send_json(T.STATE, self._local_side().to_json())

    def _peer_lost_disk(self) -> None:
        """The peer detached its disk: nothing to sync with it; what it held only in its page
        cache is out of sync here; a new generation starts, tracked by the bitmap."""
        log.warning("%s: %s has no disk any more: it uses this node's disk", self.name,
                    self.peer_node)
        self._peer_volatile_lost()
        if self.phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET, Phase.VERIFY_SOURCE,
                          Phase.VERIFY_TARGET):
            self._stop_sweep()
            self._set_phase(Phase.ESTABLISHED)
        self._diverge_pending = f"{self.peer_node} lost its disk"
        self._refresh()

    def _outdate_detached(self, then: Callable[[], None]) -> None:
        """Before the first write goes on without the detached disk, its metadata says
        Outdated (if it can still be written), so that the disk, opened again after a
        restart, is never taken for the newer data. THEN runs once that is done, or failed:
        a disk whose metadata fails too is kept from promotion by fencing, not here."""
        self._outdating.append(then)
        if len(self._outdating) > 1:
            return

        def done(_r: Any, exc: BaseException | None) -> None:
            self._detached_unmarked = False
            if exc is not None:
                log.error("%s: could not mark the detached disk Outdated (%s): after a "
                          "restart without %s it could be taken for good data", self.name,
                          exc, self.peer_node)
            waiting, self._outdating = self._outdating, []
            for fn in waiting:
                fn()
        self.fx.outdate_detached(self._op(done))

    def _diverge(self, then: Callable[[], None]) -> None:
        """Rule new-generation (DRBD's new-current-UUID): the first write this disk takes
        that the peer's misses starts a new generation, tracked by the bitmap, so the
        peer's disk is resynced when it is back; and that generation is durable before the
        write lands, so a crash cannot hide that the data moved on (which would let the
        peer's older copy win the next connect). Lazily, at that first write, not when the
        peer went away: a node that took no write since has not diverged, and two nodes
        that both rotated without writing would look like a split brain. THEN runs once
        it is durable (at once if nothing is pending)."""
        if not self._diverge_pending and not self._diverging:
            then()
            return
        self._diverging.append(then)
        if len(self._diverging) > 1:
            return  # the superblock is on its way
        why, self._diverge_pending = self._diverge_pending, ""
        if self.disk is Disk.UPTODATE:
            # Even while a bitmap is already tracked (a resync was under way): the peer
            # may hold this very generation by now (a resync that finished without us
            # hearing of it), and must never pass for holding what comes next.
            self.gen = self.gen.rotated(self._new_uuid())
            log.info("%s: new generation %016X (%s)", self.name, self.gen.current, why)

        def durable() -> None:
            waiting, self._diverging = self._diverging, []
            for fn in waiting:
                fn()
        self._persist(durable)

    # --- resync: the target drives --------------------------------------------------------------

    def _begin_sync_target(self) -> None:
        self._set_phase(Phase.SYNC_TARGET)
        self._set("disk", Disk.INCONSISTENT)
        bitmap = self.bitmap
        assert bitmap is not None
        blocks = bitmap.count()
        self.counters.reset_resync(blocks)
        log.info("%s: resync from %s: %d blocks (%d bytes) out of sync", self.name,
                 self.peer_node, blocks, blocks * BLOCK_BYTES)
        gen = self._link_gen
        # Rule durable-before-claim, the other way round: Inconsistent, and the bits of what
        # is to come, are on disk before the first resync block lands here.

        def go() -> None:
            if self._link_gen == gen and self.phase is Phase.SYNC_TARGET:
                self._start_resync(bitmap)
        self._persist(lambda: self._flush_bitmap(go))

    def _start_resync(self, bitmap: Bitmap) -> None:
        self._start_sweep("resync", SweepPlanner(self.nblocks, bitmap.next_run, ids=self._id))

    def _start_sweep(self, kind: str, planner: SweepPlanner) -> None:
        self._stop_sweep()
        self._sweep = Sweep(kind, planner, self._link_gen)
        if kind == "resync":
            self.fx.set_timer("bitmap-flush", BITMAP_FLUSH_INTERVAL_S)
        self._sweep_pump()

    def _stop_sweep(self) -> None:
        s = self._sweep
        if s is not None:
            self.fx.cancel_timer("sweep")
            self.fx.cancel_timer("bitmap-flush")
            if s.link_gen == self._link_gen:
                # Answers to these may still be on the wire: dropped when they arrive.
                self._stale_answers.update(s.planner.inflight)
        self._sweep = None
        # Guest writes held until an answer is applied go on: no answer will be applied now.
        locks, self._rs_locks = self._rs_locks, {}
        for lock in locks.values():
            self._release(lock)

    def _sweep_pump(self) -> None:
        """Send resync or verify requests: at most RESYNC_INFLIGHT_MAX in flight, at the
        configured rate (a request waits for the rate, charged when it is planned)."""
        s = self._sweep
        while s is not None and s is self._sweep and s.link_gen == self._link_gen:
            if s.deferred is not None:
                return  # the "sweep" timer sends it
            nxt = s.planner.next_request()
            if nxt is None:
                if not s.planner.inflight:
                    self._sweep_finished(s)
                return
            delay = self._rate.take(self.clock(), nxt[2] * BLOCK_BYTES)
            if delay > 0:
                s.deferred = nxt
                self.fx.set_timer("sweep", delay)
                return
            self._sweep_issue(s, *nxt)

    def _sweep_issue(self, s: Sweep, rid: int, first: int, count: int) -> None:
        offset, length = first * BLOCK_BYTES, count * BLOCK_BYTES
        if self.role is _PRIMARY:
            # A primary's guest writes may land in the range: rule ordered-read.
            self._lock_range(offset, offset + length,
                             lambda lock: self._sweep_read(s, rid, offset, length, lock))
        else:
            self._sweep_read(s, rid, offset, length, None)

    def _sweep_read(self, s: Sweep, rid: int, offset: int, length: int,
                    lock: RangeLock | None) -> None:
        def after(data: Any, exc: BaseException | None) -> None:
            if exc is not None:
                if lock is not None:
                    self._release(lock)
                self._disk_failed(exc, f"reading {length} bytes at {offset} for the "
                                       f"{s.kind}")
                return
            if s is not self._sweep or s.link_gen != self._link_gen:
                if lock is not None:
                    self._release(lock)
                return
            ftype = T.RS_REQUEST if s.kind == "resync" else T.VERIFY_REQUEST
            self.fx.send_frame(ftype, 0, rid, offset, length, _block_crcs(data))
            if lock is not None:
                if s.kind == "resync":
                    # A primary SyncTarget (after invalidate or attach): later guest writes
                    # to the range wait until the answer is applied here, so an answer never
                    # overwrites a newer guest write.
                    self._rs_locks[rid] = lock
                else:
                    self._release(lock)  # verify: the request is in the stream before them
        self.fx.disk_read(self._op(after), offset, length, True)

    def _sweep_answered(self, rid: int) -> None:
        lock = self._rs_locks.pop(rid, None)
        if lock is not None:
            self._release(lock)
        s = self._sweep
        if s is not None and rid in s.planner.inflight:
            s.planner.done(rid)
            self._sample_progress()
            self._sweep_pump()

    def _sweep_finished(self, s: Sweep) -> None:
        self._stop_sweep()
        if s.kind == "verify":
            self._end_verify(f"{s.found} blocks differ")
            return
        bitmap = self.bitmap
        assert bitmap is not None
        if bitmap.count():
            # Blocks behind the sweep were marked again (a failed apply): another pass.
            self._start_resync(bitmap)
            return
        gen = self._link_gen
        peer_gen = self.peer_gen
        assert peer_gen is not None

        def flushed(_r: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self._disk_failed(exc, "flushing the resynced data")
                return
            if self._link_gen != gen or self.phase is not Phase.SYNC_TARGET:
                return  # interrupted; the next connection resumes from the bitmap
            self.gen = self.gen.synced_from(peer_gen)
            self.crashed_primary = False
            # The target holds the source's data now, and what the source knows of it.
            source = self.peer_side
            self._set("disk", Disk.OUTDATED if source is not None
                      and source.disk is Disk.OUTDATED else Disk.UPTODATE)
            self._flush_bitmap(lambda: self._persist(done, role_primary=self.role is _PRIMARY))

        def done() -> None:
            if self._link_gen != gen or self.phase is not Phase.SYNC_TARGET:
                return
            self.fx.send_json(T.SYNC_DONE, {"gen": self.gen.to_json(),
                                            "disk": self.disk.value})
            self._set_phase(Phase.ESTABLISHED)
            self._audit_established("blocks marked again after the resync")
            self.fx.emit(Event(self.name, "sync-done", "", "target"))
            log.info("%s: resync from %s finished", self.name, self.peer_node)
        # Rule durable-before-claim: the resynced blocks are on disk before the bitmap and
        # the superblock say the disk is UpToDate.
        self.fx.disk_flush(self._op(flushed))

    def _sample_progress(self) -> None:
        """Remember (time, blocks left) now and then: status derives rate and ETA from it."""
        now = self.clock()
        h = self.counters.history
        if not h or now - h[-1][0] >= PROGRESS_SAMPLE_S:
            h.append((now, self._sweep_left()))
            del h[:-PROGRESS_SAMPLES_MAX]

    def _sweep_left(self) -> int:
        s = self._sweep
        if s is not None and s.kind == "verify":
            return max(0, self.nblocks - s.planner.cursor)
        return self.bitmap.count() if self.bitmap is not None else 0

    def _on_rs_request(self, f: Frame) -> None:
        """Source: answer with the data, or RS_SAME when every block's checksum matches."""
        offset, length, rid, crcs = f.offset, f.aux, f.id, bytes(f.payload)
        self._check_range(offset, length)
        if not self.has_disk:
            return  # detached: the STATE that says so stops the peer's resync

        def answer(data: bytes | memoryview) -> None:
            if _block_crcs(data) == crcs:
                self.fx.send_frame(T.RS_SAME, 0, rid, offset, length)
            else:
                self.fx.send_frame(T.RS_DATA, 0, rid, offset, 0, data)
                self.counters.resync_sent_bytes += len(data)
            if self.bitmap is not None:
                self.bitmap.clear_range(offset, length)
            self._sample_progress()
        self._ordered_read(offset, length, answer)

    def _on_rs_data(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not _SYNC_TARGET:
            return
        self.counters.resync_received_bytes += len(f.payload)
        self._queue(ApplyJob(T.RS_DATA, f.id, f.offset, len(f.payload), f.payload,
                             link_gen=self._link_gen), barrier=False)

    def _on_rs_same(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not _SYNC_TARGET:
            return
        self._queue(ApplyJob(T.RS_SAME, f.id, f.offset, f.aux, link_gen=self._link_gen),
                    barrier=False, data=False)

    def _answer_expected(self, rid: int) -> bool:
        """Whether an answer to sweep request RID is to be used (it may be one to a sweep
        stopped meanwhile, dropped; one never asked for is a protocol error)."""
        s = self._sweep
        if s is not None and rid in s.planner.inflight:
            return True
        if rid in self._stale_answers:
            self._stale_answers.discard(rid)
            return False
        raise LinkError(f"answer to request {rid}, which is not in flight")

    def _on_sync_done(self, f: Frame) -> None:
        """Source: the target has everything; stop tracking."""
        body = f.json()
        try:
            self.peer_gen = Generation.from_json(body["gen"])
            peer_disk = Disk(body["disk"])
        except (KeyError, ValueError, TypeError) as e:
            raise LinkError(f"malformed SYNC_DONE: {e}") from None
        self.gen = self.gen.sync_source_done()
        if self.bitmap is not None:
            self.bitmap.clear_range(0, self.size_bytes)
        self.crashed_primary = False
        self._set("peer-disk", peer_disk)  # UpToDate, or Outdated like this disk
        self._set_phase(Phase.ESTABLISHED)
        self.fx.emit(Event(self.name, "sync-done", "", "source"))
        log.info("%s: resync to %s finished", self.name, self.peer_node)
        self._persist(lambda: self._flush_bitmap())

    # --- verify -------------------------------------------------------------------------------

    def _start_verify(self) -> None:
        self.counters.reset_resync(self.nblocks)
        self._set_phase(Phase.VERIFY_SOURCE)
        self._start_sweep("verify", SweepPlanner(self.nblocks, all_blocks(self.nblocks),
                                                 wrap=False, ids=self._id))

    def _on_verify_request(self, f: Frame) -> None:
        """VerifyT: compare the sender's checksums with this disk, in the order of the
        writes on the link (rule ordered-read: no false difference under guest writes)."""
        offset, length, rid, theirs = f.offset, f.aux, f.id, bytes(f.payload)
        self._check_range(offset, length)
        if not self.has_disk:
            return  # detached: the STATE that says so stops the peer's verify
        if self.phase is _ESTABLISHED:
            self._set_phase(Phase.VERIFY_TARGET)

        def answer(data: bytes | memoryview) -> None:
            mine = _block_crcs(data)
            differ = 0
            for i in range(len(mine) // 4):
                if mine[4 * i:4 * i + 4] != theirs[4 * i:4 * i + 4]:
                    differ |= 1 << i
                    self._mark(offset + i * BLOCK_BYTES, BLOCK_BYTES)
            self.fx.send_frame(T.VERIFY_REPLY, 0, rid, offset, differ, wire.u64(length))
        self._ordered_read(offset, length, answer)

    def _on_verify_reply(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not Phase.VERIFY_SOURCE:
            return
        s = self._sweep
        assert s is not None
        differ = f.aux
        for i in range(f.u64() // BLOCK_BYTES):
            if differ >> i & 1:
                self._mark(f.offset + i * BLOCK_BYTES, BLOCK_BYTES)
                s.found += 1
        self._sweep_answered(f.id)

    def _on_verify_start(self, f: Frame) -> None:
        """The peer (a Secondary) asked for a verify: a Primary runs it, so its checksums
        come from reads ordered with its guest writes."""
        if self.phase is _ESTABLISHED and self.role is _PRIMARY and self.has_disk:
            log.info("%s: verify requested by %s", self.name, self.peer_node)
            self._start_verify()
        else:
            log.warning("%s: verify requested by %s ignored: this node is %s, %s", self.name,
                        self.peer_node, self.role.value, self.repl.value)

    def _on_verify_done(self, f: Frame) -> None:
        self._set_phase(Phase.ESTABLISHED)
        self._audit_established("verify found differences")
        self._flush_bitmap()

    def _end_verify(self, outcome: str) -> None:
        if self.phase is Phase.VERIFY_SOURCE:
            self._stop_sweep()
            log.info("%s: verify done: %s (marked out of sync; disconnect and connect to "
                     "resync them)", self.name, outcome)
            self.fx.send_json(T.VERIFY_DONE, {"outcome": outcome})
        self._set_phase(Phase.ESTABLISHED)
        self._audit_established("verify found differences")
        self._flush_bitmap()

    # --- ordered reads (rule ordered-read) -------------------------------------------------------

    def _ordered_read(self, offset: int, length: int,
                      answer: Callable[[bytes | memoryview], None],
                      fail: Callable[[], None] | None = None) -> None:
        """Read the range as the peer will see it once every frame sent so far is applied
        there, then ANSWER (which queues the reply) unless the link changed meanwhile; if
        the read fails, the disk is detached and FAIL answers instead."""
        gen = self._link_gen
        if self.role is _PRIMARY:
            def locked(lock: RangeLock) -> None:
                def after(data: Any, exc: BaseException | None) -> None:
                    if exc is not None:
                        self._disk_failed(exc, f"reading {length} bytes at {offset}")
                        if fail is not None and gen == self._link_gen:
                            fail()
                    elif gen == self._link_gen:
                        answer(data)
                    # Only now: a write held by the lock must reach the link after the answer.
                    self._release(lock)
                self.fx.disk_read(self._op(after), offset, length, True)
            self._lock_range(offset, offset + length, locked)
            return
        self._queue(ApplyJob(T.READ_REQUEST, 0, offset, length, link_gen=gen, reply=answer,
                             fail=fail), barrier=False, data=False)

    def _lock_range(self, start: int, end: int,
                    then: Callable[[RangeLock], None]) -> RangeLock:
        lock = RangeLock(start, end, then)
        lock.waiting_for = {wid for wid, w in self._writes.items()
                            if w.started and w.offset < end and start < w.offset + w.length}
        self._locks.append(lock)
        if not lock.waiting_for:
            lock.acquired = True
            then(lock)
        return lock

    def _write_left_locks(self, wid: int) -> None:
        for lock in list(self._locks):
            if wid in lock.waiting_for:
                lock.waiting_for.discard(wid)
                if not lock.waiting_for and not lock.acquired:
                    lock.acquired = True
                    lock.then(lock)

    def _release(self, lock: RangeLock) -> None:
        if lock in self._locks:
            self._locks.remove(lock)
        blocked, lock.blocked = lock.blocked, []
        for w in blocked:
            self._admit(w)

    # --- the secondary: applying the primary's writes ------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise LinkError(f"peer asked for {length} bytes at {offset}, past the end of "
                            f"{self.name} ({self.size_bytes} bytes)")

    def _on_data(self, f: Frame) -> None:
        seq, offset, data = f.id, f.offset, f.payload
        n = len(data)
        if self._protocol_b:
            self.fx.send_frame(T.RECV_ACK, 0, seq, 0, 0)
        if offset + n > self.size_bytes:
            raise LinkError(f"peer wrote {n} bytes at {offset}, past the end of {self.name} "
                            f"({self.size_bytes} bytes)")
        if (self._fast_apply and not f.flags & _FUA and n <= INLINE_WRITE_BYTES_MAX
                and not self.applyq):
            # The common case: nothing received earlier is still being applied (so no
            # ordering rule can hold this write back) and the write is a small page-cache
            # one. Apply it now, on this stack: no queue entry, no continuation.
            epoch = self._epoch_base + f.aux
            if epoch > self._epoch_seen:
                self._epoch_seen = epoch
            err = self.fx.pwrite_now(offset, data)
            if err is not None:
                self._disk_failed(err, f"applying {n} bytes at {offset}", offset, n)
                self.fx.send_frame(T.NEG_ACK, 0, seq, 0, err.errno or errno.EIO)
                return
            if self.phase is _SYNC_TARGET:
                self.bitmap.clear_range(offset, n)  # type: ignore[union-attr]
            self.fx.send_write_ack(seq)
            return
        self._queue(ApplyJob(T.DATA, seq, offset, n, data, f.flags, self._link_gen,
                             track=self.peer_disk is Disk.DISKLESS), epoch=f.aux)

    def _on_trim_or_zeroes(self, f: Frame) -> None:
        if self._protocol_b:
            self.fx.send_frame(T.RECV_ACK, 0, f.id, 0, 0)
        length = f.u64()
        if f.offset + length > self.size_bytes:
            raise LinkError(f"peer wrote {length} bytes at {f.offset}, past the end of "
                            f"{self.name} ({self.size_bytes} bytes)")
        self._queue(ApplyJob(f.type, f.id, f.offset, length, b"", f.flags, self._link_gen,
                             track=self.peer_disk is Disk.DISKLESS), epoch=f.aux, data=False)

    def _on_flush(self, f: Frame) -> None:
        self._queue(ApplyJob(T.FLUSH, f.id, 0, 0, link_gen=self._link_gen), epoch=f.aux,
                    barrier=True, data=False)

    def _on_out_of_sync(self, f: Frame) -> None:
        """The peer could not write this range (its disk failed): it differs here, and
        this disk's data moves on without the peer's (rule new-generation)."""
        offset, length = f.offset, f.aux
        self._check_range(offset, length)
        self._diverge_pending = self._diverge_pending or f"{self.peer_node} failed a write"
        self._diverge(lambda: self._mark(offset, length))

    def _queue(self, job: ApplyJob, epoch: int | None = None, barrier: bool = False,
               data: bool = True) -> None:
        if epoch is None:
            e = self._epoch_seen
        else:
            e = max(self._epoch_base + epoch, self._epoch_seen)
        self._epoch_seen = e
        entry = self.applyq.add(e, job.offset, job.length, barrier, job.length if data else 0)
        self._jobs[entry.key] = job
        if self.applyq.full:
            self.fx.pause_link()
        self._pump()

    def _pump(self) -> None:
        """Start every queued apply that may start; re-entrant calls just ask for another
        round (an apply that completes synchronously would otherwise recurse)."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                for entry in self.applyq.startable():
                    self._run_job(entry.key, self._jobs.pop(entry.key))
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _run_job(self, key: int, job: ApplyJob) -> None:
        if not self.has_disk:
            self._job_done(key, job, None, OSError(errno.ENODEV, "no disk"))
            return
        if job.track:
            # The primary had no disk when it sent this write: this node tracks what it
            # misses, durably before the write lands (a crash here must not forget the bits:
            # there is no activity log on this side), in a generation of its own.
            job.track = False

            def tracked() -> None:
                self._mark(job.offset, job.length)
                self._flush_bitmap(lambda: self._run_job(key, job))
            self._diverge(tracked)
            return
        fx = self.fx
        kind = job.kind
        if kind is T.RS_SAME:
            self._job_done(key, job, None, None)
            return
        if kind in (T.DATA, T.RS_DATA):
            self._run_write(key, job)
            return

        def after(result: Any, exc: BaseException | None) -> None:
            self._job_done(key, job, result, exc)
        tok = self._op(after)
        if kind is T.FLUSH:
            fx.disk_flush(tok)
        elif kind is T.TRIM:
            fx.disk_trim(tok, job.offset, job.length, bool(job.flags & _FUA))
        elif kind is T.ZEROES:
            fx.disk_zeroes(tok, job.offset, job.length, bool(job.flags & _FUA),
                           not job.flags & wire.FLAG_NO_HOLE, False)
        else:  # READ_REQUEST (an ordered read for a reply)
            fx.disk_read(tok, job.offset, job.length, True)

    def _run_write(self, key: int, job: ApplyJob) -> None:
        fua = bool(job.flags & _FUA)
        if not fua and job.length <= INLINE_WRITE_BYTES_MAX:
            self._job_done(key, job, None, self.fx.pwrite_now(job.offset, job.payload))
            return

        def after(_r: Any, exc: BaseException | None) -> None:
            self._job_done(key, job, None, exc)
        self.fx.disk_write(self._op(after), job.offset, job.payload, fua)

    def _job_done(self, key: int, job: ApplyJob, result: Any, exc: BaseException | None) -> None:
        self.applyq.done(key)
        fx = self.fx
        kind = job.kind
        current = job.link_gen == self._link_gen and self.link_is_up
        if exc is not None and self.has_disk:
            self._disk_failed(exc, f"applying {kind.name} at {job.offset}", job.offset,
                              job.length)
        err = (getattr(exc, "errno", None) or errno.EIO) if exc is not None else 0
        if current:
            if kind in (T.DATA, T.TRIM, T.ZEROES):
                if err:
                    fx.send_frame(T.NEG_ACK, 0, job.seq, 0, err)
                else:
                    if kind is T.DATA and self.phase is _SYNC_TARGET and self.bitmap is not None:
                        self.bitmap.clear_range(job.offset, job.length)  # fully covered blocks
                    fx.send_write_ack(job.seq)
            elif kind is T.FLUSH:
                fx.send_frame(T.FLUSH_ACK, 0, job.seq, 0, err)
            elif kind in (T.RS_DATA, T.RS_SAME):
                if not err and self.bitmap is not None:
                    self.bitmap.clear_range(job.offset, job.length)
                self._sweep_answered(job.seq)
            elif kind is T.READ_REQUEST:
                if not err:
                    job.reply(result)  # type: ignore[misc]
                elif job.fail is not None:
                    job.fail()
            if not self.applyq.full:
                fx.resume_link()
        self._pump()

    def _on_read_request(self, f: Frame) -> None:
        rid, offset, length = f.id, f.offset, f.aux
        self._check_range(offset, length)
        if not self.has_disk or self.disk is not Disk.UPTODATE:
            self.fx.send_frame(T.READ_ERROR, 0, rid, offset, errno.EIO)
            return

        def answer(data: bytes | memoryview) -> None:
            self.fx.send_frame(T.READ_REPLY, 0, rid, offset, 0, data)

        def fail() -> None:
            self.fx.send_frame(T.READ_ERROR, 0, rid, offset, errno.EIO)
        self._ordered_read(offset, length, answer, fail)

    # --- the primary: acks and remote reads ----------------------------------------------------

    def _on_write_ack(self, f: Frame) -> None:
        """Writes f.id .. f.id + f.aux - 1 are applied on the peer (PeerLink.send_write_ack)."""
        acked = self.tracker.acked
        for seq in range(f.id, f.id + (f.aux or 1)):
            w = acked(seq)
            if w is None:
                raise LinkError(f"WRITE_ACK for write {seq}, which is not in flight")
            on_ack = w.on_ack  # _complete(w, True), inlined: once per guest write
            if on_ack is not None:
                w.on_ack = None
                on_ack(w, True)
        if self._invalidating is not None:
            self._invalidating()

    def _on_recv_ack(self, f: Frame) -> None:
        w = self.tracker.received(f.id)
        if w is None:
            raise LinkError(f"RECV_ACK for write {f.id}, which is not in flight")
        g = w.ctx if isinstance(w.ctx, GuestWrite) else None
        if g is not None and g.needs_apply:
            return  # the WRITE_ACK that follows completes it
        _complete(w, True)  # stays pending in the tracker until the WRITE_ACK

    def _on_neg_ack(self, f: Frame) -> None:
        w = self.tracker.acked(f.id)
        if w is None:
            raise LinkError(f"NEG_ACK for write {f.id}, which is not in flight")
        self._mark(w.offset, w.length)  # the peer could not apply it
        log.warning("%s: %s failed to apply a write at %d (errno %d); marked out of sync",
                    self.name, self.peer_node, w.offset, f.aux)
        _complete(w, False)
        if self._invalidating is not None:
            self._invalidating()

    def _on_flush_ack(self, f: Frame) -> None:
        flush_gen = self._flushes.pop(f.id, None)
        if flush_gen is None:
            raise LinkError(f"FLUSH_ACK for flush {f.id}, which is not in flight")
        if f.aux == 0:
            self._peer_durable(flush_gen)
        guest = self._guest_flushes.get(f.id)
        if guest is not None:
            guest[3] = _OK if f.aux == 0 else _FAILED
            self._flush_maybe_done(f.id)

    def _on_read_reply(self, f: Frame) -> None:
        got = self._reads.pop(f.id, None)
        if got is None:
            raise LinkError(f"{f.type.name} for read {f.id}, which is not in flight")
        done, token, offset, length = got
        if f.type is T.READ_ERROR:
            done(token, None, DeviceError(f.aux or errno.EIO, f"{self.name}: read at "
                                                              f"{offset} from {self.peer_node} "
                                                              f"failed"))
        elif len(f.payload) != length:
            raise LinkError(f"READ_REPLY of {len(f.payload)} bytes for a read of {length}")
        else:
            done(token, bytes(f.payload), None)

    def _on_disconnect(self, f: Frame) -> None:
        body = f.json()
        reason = str(body.get("reason", "?"))
        if body.get("outdate_peer") and self.role is Role.SECONDARY \
                and self.disk is Disk.UPTODATE:
            self._set("disk", Disk.OUTDATED)
            self._persist()
        log.info("%s: %s disconnects: %s", self.name, self.peer_node, reason)
        self.fx.close_link(f"peer disconnected: {reason}")

    def _on_invalidate(self, f: Frame) -> None:
        """The peer threw its disk's data away (invalidate on a Primary, or a disk attached
        while connected): this node becomes its SyncSource, for every block."""
        side = _side(f)
        if side.role is _PRIMARY and self.role is _PRIMARY:
            self._protocol_error("both nodes are Primary")
            return
        if self.disk is not Disk.UPTODATE:
            # Let the connect decision sort it out (and say so in the log).
            self.fx.close_link(f"{self.peer_node} invalidated its disk, but this node cannot "
                               f"be its source now ({self.disk.value})")
            return
        self._stop_sweep()  # a verify gives way
        self.peer_side = side
        self.peer_gen = side.gen
        assert self.bitmap is not None
        self.bitmap.set_range(0, self.size_bytes)
        self._set("peer-disk", side.disk)
        self._set_phase(Phase.SYNC_SOURCE)
        self.counters.reset_resync(self.bitmap.count())
        log.info("%s: %s invalidated its disk: resync to it from here, %d blocks", self.name,
                 self.peer_node, self.bitmap.count())

    # --- disk failures (rule on-io-error=detach) -------------------------------------------------

    def _disk_failed(self, exc: BaseException, what: str, offset: int = 0,
                     length: int = 0) -> None:
        """An I/O error of the local disk (data or metadata): detach it. A failed range is
        sent to the peer as OUT_OF_SYNC: it has the data (or will), this disk does not."""
        if length and self.link_is_up and self.phase in DECIDED:
            self.fx.send_frame(T.OUT_OF_SYNC, 0, 0, offset, length)
        if not self.has_disk:
            return
        log.error("%s: disk error on %s %s: %s; detaching the disk (this node carries on "
                  "through %s)", self.name, self.node, what, exc, self.peer_node)
        self._detach(f"I/O error {what}: {exc}", failed=True)

    def _detach(self, why: str, failed: bool) -> None:
        was = self.disk
        self._disk_gen += 1
        if failed:
            self._set("disk", Disk.FAILED)
        if self.phase is Phase.HANDSHAKE:
            # The peer decides on the STATE we sent: start over with one that is true.
            self.fx.close_link("renegotiating: the disk was detached")
        self._stop_sweep()
        if self.phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET, Phase.VERIFY_SOURCE,
                          Phase.VERIFY_TARGET):
            self._set_phase(Phase.ESTABLISHED)
        # Unless the peer is connected and known to have no good disk, writes may go on
        # without this one (now, or once the peer is back): if the disk can still take a
        # superblock, mark it Outdated, so that after a restart it is never taken for good
        # data. (Reattached to this same run of the node with nothing written elsewhere
        # meanwhile, it gets its state back: `attached`.) If the metadata is on the failed
        # device too this fails, and fencing (the peer recording this node Outdated in etcd)
        # is what then keeps it from promotion.
        known_alone = (self.link_is_up and self.phase in DECIDED
                       and self.peer_disk is not Disk.UPTODATE)
        # What the detached disk held, to give it its state back if it is attached again
        # before any write went elsewhere. Only a Primary can know that (every write passes
        # through it: `_route` forgets this at the first); a Secondary's peer may write
        # without it at any time, unseen.
        self._detached = (self.gen, was) if self.role is _PRIMARY else None
        # The best state the disk can have when it is attached again in this run: what it
        # was, and no better than Outdated, since writes may go on without it. The metadata
        # alone cannot say: a superblock write may have failed with the disk (it would still
        # read UpToDate).
        self._detached_cap = Disk.OUTDATED if was is Disk.UPTODATE else was
        # Marked Outdated now, or else before the first write that goes on without it.
        self._detached_unmarked = was in (Disk.UPTODATE, Disk.OUTDATED)
        if self.bitmap is not None and not known_alone and self._detached_unmarked:
            changes = dict(uuid_current=self.gen.current, uuid_bitmap=self.gen.bitmap,
                           uuid_history=list(self.gen.history),
                           disk_state=DISK_PERSISTED[Disk.OUTDATED])

            def marked(_r: Any, exc: BaseException | None) -> None:
                if exc is not None:
                    log.error("%s: could not mark the detached disk Outdated: %s", self.name,
                              exc)
                else:
                    self._detached_unmarked = False
            self.fx.persist(self._op(marked), changes)
        self.fx.detach_disk()
        for w in self._writes.values():
            if w.al is not None and w.al[2] is self.al:
                w.al[2].al_unpin_range(w.al[0], w.al[1])
                w.al = None
        self.bitmap = None
        self.al = None
        self._peer_volatile.clear()
        self._set("disk", Disk.DISKLESS)
        self.fx.emit(Event(self.name, "detached", "", self.node, why))
        if self.link_is_up and self.phase in DECIDED:
            self.fx.send_json(T.STATE, self._local_side().to_json())
        self._refresh()
        # Writes waiting for the activity log go on without it.
        waiting, self._al_waiting = self._al_waiting, []
        for w in waiting:
            w.al = None
            self._admit(w)

    def attached(self, gen: Generation, disk: Disk, bitmap: Bitmap,
                 al: ActivityLogView) -> str:
        """Event: the shell opened a (new or repaired) disk and its metadata for this
        Diskless node. Connected to a peer with an UpToDate disk, it becomes its SyncTarget
        at once for every block (checksums skip what is equal); otherwise the next connect
        decides from the generations."""
        assert not self.has_disk
        detached, self._detached = self._detached, None
        cap, self._detached_cap = self._detached_cap, None
        self._detached_unmarked = False
        if cap is not None and _DISK_RANK[disk] > _DISK_RANK.get(cap, 0):
            log.warning("%s: the attached disk's metadata says %s, better than this run "
                        "knows it to be since it was detached: taken as %s", self.name,
                        disk.value, cap.value)
            disk = cap
        if (detached is not None and detached[0] == gen == self.gen
                and disk is Disk.OUTDATED and detached[1] is Disk.UPTODATE):
            # The disk this node detached, and no data went anywhere else meanwhile (this
            # node served nothing through a peer): it is as good as it was.
            disk = Disk.UPTODATE
        self.bitmap, self.al, self.gen = bitmap, al, gen
        self._set("disk", disk)
        if self.role is _PRIMARY:
            # Whatever the peer holds, this disk takes writes from now on: the first one
            # starts a new generation (rule new-generation).
            self._diverge_pending = "a disk was attached to a Primary"
        if not (self.link_is_up and self.phase in DECIDED and self.peer_disk is Disk.UPTODATE):
            if disk is Disk.INCONSISTENT:
                # Its bitmap says nothing of the writes that went elsewhere while it was
                # away: none of its blocks is known good (no local reads), all get resynced.
                bitmap.set_range(0, self.size_bytes)
                self._persist(self._flush_bitmap)
            else:
                self._persist()
            if self.link_is_up:
                # The peer has no good disk to sync this one from: let a new handshake
                # decide from the generations which way the data goes.
                self.fx.close_link("renegotiating: a disk was attached")
                return f"attached ({disk.value}); reconnecting to {self.peer_node} to decide " \
                       f"the resync"
            return f"attached ({disk.value}); it resyncs when {self.peer_node} connects"
        bitmap.set_range(0, self.size_bytes)
        self._set("disk", Disk.INCONSISTENT)
        self._set_phase(Phase.SYNC_TARGET)
        self.counters.reset_resync(bitmap.count())
        self.fx.send_json(T.INVALIDATE, self._local_side().to_json())
        gen_now = self._link_gen

        def go() -> None:
            if self._link_gen == gen_now and self.phase is Phase.SYNC_TARGET:
                self._start_resync(bitmap)
        self._persist(lambda: self._flush_bitmap(go))
        return f"attached: resyncing from {self.peer_node}"

    def detach(self) -> str:
        """Command: give up the local disk (DRBD's detach), e.g. to replace it."""
        if not self.has_disk:
            raise ResourceError(f"{self.name} on {self.node} has no disk to detach")
        if self.role is _PRIMARY and not (self.link_is_up and self.phase in DECIDED
                                          and self.peer_disk is Disk.UPTODATE):
            raise ResourceError(f"{self.name} is Primary on {self.node} and {self.peer_node} "
                                f"is not connected with an UpToDate disk: detaching would "
                                f"leave its clients without data")
        self._detach("detached by the operator", failed=False)
        return "detached (Diskless)"

    # --- timers ----------------------------------------------------------------------------------

    def timer(self, name: str) -> None:
        """Event: a timer set with fx.set_timer fired."""
        if name == "sweep":
            s = self._sweep
            if s is not None and s.deferred is not None:
                nxt, s.deferred = s.deferred, None
                self._sweep_issue(s, *nxt)
                self._sweep_pump()
        elif name == "bitmap-flush":
            if self._sweep is not None and self._sweep.kind == "resync":
                self._sample_progress()
                self._flush_bitmap()
                self.fx.set_timer("bitmap-flush", BITMAP_FLUSH_INTERVAL_S)
        elif name == "peer-flush":
            self._peer_flush_timer = False
            if self._peer_volatile:
                self._send_peer_flush()
                self._peer_flush_timer = True
                self.fx.set_timer("peer-flush", PEER_FLUSH_INTERVAL_S)
        elif name == "ack-watch":
            self._ack_watch()

    def _ack_watch(self) -> None:
        """A peer that answers pings but leaves a write, flush, read or resync request
        unanswered for ack_timeout_s is dropped (a secondary whose disk hangs, a bug): the
        writes waiting for it then complete without it, marked out of sync."""
        if not self.link_is_up:
            return
        s = self._sweep
        oldest = (next(iter(self.tracker.pending), None), next(iter(self._flushes), None),
                  next(iter(self._reads), None),
                  min(s.planner.inflight) if s is not None and s.planner.inflight else None)
        stalled = self._watch is not None and any(
            a is not None and a == b for a, b in zip(oldest, self._watch, strict=True))
        if stalled:
            log.error("%s: %s has not answered a request for %.0f s; dropping the link",
                      self.name, self.peer_node, self.cfg.ack_timeout_s)
            self.fx.close_link(f"no answer for {self.cfg.ack_timeout_s:g} s")
            return
        self._watch = oldest
        self.fx.set_timer("ack-watch", self.cfg.ack_timeout_s / 2)

    # --- commands --------------------------------------------------------------------------------

    def promote(self, force: bool, done: Callable[[str, BaseException | None], None]) -> None:
        chk = check_promote(self.role, self.disk, self.gen, self.conn, self.repl,
                            self.peer_role, self.peer_disk, self.peer_node, force,
                            self.bitmap.count() * BLOCK_BYTES if self.bitmap is not None else 0)
        if not chk.ok:
            raise ResourceError(f"cannot promote {self.name} on {self.node}: {chk.reason}")
        if self._promoting:
            raise ResourceError(f"{self.name}: a promotion on {self.node} is already under way")
        if self.role is _PRIMARY and not (force and self.disk is Disk.OUTDATED):
            done("already Primary", None)
            return
        connected = self.link_is_up and self.phase in DECIDED
        if chk.forced_fresh:
            self.gen = Generation(self._new_uuid())  # nothing to track: all of it is new
            self._set("disk", Disk.UPTODATE)
        elif self.has_disk:
            if self.disk is not Disk.UPTODATE:  # forced: the operator takes this data as good
                if self.gen.fresh:
                    self.gen = Generation(self._new_uuid())
                self._set("disk", Disk.UPTODATE)
            if not connected:
                # Data starts to differ from the absent peer's.
                self.gen = self.gen.rotated(self._new_uuid())
                self._diverge_pending = ""
        link_gen = self._link_gen

        def persisted() -> None:
            # The generation is durable before a single write is taken as Primary.
            self._promoting = False
            if self.link_is_up and self.peer_role is _PRIMARY:
                self._persist(role_primary=False)
                done("", ResourceError(f"cannot promote {self.name} on {self.node}: "
                                       f"{self.peer_node} became Primary meanwhile"))
                return
            if not self.has_disk and not (self.link_is_up and self.phase in DECIDED
                                          and self.peer_disk is Disk.UPTODATE):
                done("", ResourceError(f"cannot promote {self.name} on {self.node}: its disk "
                                       f"failed while promoting, and no connected peer has "
                                       f"an UpToDate disk"))
                return
            self._set("role", Role.PRIMARY)
            if self.link_is_up and self._link_gen == link_gen:
                if chk.forced_fresh:
                    self.fx.close_link("renegotiating after forced promotion")  # full sync
                else:
                    self.fx.send_json(T.STATE, self._local_side().to_json())
            log.info("%s: Primary on %s%s", self.name, self.node,
                     f" ({chk.reason})" if chk.reason else "")
            done(chk.reason or "promoted", None)
        self._promoting = True
        self._persist(persisted, role_primary=True)

    def demote(self, done: Callable[[str, BaseException | None], None]) -> None:
        """The shell checks for NBD clients first (or cuts them off with --force)."""
        if self.role is Role.SECONDARY:
            done("already Secondary", None)
            return

        def flushed(_token: Any, exc: BaseException | None) -> None:
            # Every write answered as Primary is durable on both nodes first.
            self._set("role", Role.SECONDARY)
            self._detached = None  # the peer may write without the detached disk from now

            def persisted() -> None:
                if self.link_is_up and self.phase in DECIDED:
                    self.fx.send_json(T.STATE, self._local_side().to_json())
                done("demoted", None)
            self._persist(persisted, role_primary=False)
        self.start_flush(flushed, None)

    def disconnect(self) -> str:
        self._set("connection", Conn.STANDALONE)
        self.refusal = f"'rblock disconnect' on {self.node}"
        if self.link_is_up:
            self.fx.send_json(T.DISCONNECT, {"reason": f"'rblock disconnect' on {self.node}",
                                             # A Diskless primary cannot carry on alone.
                                             "outdate_peer": self.role is _PRIMARY
                                             and self.disk is Disk.UPTODATE})
            self.fx.close_link("disconnect requested")
        return "disconnected (StandAlone)"

    def connect(self, discard_my_data: bool = False) -> str:
        if discard_my_data:
            if self.role is _PRIMARY:
                raise ResourceError(f"{self.name} is Primary on {self.node}; make it secondary "
                                    f"before discarding its data")
            self.discard_my_data = True
        if self.conn is Conn.STANDALONE:
            self.refusal = ""
            self._set("connection", Conn.CONNECTING)
        return "connecting"

    def verify(self) -> str:
        if not (self.link_is_up and self.phase is _ESTABLISHED):
            raise ResourceError(f"{self.name}: verify needs a connected, synced peer "
                                f"(replication is {self.repl.value})")
        if not self.has_disk or self.peer_disk in _NO_DISK:
            raise ResourceError(f"{self.name}: verify needs a disk on both nodes")
        if self.role is not _PRIMARY and self.peer_role is _PRIMARY:
            self.fx.send_json(T.VERIFY_START, {})
            return f"verify started on {self.peer_node} (the Primary runs it)"
        self._start_verify()
        return "verify started"

    def invalidate(self, done: Callable[[str, BaseException | None], None]) -> None:
        """Throw away this node's data: everything is resynced from the peer.

        A Secondary marks everything out of sync and reconnects: the connect decision makes
        it the SyncTarget. A Primary keeps its link: its clients' reads of blocks not yet
        resynced are served by the peer, and their writes must reach the peer, whose copy
        is the good one from now on; it turns into a SyncTarget on the live link, as DRBD
        does."""
        if not self.has_disk:
            raise ResourceError(f"{self.name} has no disk on {self.node}; attach one")
        if self.role is _PRIMARY:
            self._invalidate_primary(done)
            return
        assert self.bitmap is not None
        self.bitmap.set_range(0, self.size_bytes)
        self._set("disk", Disk.INCONSISTENT)

        def persisted() -> None:
            if self.link_is_up:
                self.fx.close_link("invalidated: resync from the peer")
            done("invalidated: resyncing from the peer", None)
        self._persist(lambda: self._flush_bitmap(persisted))

    def _invalidate_primary(self, done: Callable[[str, BaseException | None], None]) -> None:
        if not self.link_is_up:
            raise ResourceError(f"{self.name} is Primary on {self.node} and has no peer to "
                                f"read from; connect it first")
        if self.phase is not _ESTABLISHED or self.peer_disk is not Disk.UPTODATE:
            raise ResourceError(f"{self.name}: replication with {self.peer_node} is "
                                f"{self.repl.value} and its disk {self.peer_disk.value}; "
                                f"invalidate once it is Established and UpToDate")
        if self._invalidating is not None:
            raise ResourceError(f"{self.name}: an invalidate is already under way")
        # With protocols A and B, the client may have been answered before the peer applied
        # a write. Once this disk is Inconsistent the peer's copy is the only good one, so it
        # must first hold every write answered so far; writes from now on wait for it.
        last_seq = self.tracker.next_seq - 1
        gen = self._link_gen

        def check() -> None:
            pending = self.tracker.pending
            if (self.link_is_up and self._link_gen == gen and pending
                    and next(iter(pending)) <= last_seq):
                return  # called again at the next ack
            self._invalidating = None
            self._refresh()
            if not self.link_is_up or self._link_gen != gen or self.phase is not _ESTABLISHED:
                done("", ResourceError(f"{self.name}: lost {self.peer_node} while "
                                       f"invalidating; nothing was changed, try again once "
                                       f"it is connected"))
                return
            bitmap = self.bitmap
            assert bitmap is not None
            bitmap.set_range(0, self.size_bytes)
            self._set("disk", Disk.INCONSISTENT)
            self._set_phase(Phase.SYNC_TARGET)
            blocks = bitmap.count()
            self.counters.reset_resync(blocks)
            self.fx.send_json(T.INVALIDATE, self._local_side().to_json())
            log.info("%s: invalidated on %s (Primary): resync from %s: %d blocks (%d bytes); "
                     "reads of blocks not resynced yet are served by %s", self.name, self.node,
                     self.peer_node, blocks, blocks * BLOCK_BYTES, self.peer_node)

            def go() -> None:
                done("invalidated: resyncing from the peer", None)
                if self._link_gen == gen and self.phase is Phase.SYNC_TARGET:
                    self._start_resync(bitmap)
            # Durable before the first resync block lands: after a crash from here on, this
            # node must come back Inconsistent, not as the good copy of a half-copied disk.
            self._persist(lambda: self._flush_bitmap(go))
        self._invalidating = check
        self._refresh()
        check()

    def begin_close(self) -> None:
        """A clean stop: in-flight guest I/O is done (the NBD server drained). Tell the
        peer; losing the link now starts no new generation."""
        self.closing = True
        self._stop_sweep()
        if self.link_is_up:
            self.fx.send_json(T.DISCONNECT, {"reason": "peer is shutting down"})
            self.fx.close_link("shutting down")

    # --- status ----------------------------------------------------------------------------------

    def status(self, nbd_uri: str) -> dict:
        oos = self.bitmap.count() if self.bitmap is not None else 0
        c = self.counters
        phase = self.phase
        syncing = phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET)
        verifying = phase in (Phase.VERIFY_SOURCE, Phase.VERIFY_TARGET)
        left = oos if syncing else (self._sweep_left() if verifying else 0)
        now = self.clock()
        samples = [s for s in c.history if now - s[0] <= SYNC_RATE_WINDOW_S] + [(now, left)]
        pct, rate_blocks, eta = sync_progress(c.resync_started_blocks, left, samples)
        peer = {
            "node": self.peer_node,
            "connection": self.conn.value,
            "replication": self.repl.value,
            "role": self.peer_role.value,
            "disk": self.peer_disk.value,
            "out_of_sync_bytes": oos * BLOCK_BYTES,
            "sync_percent": round(pct, 1) if (syncing or verifying) else
            (100.0 if oos == 0 else 0.0),
            "sync_rate_bytes_per_s": int(rate_blocks * BLOCK_BYTES),
            "eta_s": round(eta, 1) if eta is not None and (syncing or verifying) else None,
            "resync_sent_bytes": c.resync_sent_bytes,
            "resync_received_bytes": c.resync_received_bytes,
            "pending_writes": len(self.tracker.pending),
            "unacked_bytes": self.tracker.pending_bytes,
            "last_decision": str(self.last_decision) if self.last_decision else None,
            "refusal": self.refusal or None,
            "split_brain": (self.last_decision is not None
                            and self.last_decision.sync is Sync.SPLIT_BRAIN
                            and self.conn is Conn.STANDALONE),
        }
        return {
            "name": self.name, "role": self.role.value, "disk": self.disk.value,
            "size_bytes": self.size_bytes, "nbd": nbd_uri if self.role is _PRIMARY else None,
            "protocol": self.cfg.protocol, "crashed_primary": self.crashed_primary,
            "generation": {"current": f"{self.gen.current:016X}",
                           "bitmap": f"{self.gen.bitmap:016X}",
                           "history": [f"{h:016X}" for h in self.gen.history]},
            "peers": [peer],
        }


def _side(f: Frame) -> Side:
    try:
        return Side.from_json(f.json())
    except (KeyError, ValueError, TypeError) as e:
        raise LinkError(f"malformed {f.type.name} frame: {e}") from None


def _complete(w: PendingWrite, applied: bool) -> None:
    """Tell a write's owner, once, that the peer has it (APPLIED) or never will."""
    on_ack = w.on_ack
    if on_ack is not None:
        w.on_ack = None
        on_ack(w, applied)


def _complete_all(writes: list[PendingWrite]) -> None:
    for w in writes:
        _complete(w, False)


def _block_crcs(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    return b"".join(struct.pack(">I", crc32c.crc32c(view[i:i + BLOCK_BYTES]))
                    for i in range(0, len(view), BLOCK_BYTES))


# --- the frame table: (phase, frame type) -> (the role it needs or None, handler) -------------

_S = Role.SECONDARY
# How good a disk's data is, for `attached`: a state never rises above what this run knew.
_DISK_RANK = {Disk.INCONSISTENT: 1, Disk.OUTDATED: 2, Disk.UPTODATE: 3}
_Handler = Callable[[ResourceCore, Frame], None]

_IN_EVERY_DECIDED: dict[T, tuple[Role | None, _Handler]] = {
    T.STATE: (None, ResourceCore._on_state),
    T.DISCONNECT: (None, ResourceCore._on_disconnect),
    T.DATA: (_S, ResourceCore._on_data),
    T.TRIM: (_S, ResourceCore._on_trim_or_zeroes),
    T.ZEROES: (_S, ResourceCore._on_trim_or_zeroes),
    T.FLUSH: (_S, ResourceCore._on_flush),
    # Acks need no role: a node demoted with writes in flight still gets theirs.
    T.WRITE_ACK: (None, ResourceCore._on_write_ack),
    T.RECV_ACK: (None, ResourceCore._on_recv_ack),
    T.NEG_ACK: (None, ResourceCore._on_neg_ack),
    T.FLUSH_ACK: (None, ResourceCore._on_flush_ack),
    T.OUT_OF_SYNC: (None, ResourceCore._on_out_of_sync),
    T.READ_REQUEST: (None, ResourceCore._on_read_request),
    T.READ_REPLY: (None, ResourceCore._on_read_reply),
    T.READ_ERROR: (None, ResourceCore._on_read_reply),
    T.INVALIDATE: (None, ResourceCore._on_invalidate),
    T.VERIFY_START: (None, ResourceCore._on_verify_start),
    # Answers to a resync or verify request: in any phase, because the sweep may have been
    # stopped (a detach, a role change) while they were on the wire; their handlers drop
    # those and refuse answers to requests never made.
    T.RS_DATA: (None, ResourceCore._on_rs_data),
    T.RS_SAME: (None, ResourceCore._on_rs_same),
    T.VERIFY_REPLY: (None, ResourceCore._on_verify_reply),
}

FRAMES: dict[tuple[Phase, T], tuple[Role | None, _Handler]] = {
    (Phase.HANDSHAKE, T.STATE): (None, ResourceCore._on_state_first),
    (Phase.HANDSHAKE, T.BITMAP): (None, ResourceCore._on_bitmap),
    (Phase.HANDSHAKE, T.DISCONNECT): (None, ResourceCore._on_disconnect),
    **{(phase, t): entry for phase in DECIDED for t, entry in _IN_EVERY_DECIDED.items()},
    (Phase.ESTABLISHED, T.VERIFY_REQUEST): (None, ResourceCore._on_verify_request),
    (Phase.VERIFY_TARGET, T.VERIFY_REQUEST): (None, ResourceCore._on_verify_request),
    (Phase.VERIFY_TARGET, T.VERIFY_DONE): (None, ResourceCore._on_verify_done),
    (Phase.SYNC_SOURCE, T.RS_REQUEST): (None, ResourceCore._on_rs_request),
    (Phase.SYNC_SOURCE, T.SYNC_DONE): (None, ResourceCore._on_sync_done),
}
# The same table split by phase: `frame` looks up one small dict per frame.
_BY_PHASE: dict[Phase, dict[T, tuple[Role | None, _Handler]]] = {
    phase: {t: entry for (ph, t), entry in FRAMES.items() if ph is phase} for phase in Phase}
