"""A deterministic simulation of the replicated write path's pure cores (rblock/replica/
writes.py): the primary's WriteTracker, an in-order link, the secondary's ApplyQueue, applies
that finish in any order, acks back, client completions, FLUSH barriers and a crash of the
primary at any moment. hypothesis drives every choice (which write, which block, which
apply finishes first, when to flush), so a failing schedule shrinks to a short one and
replays exactly.

Invariants checked after every step, i.e. at every moment the primary could die and the
secondary be promoted (DESIGN.md, "Ordering"):

1. Dependencies hold: if write A completed to the client before write B was submitted, the
   secondary never holds B without A, under protocol C (A was acked, so applied) and A (A
   may still be in flight: only the epochs order them). (A client that waited for A before issuing B, like a
   filesystem journal commit, finds the journal before the commit block.)
2. Writes to one block land in submission order: the secondary never replaces a newer value
   of a block with an older one.
3. FLUSH: once the secondary acknowledged a FLUSH, every write submitted before it is applied.
4. Bounded bookkeeping: the tracker's pending writes are exactly those not yet acked.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rblock.replica.writes import ApplyQueue, WriteTracker

BLOCK = 4096
BLOCKS = 6  # few blocks: overlapping writes are common


@dataclass
class SimWrite:
    seq: int
    epoch: int
    block: int
    value: int  # unique per write: what lands in the block
    deps: frozenset[int] = field(default_factory=frozenset)  # seqs completed before submit
    acked: bool = False
    completed: bool = False


class WritePathSim(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tracker = WriteTracker()
        self.queue = ApplyQueue()
        self.wire: deque[tuple] = deque()  # primary -> secondary, in order (TCP)
        self.acks: deque[tuple] = deque()  # secondary -> primary, in order
        self.writes: dict[int, SimWrite] = {}
        self.completed: set[int] = set()
        self.running: dict[int, tuple] = {}  # apply key -> what it does when it finishes
        self.disk: dict[int, int] = {}  # secondary: block -> value
        self.applied: set[int] = set()  # seqs applied on the secondary
        self.last_value: dict[int, int] = {}  # block -> seq of the value there
        self.flushes: dict[int, frozenset[int]] = {}  # flush id -> seqs submitted before it
        self.flushes_acked: set[int] = set()
        self.next_value = 1
        self.next_flush = 1
        self.protocol = "C"

    @initialize(protocol=st.sampled_from("CA"))
    def choose_protocol(self, protocol: str) -> None:
        """C: the client hears 'done' after the peer's ack. A: as soon as the write is
        handed to the link, so only the epochs keep the secondary's order."""
        self.protocol = protocol

    # --- the primary --------------------------------------------------------------------------

    @rule(block=st.integers(0, BLOCKS - 1))
    def submit(self, block: int) -> None:
        w = self.tracker.submit(block * BLOCK, BLOCK)
        sw = SimWrite(w.seq, w.epoch, block, self.next_value, frozenset(self.completed))
        self.next_value += 1
        self.writes[w.seq] = sw
        self.wire.append(("data", w.seq, w.epoch, block, sw.value))

    def _completable(self) -> list[int]:
        return sorted(s for s, w in self.writes.items()
                      if not w.completed and (w.acked or self.protocol == "A"))

    @precondition(lambda self: self._completable())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """The client hears 'done' (protocol C: once the peer acked; the local write is done
        too, in any order); that closes the epoch."""
        ready = self._completable()
        seq = data.draw(st.sampled_from(ready))
        self.writes[seq].completed = True
        self.completed.add(seq)
        self.tracker.close_epoch()

    @rule()
    def flush(self) -> None:
        epoch = self.tracker.close_epoch()
        fid = self.next_flush
        self.next_flush += 1
        self.flushes[fid] = frozenset(self.writes)
        self.wire.append(("flush", fid, epoch))

    # --- the link and the secondary -------------------------------------------------------------

    @precondition(lambda self: self.wire)
    @rule(n=st.integers(1, 4))
    def deliver(self, n: int) -> None:
        for _ in range(min(n, len(self.wire))):
            frame = self.wire.popleft()
            if frame[0] == "data":
                _, seq, epoch, block, value = frame
                e = self.queue.add(epoch, block * BLOCK, BLOCK)
                self.running[e.key] = ("data", seq, block, value)
            else:
                _, fid, epoch = frame
                e = self.queue.add(epoch, 0, 0, barrier=True)
                self.running[e.key] = ("flush", fid)
        self._start()

    def _start(self) -> None:
        for e in self.queue.startable():
            self.running[e.key] = ("started", *self.running[e.key])

    @precondition(lambda self: any(v[0] == "started" for v in self.running.values()))
    @rule(data=st.data())
    def finish_apply(self, data: st.DataObject) -> None:
        """One started apply finishes; which one is up to hypothesis (pwrites race)."""
        keys = sorted(k for k, v in self.running.items() if v[0] == "started")
        key = data.draw(st.sampled_from(keys))
        job = self.running.pop(key)[1:]
        if job[0] == "data":
            _, seq, block, value = job
            assert self.last_value.get(block, 0) < seq, (
                f"block {block}: write {seq} applied over the newer write "
                f"{self.last_value[block]}")
            self.disk[block] = value
            self.last_value[block] = seq
            self.applied.add(seq)
            self.acks.append(("ack", seq))
        else:
            self.acks.append(("flush_ack", job[1]))
        self.queue.done(key)
        self._start()

    @precondition(lambda self: self.acks)
    @rule()
    def receive_ack(self) -> None:
        kind, ident = self.acks.popleft()
        if kind == "ack":
            w = self.tracker.acked(ident)
            assert w is not None and w.seq == ident
            self.writes[ident].acked = True
        else:
            self.flushes_acked.add(ident)

    # --- what must hold at every moment (a crash of the primary now) ---------------------------

    @invariant()
    def dependencies_hold(self) -> None:
        for seq in self.applied:
            missing = self.writes[seq].deps - self.applied
            assert not missing, (f"write {seq} is on the secondary without {sorted(missing)}, "
                                 f"which completed to the client before it was submitted")

    @invariant()
    def flushes_cover_what_came_before(self) -> None:
        for fid in self.flushes_acked:
            missing = self.flushes[fid] - self.applied
            assert not missing, f"FLUSH {fid} acked with writes {sorted(missing)} not applied"

    @invariant()
    def tracker_pending_is_what_is_not_acked(self) -> None:
        not_acked = {s for s, w in self.writes.items() if not w.acked}
        assert set(self.tracker.pending) == not_acked
        assert self.tracker.pending_bytes == BLOCK * len(not_acked)

    @invariant()
    def secondary_values_are_real_writes(self) -> None:
        for block, value in self.disk.items():
            w = self.writes[self.last_value[block]]
            assert (w.block, w.value) == (block, value)

    def teardown(self) -> None:
        # Quiesce: deliver and apply everything; the secondary then equals the primary.
        for _ in range(10_000):
            if self.wire:
                self.deliver(len(self.wire))
            elif any(v[0] == "started" for v in self.running.values()):
                key = min(k for k, v in self.running.items() if v[0] == "started")
                job = self.running.pop(key)[1:]
                if job[0] == "data":
                    _, seq, block, value = job
                    assert self.last_value.get(block, 0) < seq
                    self.disk[block], self.last_value[block] = value, seq
                    self.applied.add(seq)
                self.queue.done(key)
                self._start()
            else:
                break
        assert not self.running and len(self.queue) == 0, "applies left that never start"
        latest: dict[int, int] = {}
        for seq in sorted(self.writes):
            latest[self.writes[seq].block] = self.writes[seq].value
        assert self.disk == latest


WritePathSim.TestCase.settings = settings(max_examples=300, stateful_step_count=60,
                                          deadline=None)
TestWritePath = WritePathSim.TestCase
