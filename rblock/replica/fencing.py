"""Fencing through etcd: the rules that keep one writer and lose no acknowledged write.
Pure: no I/O, no await. The resource core (core.py) feeds it events and carries out what it
answers; the shell (rblock/fencer.py) runs the transactions against etcd, the simulator
(tests/simulation.py) against a simulated etcd.

Theory of operation
-------------------
Two nodes alone cannot tell a dead peer from a broken link; etcd decides. It holds, per
resource (keys under `{prefix}/{resource}/`, built in fence_txn.py):

    primary            the node that may be Primary, bound to that node's lease: when the
                       node stops renewing it (dead, cut off), etcd deletes the key
    outdated/{node}    a node whose disk misses acknowledged writes; not bound to a lease,
                       so it outlives the node that wrote it

Rules, each named where it is decided (the names appear in the log and in events):

- one-writer: promotion takes `primary` in one transaction that also checks this node is
  not recorded Outdated; refused, with the reason, when the key belongs to a live node, when
  etcd cannot be reached, or when this node is recorded Outdated.
- no-ack-lost: a write is acknowledged only when it is on every replica not recorded
  Outdated. A Primary that has to write alone (peer lost, or without a disk) first records
  the peer Outdated, in a transaction that checks it still holds `primary` under its
  lease; until then single-copy writes wait (on_no_quorum = "suspend-io") or fail with EIO
  ("io-error"): never acknowledged on one copy only.
- lease-lost: a Primary whose lease ran out (its own deadline: the send time of its last
  good keepalive + TTL, earlier than etcd's) no longer holds the key: it writes only with a
  connected peer. Once etcd answers again it takes the key back, unless someone else took
  it or it is recorded Outdated: then it is deposed and stays so until demoted.
- promotion-after-death: a Secondary whose Primary vanished gets the key only once etcd
  has deleted it (the dead node's lease expired), and only if it is not recorded Outdated
  (the transaction of one-writer checks both).
- outdated-cleared-by-resync: when the peer is connected and UpToDate again, the Primary
  deletes its Outdated record (under its lease).
- release-on-demote: a demoted node deletes `primary` if it still holds it, so the peer can
  be promoted at once (if etcd cannot be reached, it tries again until it can).

One transaction at a time: events that arrive while one is on its way only change the facts
(`alone_needed`, `peer_uptodate`, `lease_valid`); when it is answered, `next_txn` picks the
next from the state and the facts. The table `TABLE[(state, event)]` holds every transition;
an event not listed for a state changes no state (facts still apply).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_S = 0.5  # etcd unreachable: the next try


class Key(enum.Enum):
    """What this node knows about the resource's primary key."""

    NONE = "none"  # Secondary: holds nothing, wants nothing
    TAKING = "taking"  # a promotion's transaction is on its way
    HELD = "held"  # Primary, holds the key under a valid lease
    LOST = "lost"  # Primary, its lease ran out: the key is gone or about to go
    RETAKING = "retaking"  # Primary, lease back: taking the key back
    DEPOSED = "deposed"  # Primary, someone else holds the key or this node is Outdated
    RELEASING = "releasing"  # demoted: deleting the key
    IGNORED = "ignored"  # promoted with --ignore-fencing: no rule applies until demoted


class Ev(enum.Enum):
    PROMOTE = "promote"
    PROMOTE_IGNORING = "promote-ignoring-fencing"
    DEMOTE = "demote"
    # answers of the transactions
    TAKEN = "taken"  # primary key is ours (with the Outdated records seen)
    REFUSED = "refused"  # primary key held by another node, or this node is Outdated
    NOT_HOLDER = "not-holder"  # outdate/clear/release: the key is not ours (any more)
    UNREACHABLE = "unreachable"  # no etcd member with a quorum answered (or no lease)
    OUTDATED = "outdated"  # the peer is recorded Outdated
    CLEARED = "cleared"  # the peer's Outdated record is deleted
    RELEASED = "released"  # the primary key is deleted
    # the lease (rblock/fencer.py's LeaseKeeper, or the simulator's)
    LEASE_LOST = "lease-lost"
    LEASE_GRANTED = "lease-granted"
    RETRY = "retry"


class Txn(enum.Enum):
    TAKE = "take"
    OUTDATE = "outdate"
    CLEAR = "clear"  # under this node's key
    CLEAR_FREE = "clear-free"  # the record this node wrote, while nobody holds the key
    RELEASE = "release"


