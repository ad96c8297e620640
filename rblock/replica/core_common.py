"""What the parts of the resource core share: its constants, phases, the records of writes,
locks, sweeps and apply jobs, and small pure helpers (rblock/replica/core.py has the theory
of operation)."""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c

from rblock.replica import wire
from rblock.replica.resync import SweepPlanner
from rblock.replica.state import (
    Disk,
    Repl,
    Role,
    Side,
)
from rblock.replica.wire import Frame, LinkError, T
from rblock.replica.writes import PendingWrite
from rblock.store.metadata import AL_EXTENT_BYTES, BLOCK_BYTES

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
    alone: bool = False  # written with no peer to replicate to (fencing checks it at the ack)


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



_S = Role.SECONDARY
# How good a disk's data is, for `attached`: a state never rises above what this run knew.
_DISK_RANK = {Disk.INCONSISTENT: 1, Disk.OUTDATED: 2, Disk.UPTODATE: 3}
