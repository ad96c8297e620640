"""Per-node, per-resource persistent metadata: superblock, activity log, dirty bitmap.

Theory of operation
-------------------
The metadata lives in an external file next to the backing disk (the disk itself holds only
guest data). Layout (format version 2), every offset a multiple of 4 KiB, integers big-endian
like the wire:

    0       superblock slot 0   (4 KiB)   magic | u32 version | u64 seq | u32 body length |
    4096    superblock slot 1   (4 KiB)   body (UTF-8 JSON) | u32 CRC-32C of all before it
    8192    activity log slot 0 (8 KiB)   magic | u64 seq | u32 count | count x u32 extent |
    16384   activity log slot 1 (8 KiB)   u32 CRC-32C of all before it
    24576   dirty bitmap                  one bit per block, rounded up to P pages of 4 KiB
    24576 + P * 4096
            bitmap CRC table              P x u32 CRC-32C, one per bitmap page (of all 4 KiB,
                                          the zero padding of the last page included),
                                          rounded up to 4 KiB

Superblock and activity log are each written to the slot `seq % 2`, then fdatasync'ed. A
crash in the middle of a write tears at most the slot being written; the other slot still
holds the previous state, and reading picks the valid slot with the highest seq. The seq is
only advanced once a write has succeeded, so a failed write is retried into the same slot.

The dirty bitmap says which blocks may differ from the peer. A write while the peer is away
sets bits in memory; pages are written back by `flush_bitmap` (the caller decides when). Bits
in memory but not yet on disk are protected by the activity log (AL): the set of 4 MiB
extents that may be written right now. A write first makes sure its extents are in the AL
(on disk), so after a crash every block that might differ between the nodes lies either in
a persisted bitmap bit or in an AL extent, and `recover_crash` turns the AL into bitmap
bits. Before an extent leaves the AL its bitmap pages are flushed, because from then on the
bitmap alone protects it.

Bitmap pages have no second slot: a page is rewritten in place, so a crash in the middle of
a write-back, or a disk that loses or garbles a page, would silently drop set bits (the
resync skips those blocks, and both nodes claim UpToDate with different data). Each page
therefore has a CRC-32C in the table. A write-back writes the pages, then their table
entries, then one fdatasync; `create` fills the table with the CRC of an all-zero page
(not 0, so a page zeroed together with its entry is caught too). On load a page whose CRC
does not match is taken as all bits set: every block it covers is resynced in full. That is
always safe (a set bit only costs a copy), so a torn write-back (page written, entry not, or
the other way round) is survivable, and so is a corrupted page. Such a page is logged, stays
dirty in memory and is rewritten with its CRC by the next flush. A version-1 file (no table)
is upgraded in place on open: the table is computed from the bitmap as read and made
durable, then both superblock slots are rewritten with version 2 (a crash in between leaves
a version-1 file, upgraded again at the next open).

All file I/O goes through a `MetaFile` (pread, pwrite, sync, size, truncate, close):
`FdFile` for a real file, which holds an exclusive flock from the moment it is opened (a
second `rblock up`, or create-md under a running daemon, must not read or write a file in
use), or any object a test or simulator supplies (`create_on`, `open_on`).

Threads: the event loop owns the `Bitmap` (it alone sets and clears bits) and calls the cheap
AL queries; blocking methods (`write_superblock`, `flush_bitmap`, `al_activate`) run in a
worker thread. Page write-back marks pages clean *before* copying them, so a bit set during a
flush re-dirties its page and goes out with the next flush; the CRC is computed over the
copy, so it always matches the bytes written. All metadata I/O is serialized by one lock;
the AL's in-memory state has its own short lock so loop-side queries never wait for a disk.

Eviction never picks a pinned extent. A write pins its extents (`al_pin`) *before* asking
`al_missing` and unpins them once it is complete and any bitmap bit it needs is set: an
extent it saw as active then cannot be evicted under it, however long the peer takes. (The
victims are chosen and dropped from the AL in one step under the AL lock, so a writer either
pinned in time or finds its extent missing and activates it again.)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import stat
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import crc32c

from rblock.store.volume import in_use_message, try_flock

log = logging.getLogger("rblock.meta")

FORMAT_VERSION = 2  # 2: a CRC-32C per bitmap page; 1 (no CRC table) is upgraded on open
FORMAT_VERSION_NO_BITMAP_CRC = 1
UUID_JUST_CREATED = 4  # DRBD's marker for "metadata created, no data yet"
UUID_MAX = 2**64 - 1
UUID_HISTORY_MAX = 2
DISK_INCONSISTENT = "inconsistent"
DISK_OUTDATED = "outdated"
DISK_UPTODATE = "uptodate"
DISK_STATES = (DISK_INCONSISTENT, DISK_OUTDATED, DISK_UPTODATE)

PAGE_BYTES = 4096  # unit of the file layout and of bitmap write-back
BLOCK_BYTES = 4096  # disk bytes per bitmap bit
BLOCK_BYTES_MIN = 512
AL_EXTENT_BYTES = 4 * 1024 * 1024  # disk bytes per activity log extent
# A 64 TiB disk needs a 2 GiB bitmap in memory; beyond that this design is the wrong tool.
SIZE_BYTES_MAX = 64 * 2**40

SB_MAGIC = b"RBLKMETA"
SB_HEADER = struct.Struct(">8sIQI")  # magic, version, seq, body length
SB_SLOT_BYTES = 4096
SB_OFFSET = 0
AL_MAGIC = b"RBLKALOG"
AL_HEADER = struct.Struct(">8sQI")  # magic, seq, count
AL_SLOT_BYTES = 8192
AL_OFFSET = SB_OFFSET + 2 * SB_SLOT_BYTES
BITMAP_OFFSET = AL_OFFSET + 2 * AL_SLOT_BYTES
CRC = struct.Struct(">I")
BITS_PER_PAGE = PAGE_BYTES * 8
# The table entry create-md writes for every page: an all-zero page's CRC is not 0, so a
# zeroed page with a zeroed entry does not pass as a valid empty page.
ZERO_PAGE_CRC = crc32c.crc32c(bytes(PAGE_BYTES))
assert ZERO_PAGE_CRC != 0
SB_BODY_MAX_BYTES = SB_SLOT_BYTES - SB_HEADER.size - CRC.size
AL_EXTENTS_MAX = (AL_SLOT_BYTES - AL_HEADER.size - CRC.size) // 4  # what fits in a slot

# Bitmap spans are processed in chunks so no temporary integer grows past this.
SPAN_CHUNK_BYTES = 1024 * 1024
IO_CHUNK_BYTES = 1024 * 1024  # largest single pwrite of bitmap pages or CRC entries
# Largest single pread of the bitmap at open (Linux caps one read at just under 2 GiB, the
# bitmap of a 64 TiB disk; a bounded chunk also bounds the temporary copy).
READ_CHUNK_BYTES = 16 * 1024 * 1024
BAD_PAGE_RUNS_LOGGED_MAX = 8  # runs of bad bitmap pages logged one by one, then a summary

SCAN_NEAR_BYTES = 256  # searched byte by byte first: set bits tend to be close
SCAN_CHUNK_BYTES = 64 * 1024  # then compared a chunk at a time with a uniform chunk

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FF = re.compile(rb"[^\xff]")
_ZEROES = bytes(SCAN_CHUNK_BYTES)
_ONES = b"\xff" * SCAN_CHUNK_BYTES


class MetadataError(Exception):
    """Metadata missing, corrupt or not ours; the message names the file and the fix."""


class ActivityLogFull(MetadataError):
    """Every extent in the AL is in use: wait for writes to complete, then retry."""


# --- the dirty bitmap --------------------------------------------------------------------


def _lowest_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


class Bitmap:
    """One bit per block of the disk: set = this block may differ from the peer.

    Bit i is byte i // 8, bit i % 8 (LSB first). Pure, no I/O. Counts set bits and the
    4 KiB pages of the bitmap changed since `mark_clean`, both kept up to date on every
    change, so `count()` is O(1) and write-back touches only changed pages.
    """

    def __init__(self, nbits: int, data: bytes | bytearray | memoryview | None = None,
                 block_bytes: int = BLOCK_BYTES):
        if nbits <= 0:
            raise ValueError(f"a bitmap needs at least one bit, not {nbits}")
        if block_bytes < 1 or block_bytes & (block_bytes - 1):
            raise ValueError(f"block size {block_bytes} is not a power of two")
        self.nbits = nbits
        self.block_bytes = block_bytes
        self._shift = block_bytes.bit_length() - 1
        self.nbytes = (nbits + 7) // 8
        self._dirty: set[int] = set()
        if data is None:
            self._buf = bytearray(self.nbytes)
            self._count = 0
            return
        if len(data) < self.nbytes:
            raise ValueError(f"bitmap data is {len(data)} bytes, {nbits} bits need "
                             f"{self.nbytes}")
        self._buf = bytearray(memoryview(data)[:self.nbytes])
        # Bits past the end of the disk must be clear: otherwise count() would include
        # blocks that do not exist, and the data is not a bitmap of this disk.
        spare = (-nbits) % 8
        if spare and self._buf[-1] >> (8 - spare):
            raise ValueError(f"bitmap has bits set past its last block {nbits - 1}")
        if any(memoryview(data)[self.nbytes:]):
            raise ValueError(f"bitmap has bytes set past its end (byte {self.nbytes})")
        self._count = sum(int.from_bytes(self._buf[i:i + SPAN_CHUNK_BYTES], "little")
                          .bit_count() for i in range(0, self.nbytes, SPAN_CHUNK_BYTES))

    # --- byte ranges of the disk ----------------------------------------------------------

    def set_range(self, offset_bytes: int, length_bytes: int) -> int:
        """Mark every block the range touches; returns how many were newly set."""
        if length_bytes <= 0:
            assert length_bytes == 0, f"negative length {length_bytes}"
            return 0
        first = offset_bytes >> self._shift
        last = (offset_bytes + length_bytes - 1) >> self._shift
        assert 0 <= offset_bytes and last < self.nbits, \
            f"range {offset_bytes}+{length_bytes} is outside {self.nbits} blocks"
        if first == last:
            # The common case, a write of one block: no big-int arithmetic.
            i = first >> 3
            mask = 1 << (first & 7)
            b = self._buf[i]
            if b & mask:
                return 0
            self._buf[i] = b | mask
            self._count += 1
            self._dirty.add(i >> 12)
            return 1
        return self._span(first, last + 1 - first, True)

    def clear_range(self, offset_bytes: int, length_bytes: int) -> int:
        """Clear the blocks the range covers fully (a partial block may still differ);
        returns how many were cleared."""
        assert 0 <= offset_bytes and length_bytes >= 0
        first = (offset_bytes + self.block_bytes - 1) >> self._shift
        end = (offset_bytes + length_bytes) >> self._shift
        if end <= first:
            return 0
        assert end <= self.nbits, \
            f"range {offset_bytes}+{length_bytes} is outside {self.nbits} blocks"
        return self._span(first, end - first, False)

    def any_in_range(self, offset_bytes: int, length_bytes: int) -> bool:
        if length_bytes <= 0:
            return False
        first = offset_bytes >> self._shift
        last = (offset_bytes + length_bytes - 1) >> self._shift
        assert 0 <= offset_bytes and last < self.nbits
        return self._find_set(first, last + 1) is not None

    # --- blocks ---------------------------------------------------------------------------

    def set_blocks(self, first_block: int, count: int) -> int:
        self._check_blocks(first_block, count)
        return self._span(first_block, count, True) if count else 0

    def clear_blocks(self, first_block: int, count: int) -> int:
        self._check_blocks(first_block, count)
        return self._span(first_block, count, False) if count else 0

    def test_block(self, i: int) -> bool:
        assert 0 <= i < self.nbits, f"block {i} is outside {self.nbits} blocks"
        return bool(self._buf[i >> 3] & (1 << (i & 7)))

    def count(self) -> int:
        return self._count

    def next_run(self, start_block: int, max_blocks: int) -> tuple[int, int] | None:
        """The first run of set bits at or after START_BLOCK, as (first, length), length at
        most MAX_BLOCKS; None if no bit is set from there on."""
        assert start_block >= 0 and max_blocks > 0
        first = self._find_set(start_block)
        if first is None:
            return None
        limit = min(self.nbits, first + max_blocks)
        return first, self._find_clear(first, limit) - first

    def merge(self, other: bytes | bytearray | memoryview | Bitmap) -> int:
        """OR OTHER (a peer's bitmap) into this one; returns how many bits were newly set."""
        if isinstance(other, Bitmap):
            assert other.nbits == self.nbits, f"bitmaps of {other.nbits} and {self.nbits} bits"
            src = memoryview(other._buf)
        else:
            src = Bitmap(self.nbits, other, self.block_bytes)._buf  # checks length and tail
        before = self._count
        for a in range(0, self.nbytes, PAGE_BYTES):
            z = min(a + PAGE_BYTES, self.nbytes)
            old = int.from_bytes(self._buf[a:z], "little")
            new = old | int.from_bytes(src[a:z], "little")
            if new != old:
                self._buf[a:z] = new.to_bytes(z - a, "little")
                self._count += new.bit_count() - old.bit_count()
                self._dirty.add(a // PAGE_BYTES)
        return self._count - before

    def to_bytes(self) -> bytes:
        return bytes(self._buf)

    def page_bytes(self, page: int) -> bytes:
        """A copy of one 4 KiB page of the bitmap (the last one may be shorter)."""
        return bytes(self._buf[page * PAGE_BYTES:(page + 1) * PAGE_BYTES])

    # --- write-back tracking --------------------------------------------------------------

    def dirty_pages(self) -> set[int]:
        return set(self._dirty)

    def mark_clean(self, pages: Iterable[int]) -> None:
        self._dirty.difference_update(pages)

    def mark_dirty(self, pages: Iterable[int]) -> None:
        """Undo a mark_clean whose write-back failed."""
        self._dirty.update(pages)

    def pages_for_blocks(self, first_block: int, count: int) -> range:
        """The bitmap pages holding the bits of these blocks."""
        return range((first_block >> 3) // PAGE_BYTES,
                     ((first_block + count - 1) >> 3) // PAGE_BYTES + 1)

    # --- internals ------------------------------------------------------------------------

    def _check_blocks(self, first_block: int, count: int) -> None:
        assert first_block >= 0 and count >= 0 and first_block + count <= self.nbits, \
            f"blocks {first_block}+{count} are outside {self.nbits} blocks"

    def _span(self, first: int, count: int, value: bool) -> int:
        """Set or clear COUNT bits from FIRST with whole-int operations, chunk by chunk."""
        changed_total = 0
        end = first + count
        while first < end:
            a = first >> 3
            stop = min(end, (a + SPAN_CHUNK_BYTES) << 3)
            z = (stop + 7) >> 3
            n = stop - first
            mask = ((1 << n) - 1) << (first - (a << 3))
            old_bytes = self._buf[a:z]
            old = int.from_bytes(old_bytes, "little")
            hit = (old & mask).bit_count()
            if value:
                changed, new = n - hit, old | mask
            else:
                changed, new = hit, old & ~mask
            if changed:
                new_bytes = new.to_bytes(z - a, "little")
                self._buf[a:z] = new_bytes
                self._count += changed if value else -changed
                self._mark_changed(a, old_bytes, new_bytes)
            changed_total += changed
            first = stop
        return changed_total

    def _mark_changed(self, a: int, old: bytes | bytearray, new: bytes) -> None:
        """Dirty exactly the pages whose bytes changed (starting at bitmap byte A)."""
        p_first, p_last = a // PAGE_BYTES, (a + len(new) - 1) // PAGE_BYTES
        if p_first == p_last:
            self._dirty.add(p_first)
            return
        for p in range(p_first, p_last + 1):
            i = max(p * PAGE_BYTES, a) - a
            j = min((p + 1) * PAGE_BYTES - a, len(new))
            if old[i:j] != new[i:j]:
                self._dirty.add(p)

    def _find_set(self, start: int, limit: int | None = None) -> int | None:
        """The first set bit in [START, LIMIT) (LIMIT defaults to the end), or None."""
        limit = self.nbits if limit is None else limit
        if start >= limit:
            return None
        i = start >> 3
        head = self._buf[i] >> (start & 7)
        if head:
            found = start + _lowest_bit(head)
        else:
            j = self._find_byte_not(_NONZERO, _ZEROES, i + 1, (limit + 7) >> 3)
            if j is None:
                return None
            found = (j << 3) + _lowest_bit(self._buf[j])  # bits past nbits are always clear
        return found if found < limit else None

    def _find_clear(self, start: int, limit: int) -> int:
        """The first clear bit in [START, LIMIT), or LIMIT."""
        i = start >> 3
        head = (~self._buf[i] & 0xFF) >> (start & 7)
        if head:
            return min(start + _lowest_bit(head), limit)
        j = self._find_byte_not(_NOT_FF, _ONES, i + 1, (limit + 7) >> 3)
        if j is None:
            return limit
        return min((j << 3) + _lowest_bit(~self._buf[j] & 0xFF), limit)

    def _find_byte_not(self, pattern: re.Pattern, fill: bytes, start: int,
                       end: int) -> int | None:
        """The first byte in [START, END) that differs from the FILL byte, or None.
        Near START a regex finds it at once; further away, chunks compared with memcmp
        skip 10 GB/s of uniform bitmap, then the regex pins it down inside the chunk."""
        near = min(start + SCAN_NEAR_BYTES, end)
        m = pattern.search(self._buf, start, near)
        if m is not None:
            return m.start()
        for a in range(near, end, SCAN_CHUNK_BYTES):
            z = min(a + SCAN_CHUNK_BYTES, end)
            if self._buf[a:z] != fill[:z - a]:  # a full-length slice of bytes is free
                return pattern.search(self._buf, a, z).start()
        return None


# --- the superblock ----------------------------------------------------------------------


@dataclass(frozen=True)
class Superblock:
    node: str
    resource: str
    size_bytes: int
    block_bytes: int = BLOCK_BYTES
    uuid_current: int = UUID_JUST_CREATED
    uuid_bitmap: int = 0
    uuid_history: tuple[int, ...] = ()  # newest first
    disk_state: str = DISK_INCONSISTENT
    role_primary: bool = False  # was primary and has not shut down cleanly since
    clean_shutdown: bool = True
    promoted_at: float = 0.0  # unix time of the last promotion (after-sb discard-younger-primary)
    extra: dict = field(default_factory=dict)  # keys of later versions, kept as they are

    def __post_init__(self) -> None:
        # JSON and callers hand lists; a tuple keeps the frozen superblock really frozen.
        object.__setattr__(self, "uuid_history", tuple(self.uuid_history))

    def problems(self) -> list[str]:
        """Broken invariants, empty if none: checked after reading and before writing."""
        out = []
        for name in ("node", "resource"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(f"{name} {getattr(self, name)!r} is not a non-empty string")
        bb = self.block_bytes
        if type(bb) is not int or bb < BLOCK_BYTES_MIN or bb & (bb - 1) or bb > AL_EXTENT_BYTES:
            out.append(f"block_bytes {bb!r} is not a power of two in "
                       f"{BLOCK_BYTES_MIN}..{AL_EXTENT_BYTES}")
        elif (type(self.size_bytes) is not int or not 0 < self.size_bytes <= SIZE_BYTES_MAX
              or self.size_bytes % bb):
            out.append(f"size_bytes {self.size_bytes!r} is not a positive multiple of "
                       f"{bb} up to {SIZE_BYTES_MAX}")
        uuids = (self.uuid_current, self.uuid_bitmap, *self.uuid_history)
        if not all(type(u) is int and 0 <= u <= UUID_MAX for u in uuids):
            out.append(f"a generation UUID is not in 0..2**64-1: {uuids}")
        if len(self.uuid_history) > UUID_HISTORY_MAX:
            out.append(f"uuid_history has {len(self.uuid_history)} entries, at most "
                       f"{UUID_HISTORY_MAX}")
        if self.disk_state not in DISK_STATES:
            out.append(f"disk_state {self.disk_state!r} is not one of {', '.join(DISK_STATES)}")
        pa = self.promoted_at
        if isinstance(pa, bool) or not isinstance(pa, (int, float)) or not 0 <= pa < 1e11:
            out.append(f"promoted_at {pa!r} is not a unix time")
        for name in ("role_primary", "clean_shutdown"):
            if type(getattr(self, name)) is not bool:
                out.append(f"{name} {getattr(self, name)!r} is not a bool")
        if not isinstance(self.extra, dict) or set(self.extra) & _SB_FIELDS:
            out.append(f"extra {self.extra!r} is not a dict of keys apart from the fields")
        return out

    def to_json(self) -> bytes:
        """Fields and extra keys side by side, so a later version's new field written at
        the top level is kept by this one, and read back by the later one, unchanged."""
        d = {f: getattr(self, f) for f in _SB_FIELDS}
        d["uuid_history"] = list(self.uuid_history)
        return json.dumps({**self.extra, **d}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> Superblock:
        d = json.loads(body.decode("utf-8"))
        if not isinstance(d, dict):
            raise ValueError("the body is not a JSON object")
        missing = {"node", "resource", "size_bytes"} - set(d)
        if missing:
            raise ValueError(f"the body lacks {', '.join(sorted(missing))}")
        known = {k: v for k, v in d.items() if k in _SB_FIELDS}
        if not isinstance(known.get("uuid_history", []), list):
            raise ValueError("uuid_history is not a list")
        return cls(**known, extra={k: v for k, v in d.items() if k not in _SB_FIELDS})


_SB_FIELDS = frozenset(f.name for f in dataclasses.fields(Superblock)) - {"extra"}


def _encode_sb_slot(seq: int, sb: Superblock, version: int = FORMAT_VERSION) -> bytes:
    """A full slot; VERSION other than the current one only for tests of old files."""
    body = sb.to_json()
    if len(body) > SB_BODY_MAX_BYTES:
        raise ValueError(f"superblock body is {len(body)} bytes, a slot holds "
                         f"{SB_BODY_MAX_BYTES}: too much in extra")
    head = SB_HEADER.pack(SB_MAGIC, version, seq, len(body)) + body
    slot = head + CRC.pack(crc32c.crc32c(head))
    return slot + bytes(SB_SLOT_BYTES - len(slot))


def _decode_sb_slot(slot: bytes) -> tuple[int, Superblock, int]:
    """(seq, superblock, format version) of a valid slot; ValueError saying what is wrong
    otherwise (_NewerFormat for a version this rblock cannot read)."""
    if len(slot) < SB_SLOT_BYTES:
        raise ValueError("the file ends inside it")
    magic, version, seq, body_len = SB_HEADER.unpack_from(slot)
    if magic != SB_MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if body_len > SB_BODY_MAX_BYTES:
        raise ValueError(f"body length {body_len} exceeds {SB_BODY_MAX_BYTES}")
    end = SB_HEADER.size + body_len
    (crc,) = CRC.unpack_from(slot, end)
    if crc != crc32c.crc32c(slot[:end]):
        raise ValueError("CRC-32C mismatch (torn or corrupted write)")
    if version > FORMAT_VERSION:
        raise _NewerFormat(version)
    if version < FORMAT_VERSION_NO_BITMAP_CRC:
        raise ValueError(f"format version {version} was never written by rblock")
    sb = Superblock.from_json(slot[SB_HEADER.size:end])
    problems = sb.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return seq, sb, version


class _NewerFormat(ValueError):
    pass


# --- the activity log slots --------------------------------------------------------------


def _encode_al_slot(seq: int, extents: list[int]) -> bytes:
    assert len(extents) <= AL_EXTENTS_MAX and all(0 <= e < 2**32 for e in extents)
    head = AL_HEADER.pack(AL_MAGIC, seq, len(extents)) + struct.pack(f">{len(extents)}I",
                                                                     *extents)
    slot = head + CRC.pack(crc32c.crc32c(head))
    return slot + bytes(AL_SLOT_BYTES - len(slot))


def _decode_al_slot(slot: bytes, extents_total: int) -> tuple[int, list[int]]:
    if len(slot) < AL_SLOT_BYTES:
        raise ValueError("the file ends inside it")
    magic, seq, count = AL_HEADER.unpack_from(slot)
    if magic != AL_MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if count > AL_EXTENTS_MAX:
        raise ValueError(f"count {count} exceeds {AL_EXTENTS_MAX}")
    end = AL_HEADER.size + 4 * count
    (crc,) = CRC.unpack_from(slot, end)
    if crc != crc32c.crc32c(slot[:end]):
        raise ValueError("CRC-32C mismatch (torn or corrupted write)")
    extents = list(struct.unpack_from(f">{count}I", slot, AL_HEADER.size))
    bad = [e for e in extents if e >= extents_total]
    if bad or len(set(extents)) != count:
        raise ValueError(f"extents out of range or repeated: {extents[:8]}...")
    return seq, extents


# --- file layout -------------------------------------------------------------------------


def bitmap_pages(size_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """How many 4 KiB pages the bitmap of a disk of SIZE_BYTES takes."""
    return -(-((size_bytes // block_bytes + 7) // 8) // PAGE_BYTES)


def bitmap_region_bytes(size_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    return bitmap_pages(size_bytes, block_bytes) * PAGE_BYTES


def crc_table_offset(size_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Where the bitmap pages' CRC table starts: right after the bitmap."""
    return BITMAP_OFFSET + bitmap_region_bytes(size_bytes, block_bytes)


def crc_table_bytes(size_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    entries_bytes = bitmap_pages(size_bytes, block_bytes) * CRC.size
    return -(-entries_bytes // PAGE_BYTES) * PAGE_BYTES


def metadata_file_bytes(size_bytes: int, block_bytes: int = BLOCK_BYTES,
                        version: int = FORMAT_VERSION) -> int:
    """The size of the metadata file of a disk of SIZE_BYTES (in format VERSION)."""
    end = crc_table_offset(size_bytes, block_bytes)
    if version == FORMAT_VERSION_NO_BITMAP_CRC:
        return end
    return end + crc_table_bytes(size_bytes, block_bytes)


# --- the file under the metadata ---------------------------------------------------------


class MetaFile(Protocol):
    """What Metadata needs of its file. `FdFile` is the real one; a simulator or a test
    passes its own (an in-memory image, a disk that tears writes) to `create_on`/`open_on`.

    Calls come from one thread at a time (Metadata serializes them), blocking is fine."""

    name: str  # named in every message about the file

    def pread(self, length: int, offset: int) -> bytes:
        """Up to LENGTH bytes at OFFSET; fewer only at the end of the file."""
        ...

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of DATA at OFFSET (growing the file if needed), or raise OSError."""
        ...

    def sync(self) -> None:
        """Make every completed pwrite durable (fdatasync)."""
        ...

    def size(self) -> int:
        ...

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the file to SIZE bytes."""
        ...

    def close(self) -> None:
        ...


class FdFile:
    """A MetaFile on a real file: os calls on one descriptor, which holds an exclusive flock
    from right after the open until `close`.

    The lock is what keeps a second `rblock up` (or create-md under a running daemon) from
    reading the metadata, running crash recovery and writing a superblock under the daemon
    that uses it. flock locks belong to the open file description, so a second open of the
    same file in the same process is refused too, and the lock goes when the process dies."""

    def __init__(self, path: str, create: bool = False):
        """Open PATH read-write (creating it, mode 0600, if CREATE) and lock it; raises
        MetadataError naming the file and the fix."""
        self.name = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self.fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            if create:
                raise MetadataError(f"cannot create metadata {path}: its directory does not "
                                    "exist: create it, or fix the metadata path") from None
            raise MetadataError(f"metadata {path} does not exist: run `rblock create-md` "
                                "first") from None
        except OSError as e:
            raise MetadataError(f"cannot {'create' if create else 'open'} metadata {path}: "
                                f"{e.strerror}") from None
        try:
            # Before anything is read or written: a file in use is not even looked at.
            if not try_flock(self.fd, shared=False):
                raise MetadataError(in_use_message(
                    self.fd, f"metadata {path}",
                    "is `rblock up` running for this node? stop it first"))
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise MetadataError(f"metadata {path} is not a regular file: give a file path")
            if create:
                _fsync_dir(path)  # the new entry must survive a crash, not just the contents
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            if n <= 0:
                raise OSError(f"{self.name}: pwrite at {offset} wrote nothing")
            view = view[n:]
            offset += n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Close (which drops the lock); a second call does nothing."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # A Metadata dropped without close (an error path) must not keep the file locked
        # for the rest of the process's life; warn like an unclosed io.FileIO does.
        if getattr(self, "fd", -1) >= 0:
            warnings.warn(f"metadata {self.name} was not closed", ResourceWarning,
                          stacklevel=2)
            self.close()


def _pread_exact(file: MetaFile, length: int, offset: int) -> bytes:
    data = file.pread(length, offset)
    if len(data) != length:
        raise OSError(f"{file.name}: short read: {len(data)} of {length} bytes at {offset}")
    return data


def _read_superblock(file: MetaFile) -> tuple[int, Superblock, int]:
    """(seq, superblock, format version) of the valid slot with the highest seq; one bad
    slot is logged, two are an error."""
    path = file.name
    good: list[tuple[int, int, Superblock, int]] = []
    bad: list[str] = []
    for slot in range(2):
        raw = file.pread(SB_SLOT_BYTES, SB_OFFSET + slot * SB_SLOT_BYTES)
        try:
            seq, sb, version = _decode_sb_slot(raw)
        except _NewerFormat as e:
            raise MetadataError(
                f"metadata {path} has format version {e.args[0]}, this rblock reads "
                f"{FORMAT_VERSION} and older: use the rblock that wrote it (or a newer "
                "one)") from None
        except (ValueError, UnicodeDecodeError, TypeError, struct.error) as e:
            bad.append(f"slot {slot}: {e}")
            continue
        good.append((seq, slot, sb, version))
    if not good:
        raise MetadataError(
            f"metadata {path} has no valid superblock ({'; '.join(bad)}): run "
            "`rblock create-md` again (the data on the disk itself is untouched; the next "
            "connect does a full sync)")
    seq, slot, sb, version = max(good, key=lambda g: g[0])
    if bad:
        log.warning("metadata %s: superblock %s; using slot %d (seq %d)",
                    path, bad[0], slot, seq)
    return seq, sb, version


def _refuse_to_overwrite(file: MetaFile) -> None:
    """create-md without --force may replace only an empty file or broken metadata: never
    valid metadata, and never a file that is not metadata at all (a path mixed up with the
    disk's would otherwise cost the guest's data)."""
    path = file.name
    try:
        _, old, _ = _read_superblock(file)
    except MetadataError:
        pass
    else:
        raise MetadataError(
            f"metadata {path} already exists (node '{old.node}', resource '{old.resource}', "
            f"{old.size_bytes} bytes): pass --force to wipe it (its dirty bitmap is lost, so "
            "the next connect does a full sync)")
    head = file.pread(2 * SB_SLOT_BYTES, SB_OFFSET)
    ours = any(head[i:i + len(SB_MAGIC)] == SB_MAGIC for i in (0, SB_SLOT_BYTES))
    if not ours and head.strip(b"\0"):
        raise MetadataError(
            f"{path} exists and is not rblock metadata (is it the disk itself?): check the "
            "metadata path; pass --force to overwrite the file anyway")


def _fsync_dir(path: str) -> None:
    """Make a newly created file's directory entry durable, not just its contents."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_crc_entries(file: MetaFile, table_offset: int, first_page: int,
                       crcs: list[int]) -> None:
    """Table entries of pages FIRST_PAGE.. (one pwrite per IO_CHUNK_BYTES of entries)."""
    per_write = IO_CHUNK_BYTES // CRC.size
    for i in range(0, len(crcs), per_write):
        chunk = crcs[i:i + per_write]
        file.pwrite(struct.pack(f">{len(chunk)}I", *chunk),
                    table_offset + (first_page + i) * CRC.size)


# --- the metadata of one resource on one node --------------------------------------------


class Metadata:
    def __init__(self, file: MetaFile, seq: int, sb: Superblock,
                 al_extents_max: int = AL_EXTENTS_MAX, bitmap: Bitmap | None = None):
        """Use `create`/`open` (or `create_on`/`open_on`); this only assembles what they
        read or wrote. From here on the Metadata owns FILE: `close` closes it."""
        assert 0 < al_extents_max <= AL_EXTENTS_MAX
        self.file = file
        self.path = file.name
        self.sb = sb
        self.sb_seq = seq
        self.al_extents_max = al_extents_max
        self.al_seq = 0
        self.al_extents_total = -(-sb.size_bytes // AL_EXTENT_BYTES)
        nbits = sb.size_bytes // sb.block_bytes
        if bitmap is None:
            bitmap = Bitmap(nbits, block_bytes=sb.block_bytes)
        self.bitmap = bitmap
        assert self.bitmap.nbits == nbits and self.bitmap.block_bytes == sb.block_bytes
        # Pages whose CRC did not match at open (taken as all set): for status and tests.
        self.bitmap_pages_bad: tuple[int, ...] = ()
        self._crc_offset = crc_table_offset(sb.size_bytes, sb.block_bytes)
        self._blocks_per_extent = AL_EXTENT_BYTES // sb.block_bytes
        self._al: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._al_pins: dict[int, int] = {}  # extent -> writes in flight in it
        self._al_lost = False  # both AL slots unreadable: any block may differ after a crash
        # Loaded after a crash and recover_crash not yet run: the AL must not change until
        # it has been turned into bitmap bits.
        self._crash_pending = not sb.clean_shutdown
        self._closed = False
        self._al_lock = threading.Lock()  # in-memory AL state; held only for microseconds
        self._io_lock = threading.RLock()  # one metadata write at a time, in seq order

    # --- create and open ------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, node: str, resource: str, size_bytes: int,
               force: bool = False, *, al_extents_max: int = AL_EXTENTS_MAX) -> Metadata:
        """create-md: fresh metadata in the file PATH (created with mode 0600 if missing,
        locked against every other user first). Blocking."""
        file = FdFile(path, create=True)
        try:
            return cls.create_on(file, node, resource, size_bytes, force,
                                 al_extents_max=al_extents_max)
        except BaseException:
            file.close()
            raise

    @classmethod
    def create_on(cls, file: MetaFile, node: str, resource: str, size_bytes: int,
                  force: bool = False, *, al_extents_max: int = AL_EXTENTS_MAX) -> Metadata:
        """create-md on FILE: fresh metadata for a disk of SIZE_BYTES. Refuses to wipe valid
        metadata unless FORCE. On success the Metadata owns FILE; on failure the caller
        still does. Blocking."""
        path = file.name
        sb = Superblock(node=node, resource=resource, size_bytes=size_bytes)
        problems = sb.problems()
        if problems:
            raise MetadataError(f"cannot create metadata {path}: {'; '.join(problems)}")
        if not force:
            _refuse_to_overwrite(file)
        # Truncating to 0 first drops any old bitmap; the regrown file is sparse zeros.
        file.truncate(0)
        file.truncate(metadata_file_bytes(size_bytes))
        for seq in range(2):  # both slots, so neither holds garbage
            file.pwrite(_encode_al_slot(seq, []), AL_OFFSET + seq * AL_SLOT_BYTES)
        _write_crc_entries(file, crc_table_offset(size_bytes), 0,
                           [ZERO_PAGE_CRC] * bitmap_pages(size_bytes))
        # The superblock goes last, after the rest is durable: a crash in between leaves
        # a file that create-md simply redoes, never a valid superblock over garbage.
        file.sync()
        for seq in range(2):
            file.pwrite(_encode_sb_slot(seq, sb), SB_OFFSET + seq * SB_SLOT_BYTES)
        file.sync()
        md = cls(file, 1, sb, al_extents_max)
        md.al_seq = 1
        log.info("metadata %s created: node %s, resource %s, %d bytes", path, node,
                 resource, size_bytes)
        return md

    @classmethod
    def open(cls, path: str, node: str | None = None, resource: str | None = None,
             size_bytes: int | None = None, *,
             al_extents_max: int = AL_EXTENTS_MAX) -> Metadata:
        """Open the file PATH, locked against every other user before anything is read,
        and load it as `open_on` does. Blocking."""
        file = FdFile(path)
        try:
            return cls.open_on(file, node, resource, size_bytes,
                               al_extents_max=al_extents_max)
        except BaseException:
            file.close()
            raise

    @classmethod
    def open_on(cls, file: MetaFile, node: str | None = None, resource: str | None = None,
                size_bytes: int | None = None, *,
                al_extents_max: int = AL_EXTENTS_MAX) -> Metadata:
        """Load superblock, activity log and bitmap from FILE, checking they belong to NODE,
        RESOURCE and a disk of SIZE_BYTES (each only if given). Bitmap pages failing their
        CRC are taken as all set (`bitmap_pages_bad` lists them); a version-1 file is
        upgraded in place. On success the Metadata owns FILE; on failure the caller still
        does. Blocking."""
        path = file.name
        seq, sb, version = _read_superblock(file)
        _check_identity(path, sb, node, resource, size_bytes)
        need = metadata_file_bytes(sb.size_bytes, sb.block_bytes, version)
        have = file.size()
        if have < need:
            raise MetadataError(f"metadata {path} is truncated ({have} bytes, needs "
                                f"{need}): run `rblock create-md` again")
        checked = version != FORMAT_VERSION_NO_BITMAP_CRC
        bitmap, bad = _load_bitmap(file, sb, checked)
        md = cls(file, seq, sb, al_extents_max, bitmap)
        md.bitmap_pages_bad = bad
        md._load_al()
        if not checked:
            md._add_crc_table(version)
        log.info("metadata %s opened: seq %d, %s, %d blocks out of sync, AL %d extents%s%s",
                 path, md.sb_seq, sb.disk_state, md.bitmap.count(), len(md._al),
                 "" if sb.clean_shutdown else ", NOT shut down cleanly",
                 f", {len(bad)} bitmap pages failed their CRC (taken as all set)"
                 if bad else "")
        return md

    def _add_crc_table(self, old_version: int) -> None:
        """Upgrade a file without a bitmap CRC table: the table from the bitmap as read,
        durable, then the superblock with the new version in both slots (a later torn
        superblock write must not fall back to an old-version slot, whose bitmap the next
        open would trust unchecked). A crash before the superblock is durable leaves an
        old-version file, upgraded again at the next open."""
        with self._io_lock:
            pages = bitmap_pages(self.sb.size_bytes, self.sb.block_bytes)
            need = metadata_file_bytes(self.sb.size_bytes, self.sb.block_bytes)
            if self.file.size() < need:
                self.file.truncate(need)
            _write_crc_entries(self.file, self._crc_offset, 0,
                               [crc32c.crc32c(self._page_image(p)) for p in range(pages)])
            self.file.sync()
            self.write_superblock()
            self.write_superblock()
        log.warning("metadata %s: upgraded in place from format version %d to %d (added a "
                    "CRC-32C for each of its %d bitmap pages); an rblock older than this one "
                    "can no longer open it", self.path, old_version, FORMAT_VERSION, pages)

    def _load_al(self) -> None:
        good: list[tuple[int, list[int]]] = []
        bad: list[str] = []
        for slot in range(2):
            raw = self.file.pread(AL_SLOT_BYTES, AL_OFFSET + slot * AL_SLOT_BYTES)
            try:
                good.append(_decode_al_slot(raw, self.al_extents_total))
            except (ValueError, struct.error) as e:
                bad.append(f"slot {slot}: {e}")
        if not good:
            # Not fatal: the AL only matters after a crash, and then treating every block as
            # out of sync (a full resync) is correct, just slow.
            self._al_lost = not self.sb.clean_shutdown
            log.error("metadata %s: activity log unreadable (%s)%s", self.path,
                      "; ".join(bad), "; the whole disk will be resynced" if self._al_lost
                      else "; harmless after a clean shutdown")
            return
        self.al_seq, extents = max(good, key=lambda g: g[0])
        if bad:
            log.warning("metadata %s: activity log %s; using seq %d", self.path, bad[0],
                        self.al_seq)
        # Extents beyond al_extents_max (a smaller limit than when written) stay until the
        # next activation evicts them: until then they still protect a crash.
        self._al = OrderedDict.fromkeys(extents)

    # --- superblock -----------------------------------------------------------------------

    def write_superblock(self, **changes) -> Superblock:
        """Apply CHANGES, write the next slot and fdatasync. Blocking."""
        with self._io_lock:
            sb = dataclasses.replace(self.sb, **changes)
            problems = sb.problems()
            assert not problems, f"refusing to write superblock: {'; '.join(problems)}"
            seq = self.sb_seq + 1
            slot = _encode_sb_slot(seq, sb)
            self.file.pwrite(slot, SB_OFFSET + (seq % 2) * SB_SLOT_BYTES)
            self.file.sync()
            self.sb, self.sb_seq = sb, seq  # only now: a failed write is retried in place
            return sb

    # --- bitmap ---------------------------------------------------------------------------

    def flush_bitmap(self) -> int:
        """Write the changed bitmap pages and their CRCs, fdatasync; returns pages written.
        Blocking."""
        return self._flush_pages(self.bitmap.dirty_pages())

    def _flush_pages(self, pages: Iterable[int]) -> int:
        with self._io_lock:  # two flushes interleaving could land an older copy last
            pages = sorted(set(pages) & self.bitmap.dirty_pages())
            if not pages:
                return 0
            # Clean before copying: a bit set from here on re-dirties its page.
            self.bitmap.mark_clean(pages)
            try:
                for first, count in _runs(pages, IO_CHUNK_BYTES // PAGE_BYTES):
                    images = [self._page_image(p) for p in range(first, first + count)]
                    # Pages first, then their entries, one sync for both: a crash in between
                    # (or the disk reordering them) leaves a page whose CRC does not match,
                    # which the next open takes as all set.
                    self.file.pwrite(b"".join(images), BITMAP_OFFSET + first * PAGE_BYTES)
                    _write_crc_entries(self.file, self._crc_offset, first,
                                       [crc32c.crc32c(image) for image in images])
                self.file.sync()
            except BaseException:
                self.bitmap.mark_dirty(pages)
                raise
            return len(pages)

    def _page_image(self, page: int) -> bytes:
        """Page PAGE of the bitmap as the file holds it: 4 KiB, the last one zero-padded
        (its CRC covers the padding too, so a garbled tail is caught)."""
        data = self.bitmap.page_bytes(page)
        if len(data) < PAGE_BYTES:
            data += bytes(PAGE_BYTES - len(data))
        assert len(data) == PAGE_BYTES, f"bitmap page {page} is {len(data)} bytes"
        return data

    # --- activity log ---------------------------------------------------------------------

    def al_extents_for(self, offset_bytes: int, length_bytes: int) -> list[int]:
        """The AL extents a write of this range lands in."""
        assert offset_bytes >= 0 and length_bytes >= 0
        if length_bytes == 0:
            return []
        last = (offset_bytes + length_bytes - 1) // AL_EXTENT_BYTES
        return list(range(offset_bytes // AL_EXTENT_BYTES, last + 1))

    def al_missing(self, extents: Iterable[int]) -> list[int]:
        """The EXTENTS not in the AL now (each once, in order). No I/O."""
        with self._al_lock:
            return [e for e in dict.fromkeys(extents) if e not in self._al]

    def al_touch(self, extents: Iterable[int]) -> None:
        """Mark EXTENTS most recently used. They must be active. No I/O."""
        with self._al_lock:
            for e in extents:
                assert e in self._al, f"extent {e} is not in the activity log"
                self._al.move_to_end(e)

    def al_pin(self, extents: Iterable[int]) -> None:
        """Count a write in flight in EXTENTS (active or not yet): they are not evicted until
        `al_unpin`. Pin before `al_missing`. No I/O."""
        with self._al_lock:
            for e in extents:
                self._al_pins[e] = self._al_pins.get(e, 0) + 1

    def al_unpin(self, extents: Iterable[int]) -> None:
        """The write pinned with the same EXTENTS is complete (its bitmap bit, if any, set)."""
        with self._al_lock:
            for e in extents:
                n = self._al_pins.get(e, 0)
                assert n > 0, f"extent {e} unpinned more often than pinned"
                if n == 1:
                    del self._al_pins[e]
                else:
                    self._al_pins[e] = n - 1

    def al_pin_range(self, offset_bytes: int, length_bytes: int) -> tuple[int, int, bool]:
        """The write path's activity-log work in one lock round: pin the extents a write of
        this range lands in (as `al_pin(al_extents_for(...))`) and, if all of them are
        active, mark them most recently used (as `al_touch`). Returns (first, last,
        all_active); unpin with `al_unpin_range(first, last)`. No I/O."""
        assert offset_bytes >= 0 and length_bytes >= 0
        if length_bytes == 0:
            return 0, -1, True
        first = offset_bytes // AL_EXTENT_BYTES
        last = (offset_bytes + length_bytes - 1) // AL_EXTENT_BYTES
        if first == last:  # most writes: one extent, no loops
            with self._al_lock:
                self._al_pins[first] = self._al_pins.get(first, 0) + 1
                if first in self._al:
                    self._al.move_to_end(first)
                    return first, first, True
            return first, first, False
        with self._al_lock:
            pins, al = self._al_pins, self._al
            active = True
            for e in range(first, last + 1):
                pins[e] = pins.get(e, 0) + 1
                if e not in al:
                    active = False
            if active:
                for e in range(first, last + 1):
                    al.move_to_end(e)
        return first, last, active

    def al_unpin_range(self, first: int, last: int) -> None:
        """Undo `al_pin_range` (FIRST, LAST as it returned them)."""
        if first == last:
            with self._al_lock:
                n = self._al_pins[first]  # KeyError: unpinned more often than pinned
                if n == 1:
                    del self._al_pins[first]
                else:
                    self._al_pins[first] = n - 1
            return
        with self._al_lock:
            pins = self._al_pins
            for e in range(first, last + 1):
                n = pins.get(e, 0)
                assert n > 0, f"extent {e} unpinned more often than pinned"
                if n == 1:
                    del pins[e]
                else:
                    pins[e] = n - 1

    def al_pinned(self) -> dict[int, int]:
        with self._al_lock:
            return dict(self._al_pins)

    def al_active(self) -> list[int]:
        """Active extents, least recently used first."""
        with self._al_lock:
            return list(self._al)

    def al_activate(self, extents: Iterable[int]) -> None:
        """Make EXTENTS active (and most recently used), durably, evicting the least
        recently used unpinned extents when the AL is full. Blocking: an eviction flushes
        the evicted extents' bitmap pages, then the AL slot is written and fdatasync'ed.
        Raises ActivityLogFull if every other extent is pinned."""
        extents = list(dict.fromkeys(extents))
        assert len(extents) <= self.al_extents_max, \
            f"{len(extents)} extents at once, the activity log holds {self.al_extents_max}"
        assert all(0 <= e < self.al_extents_total for e in extents), extents
        assert not self._crash_pending, \
            "recover_crash() first: evicting now would drop what the crash left out of sync"
        with self._io_lock:
            with self._al_lock:
                missing = [e for e in extents if e not in self._al]
                for e in extents:
                    if e in self._al:
                        self._al.move_to_end(e)  # so they are not the ones evicted
                if not missing:
                    return
                # Evict now, under the lock: from here on al_missing reports them, so no
                # writer starts in an extent whose protection is about to go.
                excess = max(len(self._al) + len(missing) - self.al_extents_max, 0)
                wanted = set(extents)
                evicted = list(itertools.islice(
                    (e for e in self._al if e not in self._al_pins and e not in wanted),
                    excess))
                if len(evicted) < excess:
                    raise ActivityLogFull(
                        f"metadata {self.path}: all {len(self._al)} activity log extents "
                        "are pinned by writes in flight: wait for some to complete, retry")
                for e in evicted:
                    del self._al[e]
                on_disk = list(self._al) + missing
            if evicted:
                # Bits of the evicted extents set in memory must reach the disk before the
                # AL stops listing them, or a crash would lose that they may differ.
                pages: set[int] = set()
                for e in evicted:
                    first = e * self._blocks_per_extent
                    count = min(self._blocks_per_extent, self.bitmap.nbits - first)
                    pages.update(self.bitmap.pages_for_blocks(first, count))
                self._flush_pages(pages)
            self._write_al(on_disk)
            with self._al_lock:  # usable only now that the AL listing them is durable
                for e in missing:
                    self._al[e] = None

    def _write_al(self, extents: list[int]) -> None:
        with self._io_lock:
            seq = self.al_seq + 1
            self.file.pwrite(_encode_al_slot(seq, extents),
                             AL_OFFSET + (seq % 2) * AL_SLOT_BYTES)
            self.file.sync()
            self.al_seq = seq

    # --- crashes and clean shutdowns ------------------------------------------------------

    def recover_crash(self) -> int:
        """After a crash, every block of every AL extent may differ from the peer (a write
        may have reached one disk and not the other): mark them, flush. Returns blocks
        newly marked; 0 if the metadata was opened after a clean shutdown. Blocking."""
        if not self._crash_pending:
            return 0
        if self._al_lost:
            newly = self.bitmap.set_blocks(0, self.bitmap.nbits)
        else:
            newly = 0
            for e in self.al_active():
                first = e * self._blocks_per_extent
                newly += self.bitmap.set_blocks(
                    first, min(self._blocks_per_extent, self.bitmap.nbits - first))
        self.flush_bitmap()
        log.warning("metadata %s: not shut down cleanly; %d blocks of %d active extents "
                    "newly marked out of sync", self.path, newly,
                    len(self._al) if not self._al_lost else self.al_extents_total)
        self._crash_pending = self._al_lost = False
        return newly

    def mark_open(self) -> Superblock:
        """In use from now on: until mark_clean_shutdown, a restart is a crash. Blocking."""
        if not self.sb.clean_shutdown:
            return self.sb
        return self.write_superblock(clean_shutdown=False)

    def mark_clean_shutdown(self) -> Superblock:
        """A clean stop: bitmap and AL on disk, then the flag (and no longer primary).
        Blocking."""
        with self._io_lock:
            self.flush_bitmap()
            self._write_al(self.al_active())  # keeps the LRU order for the next start
            return self.write_superblock(clean_shutdown=True, role_primary=False)

    def close(self) -> None:
        """Write back changed bitmap pages (bits must never be lost) and close the file
        (which releases its lock). A second call does nothing."""
        if self._closed:
            return
        try:
            self.flush_bitmap()
        finally:
            self._closed = True
            self.file.close()

    def abandon(self) -> None:
        """Close the file without writing anything, as a killed process would leave it:
        for tests and simulators of crashes."""
        self._closed = True
        self.file.close()


def _load_bitmap(file: MetaFile, sb: Superblock,
                 checked: bool) -> tuple[Bitmap, tuple[int, ...]]:
    """The bitmap as stored, and the pages that failed their CRC (if CHECKED), which are
    taken as all bits set: a torn or garbled page may have lost any of its bits."""
    path = file.name
    pages = bitmap_pages(sb.size_bytes, sb.block_bytes)
    region = bytearray(pages * PAGE_BYTES)
    for a in range(0, len(region), READ_CHUNK_BYTES):
        n = min(READ_CHUNK_BYTES, len(region) - a)
        chunk = file.pread(n, BITMAP_OFFSET + a)
        if len(chunk) != n:
            raise MetadataError(f"metadata {path}: bitmap ends early at byte "
                                f"{a + len(chunk)}: run `rblock create-md` again")
        region[a:a + n] = chunk
    bad: list[int] = []
    if checked:
        table = _pread_exact(file, pages * CRC.size, crc_table_offset(sb.size_bytes,
                                                                       sb.block_bytes))
        stored = struct.unpack(f">{pages}I", table)
        view = memoryview(region)
        bad = [p for p in range(pages)
               if crc32c.crc32c(view[p * PAGE_BYTES:(p + 1) * PAGE_BYTES]) != stored[p]]
        view.release()
        for p in bad:  # whatever a bad page holds, even bits past the end, is not used
            region[p * PAGE_BYTES:(p + 1) * PAGE_BYTES] = bytes(PAGE_BYTES)
    nbits = sb.size_bytes // sb.block_bytes
    try:
        bitmap = Bitmap(nbits, region, sb.block_bytes)
    except ValueError as e:
        raise MetadataError(f"metadata {path}: bitmap is corrupt ({e}): run "
                            "`rblock create-md` again") from None
    del region  # the bitmap has its own copy; this one is up to 2 GiB
    for p in bad:
        # Setting the bits also dirties the page: the next flush rewrites it with its CRC.
        first = p * BITS_PER_PAGE
        bitmap.set_blocks(first, min(BITS_PER_PAGE, nbits - first))
    _log_bad_pages(path, bad, nbits, sb.block_bytes)
    return bitmap, tuple(bad)


def _log_bad_pages(path: str, bad: list[int], nbits: int, block_bytes: int) -> None:
    """One warning per run of consecutive bad pages, naming the disk range it covers; at
    most BAD_PAGE_RUNS_LOGGED_MAX of them, then one line for the rest."""
    runs = _runs(bad, len(bad) or 1)
    for first, count in runs[:BAD_PAGE_RUNS_LOGGED_MAX]:
        block_first = first * BITS_PER_PAGE
        block_end = min((first + count) * BITS_PER_PAGE, nbits)
        pages = f"page {first}" if count == 1 else f"pages {first}-{first + count - 1}"
        log.warning(
            "metadata %s: bitmap %s failed the CRC-32C check (a torn write-back or a "
            "corrupted page): disk bytes %d-%d (%d blocks) are taken as out of sync and will "
            "be resynced in full", path, pages, block_first * block_bytes,
            block_end * block_bytes - 1, block_end - block_first)
    rest = runs[BAD_PAGE_RUNS_LOGGED_MAX:]
    if rest:
        log.warning("metadata %s: %d more runs of bitmap pages (%d pages) failed the CRC-32C "
                    "check and are taken as out of sync", path, len(rest),
                    sum(count for _, count in rest))


def _check_identity(path: str, sb: Superblock, node: str | None, resource: str | None,
                    size_bytes: int | None) -> None:
    if node is not None and sb.node != node:
        raise MetadataError(
            f"metadata {path} belongs to node '{sb.node}', not '{node}': fix the metadata "
            "path in the config, or run `rblock create-md` for this node")
    if resource is not None and sb.resource != resource:
        raise MetadataError(
            f"metadata {path} belongs to resource '{sb.resource}', not '{resource}': fix "
            "the metadata path in the config, or run `rblock create-md` for this resource")
    if size_bytes is not None and sb.size_bytes != size_bytes:
        raise MetadataError(
            f"metadata {path} is for a disk of {sb.size_bytes} bytes, the disk is "
            f"{size_bytes} bytes: fix the size, or run `rblock create-md` again (the bitmap "
            "must cover the whole disk)")


def _runs(pages: list[int], max_len: int) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages, at most MAX_LEN."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p and out[-1][1] < max_len:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