@dataclass(frozen=True)
class Answer:
    """The outcome of one transaction, as fence_txn.interpret reads it."""

    event: Ev
    reason: str = ""  # REFUSED / NOT_HOLDER / UNREACHABLE: why, in a user's words
    outdated: frozenset[str] = frozenset()  # TAKEN: nodes recorded Outdated
    holder: str = ""  # REFUSED / NOT_HOLDER: who holds the key ("" if nobody)


@dataclass
class Step:
    """What the core is to do after an event."""

    txn: Txn | None = None  # start this transaction
    retry_s: float | None = None  # call step(RETRY) after this long
    promoted: bool | None = None  # a promotion's outcome (with `reason` when refused)
    demoted: bool = False  # a demotion's key is released (or given up on for now)
    reason: str = ""
    events: list[tuple[str, str]] = field(default_factory=list)  # (what, detail) to emit
    rule: str = ""


class Fencing:
    """The fencing state of one resource on one node."""

    def __init__(self, resource: str, node: str, peer: str, on_no_quorum: str,
                 clock: Callable[[], float]) -> None:
        self.resource = resource
        self.node = node
        self.peer = peer
        self.io_error = on_no_quorum == "io-error"
        self.clock = clock
        self.key = Key.NONE
        self.inflight: Txn | None = None
        self.lease_valid = False
        self.quorum: bool | None = None  # None: not asked yet
        # The peer is recorded Outdated in etcd: known for sure (single-copy writes may go),
        # and possibly (a record to delete once it is UpToDate again). A CLEAR makes the
        # first false when it is sent: its answer may be lost after etcd applied it.
        self.peer_outdated = False
        self.peer_record = False
        self.self_outdated = False  # this node is recorded Outdated (seen on a refusal)
        self.holder = ""  # the node seen holding the key, if not this one
        self.alone_needed = False  # Primary with writes that only this node would hold
        self.peer_uptodate = False  # peer connected, Established, UpToDate
        self.retry_pending = False
        # Counts lease losses: a transaction's answer from before the last one (its lease is
        # gone, and so is any key it took) does not make this node a holder.
        self.lease_epoch = 0
        self._txn_epoch = 0
        self.suspended_since: float | None = None
        self.suspended_why = ""
        self.last_reason = ""
        self._demote_waiting = False

    # --- what the core asks -------------------------------------------------------------------

    def single_copy_ok(self) -> bool:
        """Whether a write may be acknowledged with only this node's copy (no-ack-lost)."""
        if self.key is Key.IGNORED:
            return True
        return self.key is Key.HELD and self.lease_valid and self.peer_outdated

    def fail_single_copy(self) -> bool:
        """Whether waiting single-copy writes fail now (io-error) instead of waiting: only
        once a try failed, never while a transaction that may open the gate is on its way."""
        if not self.io_error or self.single_copy_ok():
            return False
        if self.key is Key.DEPOSED:
            return True
        return self.inflight is None and (self.quorum is False or not self.lease_valid)

    def gate_open(self) -> bool:
        return not self.alone_needed or self.single_copy_ok()

    # --- events -------------------------------------------------------------------------------

    def set_facts(self, alone_needed: bool, peer_uptodate: bool) -> Step:
        """The core's view changed (link, peer disk, role). Starts what the facts call for."""
        self.alone_needed, self.peer_uptodate = alone_needed, peer_uptodate
        return self._finish(Step(rule="facts"))

    def step(self, ev: Ev, answer: Answer | None = None) -> Step:
        """One event; the answer of a transaction for its events."""
        regained = False
        if ev in _ANSWERS:
            assert self.inflight is not None, f"{ev.value} answers no transaction"
            self.inflight = None
            if ev is not Ev.UNREACHABLE:
                regained, self.quorum = self.quorum is False, True
        st = TABLE.get((self.key, ev), _facts_only)(self, answer or Answer(ev))
        if regained:
            st.events.append(("quorum-regained", "etcd answers again"))
        return self._finish(st)

    def _finish(self, st: Step) -> Step:
        """Pick the next transaction if none is on its way, and note gate changes."""
        if self.inflight is None and st.txn is None:
            st.txn = self.next_txn()
        if st.txn is not None:
            self.inflight = st.txn
            self._txn_epoch = self.lease_epoch
            if st.txn is Txn.OUTDATE:
                self.peer_record = True  # it may land even if its answer is lost
        closed = not self.gate_open()
        if closed and self.suspended_since is None:
            self.suspended_since = self.clock()
            self.suspended_why = self._why_closed()
            st.events.append(("io-suspended", self.suspended_why))
        elif closed:
            self.suspended_why = self._why_closed()
        elif not closed and self.suspended_since is not None:
            waited = self.clock() - self.suspended_since
            self.suspended_since = None
            self.suspended_why = ""
            st.events.append(("io-resumed", f"after {waited:.3f} s"))
        return st

    def _why_closed(self) -> str:
        if self.key is Key.DEPOSED:
            return f"deposed: {self.last_reason}; demote this node"
        if not self.lease_valid:
            return "this node's etcd lease ran out"
        if self.quorum is False:
            return f"etcd unreachable ({self.last_reason})"
        if self.inflight is Txn.OUTDATE:
            return f"recording {self.peer} Outdated in etcd"
        return f"{self.peer} is not recorded Outdated yet"

    def next_txn(self) -> Txn | None:
        """The transaction the state and the facts call for next (one at a time)."""
        if self.inflight is not None or self.retry_pending:
            return None
        if not self.lease_valid:
            return None  # every transaction needs the lease (LEASE_GRANTED tries again)
        k = self.key
        if k is Key.RELEASING:
            if self.peer_record and self.peer_uptodate:
                self.peer_outdated = False
                return Txn.CLEAR  # (still under the key) then the release
            return Txn.RELEASE
        if k is Key.NONE and self.peer_record and self.peer_uptodate:
            return Txn.CLEAR_FREE  # demoted before the resync ended: the record it wrote
        if k is Key.LOST:
            self.key = Key.RETAKING
            return Txn.TAKE
        if k is Key.HELD:
            if self.alone_needed and not self.peer_outdated:
                return Txn.OUTDATE
            if self.peer_record and self.peer_uptodate and not self.alone_needed:
                self.peer_outdated = False  # not for sure any more, whatever the answer
                return Txn.CLEAR
        return None


