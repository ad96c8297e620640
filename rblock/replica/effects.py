"""What the resource core asks of its environment, and what it tells the world.

The core (`rblock/replica/core.py`) decides; it does no I/O. Everything it wants done goes
through an `Effects` object: the asyncio shell (`rblock/replica/resource.py`) implements it
with sockets, files and timers, the deterministic simulator (`tests/simulation.py`) with
in-memory disks, links and a virtual clock. The rules every implementation keeps:

- An effect starts an action and returns at once. Its outcome comes back later as a call of
  one of the core's event methods (`disk_done`, `meta_done`, `timer`), never during the
  effect call itself: the core is never re-entered.
- The two exceptions answer synchronously because the real operation is synchronous too:
  `pwrite_now` (a page-cache write) and `link_congested` (a query).
- Frames go out on the link that is up when the effect is called, in call order; with no link
  up they are dropped. A link that breaks is reported by the shell (`core.link_down`) before
  frames of a new link arrive, and frames of an old link never reach the core after that.
- Metadata effects (`persist`, `flush_bitmap`, `activate_al`) run one at a time in call
  order, so a later superblock never lands before an earlier one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from rblock.replica.fencing import Txn
from rblock.replica.wire import T


class ResourceError(Exception):
    """A refused command; the message says why and what to do."""


@dataclass
class Event:
    """A state change, for `rblock events` and the log."""

    resource: str
    what: str
    old: str
    new: str
    detail: str = ""
    time_s: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"time": self.time_s, "resource": self.resource, "what": self.what,
                "old": self.old, "new": self.new, "detail": self.detail}


class Effects(Protocol):
    # --- the peer link ---------------------------------------------------------------------
    def send_frame(self, t: int, flags: int, fid: int, offset: int, aux: int,
                   payload: bytes | memoryview = b"") -> None:
        """Queue one frame on the link (sent at the end of the loop pass)."""

    def send_json(self, t: T, obj: dict) -> None:
        """Queue one control frame with a JSON payload."""

    def send_write_ack(self, seq: int) -> None:
        """Acknowledge write SEQ as applied (coalesced with neighbours into WRITE_ACK runs)."""

    def flush_link(self) -> None:
        """Hand what is queued to the transport now (a big write: the peer starts on it)."""

    def link_congested(self) -> bool:
        """Whether the link's send buffer is over its limit (protocol A back-pressure);
        the shell calls `core.link_drained()` once it is not."""

    def pause_link(self) -> None:
        """Stop reading frames (the apply queue is full)."""

    def resume_link(self) -> None:
        """Read frames again."""

    def close_link(self, reason: str, refuse: bool = False) -> None:
        """Drop the link; REFUSE sends the reason to the peer first. `core.link_down` follows."""

    # --- the data disk ---------------------------------------------------------------------
    def pwrite_now(self, offset: int, data: bytes | memoryview) -> OSError | None:
        """A page-cache write, done before returning; the error if it failed."""

    def disk_write(self, token: int, offset: int, data: bytes | memoryview,
                   fua: bool) -> None: ...

    def disk_trim(self, token: int, offset: int, length: int, fua: bool) -> None: ...

    def disk_zeroes(self, token: int, offset: int, length: int, fua: bool, may_punch: bool,
                    fast_only: bool) -> None: ...

    def disk_read(self, token: int, offset: int, length: int, once: bool) -> None:
        """ONCE: a one-pass sweep read (resync, verify) that should not stay cached."""

    def disk_flush(self, token: int) -> None: ...

    def detach_disk(self) -> None:
        """Close the data disk and the metadata once the metadata effects queued before
        this call are done: the disk failed or the operator detached it."""

    def outdate_detached(self, token: int) -> None:
        """Open the metadata of the disk detached earlier and mark it Outdated (best effort:
        the outcome may be an error)."""

    # --- metadata ----------------------------------------------------------------------------
    def persist(self, token: int, changes: dict) -> None:
        """Write the superblock with CHANGES (field -> value) applied."""

    def flush_bitmap(self, token: int) -> None:
        """Make the data disk durable, then write the bitmap's changed pages (a bit cleared
        for a resynced block must not reach the disk before the block)."""

    def activate_al(self, token: int, extents: list[int]) -> None:
        """Make the data disk durable, then the activity-log extents active, durably
        (Metadata.al_activate): an extent leaves the log only once what was written into
        it is on the disk, or a crash would leave a block that differs from the peer's
        that no bitmap bit and no log extent marks."""

    # --- timers ------------------------------------------------------------------------------
    def set_timer(self, name: str, delay_s: float) -> None:
        """Call `core.timer(name)` after DELAY_S; replaces a pending timer of that name."""

    def cancel_timer(self, name: str) -> None: ...

    # --- split brain ----------------------------------------------------------------------------
    def victim_begin(self, info: dict) -> bool:
        """This node loses a split brain: from now until `victim_end`, every block of its
        disk is saved before its first overwrite (rblock/store/victim.py). Synchronous:
        in place before the resync's first write; False if it cannot be (no resync then)."""

    def victim_end(self) -> None:
        """The resync that began with `victim_begin` finished (no-op otherwise)."""

    # --- fencing ------------------------------------------------------------------------------
    def fence(self, token: int, kind: Txn) -> None:
        """Run fencing transaction KIND in etcd under this node's lease (fence_txn.build);
        its Answer (fence_txn.interpret; UNREACHABLE when no member with a quorum answers
        or there is no lease) comes back as `core.disk_done(token, answer, None)`."""

    # --- the world ---------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """A state change for the log and `rblock events`."""
