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

import time
from collections.abc import Callable
from typing import Any

from rblock.config import ResourceConfig
from rblock.replica.core_apply import Apply
from rblock.replica.core_commands import Commands
from rblock.replica.core_common import (
    _NO_DISK,
    _PRIMARY,
    _REPL,
    _S,
    DECIDED,
    ActivityLogView,
    ApplyJob,
    GuestWrite,
    Phase,
    RangeLock,
    Sweep,
    log,
)
from rblock.replica.core_fence import Fence
from rblock.replica.core_guest import GuestIO
from rblock.replica.core_handshake import LinkHandshake
from rblock.replica.core_sweep import Sweeps
from rblock.replica.effects import Effects, Event
from rblock.replica.fencing import Fencing
from rblock.replica.resync import RateLimiter
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
    new_uuid,
)
from rblock.replica.wire import Frame, LinkError, T
from rblock.replica.writes import ApplyQueue, WriteTracker
from rblock.store.metadata import BLOCK_BYTES, Bitmap


class ResourceCore(GuestIO, LinkHandshake, Sweeps, Apply, Commands, Fence):
    """One resource on one node (see the theory of operation above). The mixins hold the
    handlers by subject (core_guest, core_handshake, core_sweep, core_apply,
    core_commands); this class holds the state, the small helpers and the frame dispatch."""

    def __init__(self, node: str, cfg: ResourceConfig, peer_node: str, fx: Effects,
                 clock: Callable[[], float], gen: Generation, disk: Disk,
                 crashed_primary: bool, bitmap: Bitmap, al: ActivityLogView,
                 uuids: Callable[[], int] = new_uuid, fence: Fencing | None = None):
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
        # Fencing (core_fence.py; None: fencing = "none"): the rules' state, single-copy
        # writes waiting for them, and the command waiting for a transaction.
        self.fence = fence
        self._fence_held: list[GuestWrite] = []
        self._fence_waiters: list[Callable[[bool, str], None]] = []
        self._fence_promote: Callable[[bool, str], None] | None = None
        self._fence_demote: Callable[[str], None] | None = None
        self._demoting = False  # a demotion is under way (commands do not overlap)
        self._peer_write_failed = False  # the peer failed to apply a write on this link
        self.promoted_at = 0.0  # unix time of the last promotion (the shell sets it from
        self.wall_clock: Callable[[], float] = time.time  # the superblock; the sim: its clock)

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
        if self.fence is not None:
            self._fence_facts()

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

    # --- frames from the peer ---------------------------------------------------------------

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



# --- the frame table: (phase, frame type) -> (the role it needs or None, handler) -------------

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