# --- the transitions -------------------------------------------------------------------------

def _facts_only(f: Fencing, a: Answer) -> Step:
    return Step(rule="facts")


def _promote(f: Fencing, a: Answer) -> Step:
    """one-writer: take the key (with a valid lease; without one etcd is not reachable)."""
    if not f.lease_valid:
        f.last_reason = "this node has no etcd lease (etcd unreachable or without quorum)"
        return Step(promoted=False, reason=f.last_reason, rule="one-writer")
    if f.inflight is not None:
        return Step(promoted=False, reason=f"a fencing transaction ({f.inflight.value}) is on "
                                           f"its way in etcd; try again in a moment",
                    rule="one-writer")
    f.key = Key.TAKING
    return Step(txn=Txn.TAKE, rule="one-writer")


def _promote_ignoring(f: Fencing, a: Answer) -> Step:
    f.key = Key.IGNORED
    return Step(promoted=True, reason="fencing ignored (--ignore-fencing)", rule="ignored",
                events=[("fencing-ignored", f"{f.node} promoted without the primary key")])


def _taken(f: Fencing, a: Answer) -> Step:
    """one-writer / promotion-after-death: the key is ours (if the lease ran out while the
    answer was on its way, it goes with the lease: taken back once there is one)."""
    f.key = Key.HELD if f.lease_valid and f._txn_epoch == f.lease_epoch else Key.LOST
    f.holder = ""
    f.self_outdated = False
    f.peer_outdated = f.peer_record = f.peer in a.outdated
    return Step(promoted=True, rule="one-writer")


def _refused(f: Fencing, a: Answer) -> Step:
    f.key = Key.NONE
    f.holder = a.holder
    f.self_outdated = f.node in a.outdated
    f.last_reason = a.reason
    return Step(promoted=False, reason=a.reason,
                rule="promotion-after-death" if a.holder else "one-writer")


def _unreachable_taking(f: Fencing, a: Answer) -> Step:
    """The TAKE may have landed with its answer lost: release whatever it took."""
    f.key = Key.RELEASING
    return _unreachable(f, a, Step(promoted=False, reason=f"etcd unreachable: {a.reason}",
                                   rule="one-writer"))


def _unreachable(f: Fencing, a: Answer, st: Step | None = None) -> Step:
    st = st or Step(rule="no-ack-lost")
    f.last_reason = a.reason
    if f.quorum is not False:
        st.events.append(("quorum-lost", a.reason))
    f.quorum = False
    retry = f.key in (Key.HELD, Key.LOST, Key.RETAKING, Key.RELEASING) or (
        f.key is Key.NONE and f.peer_record)
    if retry and not f.retry_pending:
        if f.key is Key.RETAKING:
            f.key = Key.LOST
        f.retry_pending = True
        st.retry_s = RETRY_S
    if f.key is Key.RELEASING and f._demote_waiting:
        f._demote_waiting = False
        st.demoted = True
        st.reason = (f"etcd unreachable: the primary key of {f.resource} is released once "
                     f"it answers ({a.reason})")
    return st


