"""Write fan-out bookkeeping, sans-IO: sequence numbers, epochs, acks, apply order.

Primary side (`WriteTracker`): every replicated write gets a sequence number and an epoch.
An epoch closes whenever a write completes to the client and at every FLUSH, so a write the
client may have seen completed is always in an earlier epoch than any write submitted after
it. The tracker remembers which writes the peer has not confirmed; if the link drops, those
ranges are exactly what the peer may miss (they go to the dirty bitmap).

Secondary side (`ApplyQueue`): frames arrive in the primary's order. An entry may start when
(1) every entry of an earlier epoch is done, (2) no earlier, unfinished entry overlaps it,
and (3) for a barrier (FLUSH), every earlier entry is done. So the secondary's disk only ever
passes through states the primary's disk passed through (write ordering), while writes of one
epoch may still be applied concurrently. Resync data rides in the same queue, so it is
ordered against guest writes to the same blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

APPLY_QUEUE_ENTRIES_MAX = 1024  # the link stops reading when this many entries wait
APPLY_QUEUE_BYTES_MAX = 64 * 1024 * 1024  # ... or when they hold this many bytes of data


@dataclass(slots=True)
class PendingWrite:
    seq: int
    epoch: int
    offset: int
    length: int
    received: bool = False  # RECV_ACK seen (protocol B)
    # The owner's: who to tell once the peer has the write, on_ack(write, applied), and
    # what it needs for that. The tracker never looks at them.
    on_ack: Callable[[PendingWrite, bool], None] | None = None
    ctx: Any = None


class WriteTracker:
    def __init__(self) -> None:
        self.next_seq = 1
        self.epoch = 1
        self._epoch_closed = False
        self.pending: dict[int, PendingWrite] = {}  # seq -> write, in seq order
        self.pending_bytes = 0

    def submit(self, offset: int, length: int) -> PendingWrite:
        if self._epoch_closed:
            self.epoch += 1
            self._epoch_closed = False
        w = PendingWrite(self.next_seq, self.epoch, offset, length)
        self.next_seq += 1
        self.pending[w.seq] = w
        self.pending_bytes += length
        return w

    def close_epoch(self) -> int:
        """A write completed to the client, or a FLUSH is issued: later writes go to a new
        epoch. Returns the epoch that closed (a FLUSH carries it)."""
        self._epoch_closed = True
        return self.epoch

    def received(self, seq: int) -> PendingWrite | None:
        w = self.pending.get(seq)
        if w is not None:
            w.received = True
        return w

    def acked(self, seq: int) -> PendingWrite | None:
        w = self.pending.pop(seq, None)
        if w is not None:
            self.pending_bytes -= w.length
            assert self.pending_bytes >= 0
        return w

    def forget(self, seq: int) -> None:
        """The write will never be acked on this link (it was sent when no link was up)."""
        self.acked(seq)

    def link_lost(self) -> list[PendingWrite]:
        """Every write the peer did not confirm: the peer may miss each of them."""
        lost = list(self.pending.values())
        self.pending.clear()
        self.pending_bytes = 0
        return lost


@dataclass(slots=True)
class ApplyEntry:
    key: int  # unique, increasing in arrival order
    epoch: int
    offset: int
    length: int
    barrier: bool = False
    started: bool = False
    data_bytes: int = 0


class ApplyQueue:
    """Which received writes may be applied now (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, ApplyEntry] = OrderedDict()
        self._next_key = 1
        self._last_epoch = 0
        self._bytes = 0  # data held by the entries (their payloads stay in the link's arena)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= APPLY_QUEUE_ENTRIES_MAX or self._bytes >= APPLY_QUEUE_BYTES_MAX

    def add(self, epoch: int, offset: int, length: int, barrier: bool = False,
            data_bytes: int = 0) -> ApplyEntry:
        """DATA_BYTES: how much received data the entry holds until it is done."""
        assert epoch >= self._last_epoch, f"epoch went back from {self._last_epoch} to {epoch}"
        self._last_epoch = epoch
        e = ApplyEntry(self._next_key, epoch, offset, length, barrier, data_bytes=data_bytes)
        self._next_key += 1
        self._entries[e.key] = e
        self._bytes += data_bytes
        return e

    def startable(self) -> list[ApplyEntry]:
        """Entries that may start now, in arrival order; marks them started.

        Only the oldest epoch still in the queue is looked at: every entry here is
        unfinished, and epochs never decrease in arrival order, so an entry of a later epoch
        has an unfinished entry of an earlier one before it (rule 1). The scan thus costs
        the size of one epoch, not of the queue: entries pile up behind a slow one (an
        fdatasync for a FLUSH, a FUA write) in later epochs, and a scan of all of them at
        every arrival and completion was quadratic in the queue length."""
        out = []
        earlier: list[ApplyEntry] = []  # unfinished entries before the one looked at
        head_epoch = -1
        for e in self._entries.values():
            if not earlier:
                head_epoch = e.epoch
            elif e.epoch != head_epoch:
                break  # a later epoch: waits until this one is done
            if not e.started and self._may_start(e, earlier):
                e.started = True
                out.append(e)
            earlier.append(e)
            if e.barrier:
                break  # nothing after an unfinished barrier may start
        return out

    @staticmethod
    def _may_start(e: ApplyEntry, earlier: list[ApplyEntry]) -> bool:
        if e.barrier:
            return not earlier
        end = e.offset + e.length
        for x in earlier:
            if x.epoch < e.epoch or x.barrier:
                return False
            if x.offset < end and e.offset < x.offset + x.length:
                return False
        return True

    def done(self, key: int) -> None:
        e = self._entries.pop(key)
        assert e.started
        self._bytes -= e.data_bytes
        assert self._bytes >= 0