def _retry(f: Fencing, a: Answer) -> Step:
    f.retry_pending = False
    return Step(rule="retry")


def _outdated(f: Fencing, a: Answer) -> Step:
    """no-ack-lost: the peer is recorded Outdated; single-copy writes may go."""
    f.peer_outdated = f.peer_record = True
    return Step(rule="no-ack-lost", events=[("peer-outdated", f"{f.peer} recorded Outdated "
                                                               f"in etcd by {f.node}")])


def _cleared(f: Fencing, a: Answer) -> Step:
    f.peer_outdated = f.peer_record = False
    return Step(rule="outdated-cleared-by-resync",
                events=[("peer-outdated-cleared", f"{f.peer} UpToDate again: its Outdated "
                                                  f"record is deleted")])


def _not_holder(f: Fencing, a: Answer) -> Step:
    """The key is not ours: gone (expired: take it back if we may) or someone else's."""
    f.last_reason = a.reason
    if a.holder and a.holder != f.node:
        f.key = Key.DEPOSED
        f.holder = a.holder
        return Step(rule="lease-lost", events=[("deposed", a.reason)])
    f.key = Key.LOST
    return Step(rule="lease-lost")


def _lease_lost(f: Fencing, a: Answer) -> Step:
    """lease-lost: no single-copy write from now on; the key goes with the lease."""
    f.lease_valid = False
    f.lease_epoch += 1
    st = Step(rule="lease-lost", events=[("lease-lost", "this node's etcd lease ran out")])
    if f.key in (Key.HELD, Key.RETAKING):
        f.key = Key.LOST
    return st


def _lease_granted(f: Fencing, a: Answer) -> Step:
    f.lease_valid = True
    f.retry_pending = False
    st = Step(rule="lease-lost")
    if f.quorum is False:
        f.quorum = True
        st.events.append(("quorum-regained", "etcd granted a lease"))
    return st


def _lease_lost_releasing(f: Fencing, a: Answer) -> Step:
    """release-on-demote: the lease ran out here, but etcd may still hold it (its deadline
    is later; a new etcd leader extends it): the release is tried again when there is a
    lease. The demotion itself is done."""
    f.lease_valid = False
    f.lease_epoch += 1
    st = Step(rule="release-on-demote", demoted=f._demote_waiting,
              events=[("lease-lost", "this node's etcd lease ran out")])
    if f._demote_waiting:
        st.reason = f"no etcd lease: the primary key of {f.resource} is released once it answers"
    f._demote_waiting = False
    return st


def _lease_lost_facts(f: Fencing, a: Answer) -> Step:
    f.lease_valid = False
    f.lease_epoch += 1
    return Step(rule="lease-lost", events=[("lease-lost", "this node's etcd lease ran out")])


def _retaken_refused(f: Fencing, a: Answer) -> Step:
    """lease-lost: someone else took the key, or this node is recorded Outdated."""
    f.key = Key.DEPOSED
    f.holder = a.holder
    f.self_outdated = f.node in a.outdated
    f.last_reason = a.reason
    return Step(rule="lease-lost", events=[("deposed", a.reason)])


def _retaken(f: Fencing, a: Answer) -> Step:
    if not f.lease_valid or f._txn_epoch != f.lease_epoch:
        f.key = Key.LOST  # taken under a lease that is gone since: again, with the new one
        return Step(rule="lease-lost")
    f.key = Key.HELD
    f.peer_outdated = f.peer_record = f.peer in a.outdated
    return Step(rule="lease-lost", events=[("lease-regained", "primary key taken back")])


def _demote(f: Fencing, a: Answer) -> Step:
    """release-on-demote."""
    if f.key in (Key.NONE, Key.DEPOSED, Key.IGNORED):
        f.key = Key.NONE
        return Step(demoted=True, rule="release-on-demote")
    f.key = Key.RELEASING
    f._demote_waiting = True
    if f.inflight is None and not f.lease_valid:
        f._demote_waiting = False
        return Step(demoted=True, rule="release-on-demote",
                    reason=f"no etcd lease: the primary key of {f.resource} is released "
                           f"once etcd answers")
    return Step(rule="release-on-demote")


def _demote_again(f: Fencing, a: Answer) -> Step:
    """A second demotion while the first one's release is on its way: it waits too."""
    f._demote_waiting = True
    return Step(rule="release-on-demote")


def _not_free(f: Fencing, a: Answer) -> Step:
    """clear-free refused: the key is held (an earlier run's lease of this node, still
    alive): again in a while, not at once."""
    f.retry_pending = True
    return Step(rule="outdated-cleared-by-resync", retry_s=RETRY_S)


def _released(f: Fencing, a: Answer) -> Step:
    f.key = Key.NONE
    st = Step(rule="release-on-demote", demoted=f._demote_waiting)
    f._demote_waiting = False
    return st


_ANSWERS = {Ev.TAKEN, Ev.REFUSED, Ev.NOT_HOLDER, Ev.UNREACHABLE, Ev.OUTDATED, Ev.CLEARED,
            Ev.RELEASED}

_Handler = Callable[[Fencing, Answer], Step]

TABLE: dict[tuple[Key, Ev], _Handler] = {
    (Key.NONE, Ev.PROMOTE): _promote,
    (Key.NONE, Ev.PROMOTE_IGNORING): _promote_ignoring,
    (Key.TAKING, Ev.TAKEN): _taken,
    (Key.TAKING, Ev.REFUSED): _refused,
    (Key.TAKING, Ev.UNREACHABLE): _unreachable_taking,
    (Key.TAKING, Ev.LEASE_LOST): _lease_lost_facts,  # the answer decides
    (Key.HELD, Ev.OUTDATED): _outdated,
    (Key.HELD, Ev.CLEARED): _cleared,
    (Key.HELD, Ev.NOT_HOLDER): _not_holder,
    (Key.HELD, Ev.UNREACHABLE): _unreachable,
    (Key.HELD, Ev.LEASE_LOST): _lease_lost,
    (Key.HELD, Ev.RETRY): _retry,
    (Key.HELD, Ev.DEMOTE): _demote,
    # Answers that land after the lease ran out: what they recorded still stands.
    (Key.LOST, Ev.OUTDATED): _outdated,
    (Key.LOST, Ev.CLEARED): _cleared,
    (Key.LOST, Ev.NOT_HOLDER): _not_holder,
    (Key.LOST, Ev.UNREACHABLE): _unreachable,
    (Key.LOST, Ev.LEASE_GRANTED): _lease_granted,
    (Key.LOST, Ev.RETRY): _retry,
    (Key.LOST, Ev.DEMOTE): _demote,
    (Key.RETAKING, Ev.TAKEN): _retaken,
    (Key.RETAKING, Ev.REFUSED): _retaken_refused,
    (Key.RETAKING, Ev.UNREACHABLE): _unreachable,
    (Key.RETAKING, Ev.LEASE_LOST): _lease_lost,
    (Key.RETAKING, Ev.DEMOTE): _demote,  # the TAKE's answer lands in RELEASING
    (Key.DEPOSED, Ev.DEMOTE): _demote,
    (Key.IGNORED, Ev.DEMOTE): _demote,
    (Key.NONE, Ev.DEMOTE): _demote,
    (Key.RELEASING, Ev.DEMOTE): _demote_again,
    (Key.RELEASING, Ev.RELEASED): _released,
    (Key.RELEASING, Ev.NOT_HOLDER): _released,  # not ours: nothing to release
    (Key.RELEASING, Ev.UNREACHABLE): _unreachable,
    (Key.RELEASING, Ev.RETRY): _retry,
    (Key.RELEASING, Ev.LEASE_LOST): _lease_lost_releasing,
    (Key.NONE, Ev.CLEARED): _cleared,
    (Key.NONE, Ev.NOT_HOLDER): _not_free,
    # A TAKE or OUTDATE answered after the demotion: release what it took.
    (Key.RELEASING, Ev.TAKEN): _facts_only,
    (Key.RELEASING, Ev.REFUSED): _released,
    (Key.RELEASING, Ev.OUTDATED): _outdated,
    (Key.RELEASING, Ev.CLEARED): _cleared,
}
# The lease comes and goes in every state; where no transition is listed, only the fact.
for _k in Key:
    TABLE.setdefault((_k, Ev.LEASE_LOST), _lease_lost_facts)
    TABLE.setdefault((_k, Ev.LEASE_GRANTED), _lease_granted)
    TABLE.setdefault((_k, Ev.RETRY), _retry)
    TABLE.setdefault((_k, Ev.UNREACHABLE), _unreachable)
