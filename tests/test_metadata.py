"""Metadata: the bitmap against a set-of-blocks model, superblock and AL slots surviving torn
writes, identity checks, activity log eviction and crash recovery."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from unittest import mock

import crc32c
import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rblock.store import metadata as M
from rblock.store.metadata import (
    AL_EXTENT_BYTES,
    AL_OFFSET,
    AL_SLOT_BYTES,
    BITMAP_OFFSET,
    BLOCK_BYTES,
    PAGE_BYTES,
    SB_SLOT_BYTES,
    UUID_JUST_CREATED,
    ActivityLogFull,
    Bitmap,
    Metadata,
    MetadataError,
    Superblock,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
BLOCKS_PER_EXTENT = AL_EXTENT_BYTES // BLOCK_BYTES
BITS_PER_PAGE = PAGE_BYTES * 8


def crash(md: Metadata) -> None:
    """Stop without flushing anything, as a killed process would."""
    md.abandon()


def opened(path: str, **kw) -> Metadata:
    """Open and close again (each open holds the file's lock until closed): what was
    loaded stays readable."""
    md = Metadata.open(path, **kw)
    md.close()
    return md


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "r0.meta")


# --- Bitmap against a model ----------------------------------------------------------------


def model_bytes(model: set[int], nbits: int) -> bytes:
    out = bytearray((nbits + 7) // 8)
    for b in model:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out)


def changed_pages(old: bytes, new: bytes) -> set[int]:
    return {i // PAGE_BYTES for i in range(len(old)) if old[i] != new[i]}


def model_next_run(model: set[int], start: int, max_blocks: int) -> tuple[int, int] | None:
    after = [b for b in model if b >= start]
    if not after:
        return None
    first = min(after)
    n = 1
    while n < max_blocks and first + n in model:
        n += 1
    return first, n


@st.composite
def bitmap_case(draw):
    # Up to ~3.5 bitmap pages, so page tracking across page boundaries is exercised.
    nbits = draw(st.one_of(st.integers(1, 200), st.integers(1, 3 * BITS_PER_PAGE + 5000)))
    size = nbits * BLOCK_BYTES

    def byte_range():
        off = draw(st.integers(0, size - 1))
        short = st.integers(0, 3 * BLOCK_BYTES)
        length = draw(st.one_of(short, st.integers(0, size - off)))
        return off, min(length, size - off)

    ops = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["set", "clear", "set_blocks", "clear_blocks", "merge",
                                     "clean"]))
        if kind in ("set", "clear"):
            ops.append((kind, *byte_range()))
        elif kind in ("set_blocks", "clear_blocks"):
            first = draw(st.integers(0, nbits - 1))
            ops.append((kind, first, draw(st.integers(0, nbits - first))))
        elif kind == "merge":
            ops.append((kind, frozenset(draw(st.sets(st.integers(0, nbits - 1),
                                                     max_size=50)))))
        else:
            ops.append((kind,))
    probes = draw(st.lists(st.tuples(st.integers(0, nbits - 1), st.integers(1, nbits + 3)),
                           min_size=1, max_size=5))
    tiny_chunks = draw(st.booleans())
    return nbits, ops, probes, tiny_chunks


def apply_op(bm: Bitmap, model: set[int], op: tuple) -> tuple[int, int]:
    """Run OP on both; returns (what the bitmap said, what the model says)."""
    kind = op[0]
    if kind == "set":
        _, off, length = op
        blocks = set(range(off // BLOCK_BYTES, -(-(off + length) // BLOCK_BYTES))) \
            if length else set()
        expect = len(blocks - model)
        model |= blocks
        return bm.set_range(off, length), expect
    if kind == "clear":
        _, off, length = op
        blocks = set(range(-(-off // BLOCK_BYTES), (off + length) // BLOCK_BYTES))
        expect = len(blocks & model)
        model -= blocks
        return bm.clear_range(off, length), expect
    if kind == "set_blocks":
        blocks = set(range(op[1], op[1] + op[2]))
        expect = len(blocks - model)
        model |= blocks
        return bm.set_blocks(op[1], op[2]), expect
    if kind == "clear_blocks":
        blocks = set(range(op[1], op[1] + op[2]))
        expect = len(blocks & model)
        model -= blocks
        return bm.clear_blocks(op[1], op[2]), expect
    if kind == "merge":
        other = set(op[1])
        expect = len(other - model)
        model |= other
        # Alternate between raw bytes and a Bitmap, as both are accepted.
        src = model_bytes(other, bm.nbits)
        return bm.merge(src if len(other) % 2 else Bitmap(bm.nbits, src)), expect
    bm.mark_clean(bm.dirty_pages())
    return 0, 0


@settings(max_examples=300, deadline=None)
@given(bitmap_case())
def test_bitmap_matches_a_set_of_blocks(case):
    nbits, ops, probes, tiny_chunks = case
    # Tiny chunks send even small ranges through the chunked paths of span and scan.
    tiny = mock.patch.multiple(M, SPAN_CHUNK_BYTES=3, SCAN_NEAR_BYTES=2, SCAN_CHUNK_BYTES=5)
    with tiny if tiny_chunks else contextlib.nullcontext():
        bm = Bitmap(nbits)
        model: set[int] = set()
        touched: set[int] = set()  # pages whose bytes some op changed since the last clean
        for op in ops:
            before = bm.to_bytes()
            got, expect = apply_op(bm, model, op)
            assert got == expect, op
            assert bm.count() == len(model)
            assert bm.to_bytes() == model_bytes(model, nbits)
            touched = set() if op[0] == "clean" else touched | changed_pages(before,
                                                                             bm.to_bytes())
            assert bm.dirty_pages() == touched, op
        for start, max_blocks in probes:
            assert bm.next_run(start, max_blocks) == model_next_run(model, start, max_blocks)
            assert bm.test_block(start) == (start in model)
            off, length = start * BLOCK_BYTES, max_blocks * BLOCK_BYTES
            length = min(length, nbits * BLOCK_BYTES - off)
            assert bm.any_in_range(off, length) == any(start <= b < start + max_blocks
                                                      for b in model)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_next_run_walk_visits_every_set_block_once(data):
    nbits = data.draw(st.integers(1, 5000))
    model = data.draw(st.sets(st.integers(0, nbits - 1)))
    max_blocks = data.draw(st.integers(1, 64))
    bm = Bitmap(nbits, model_bytes(model, nbits))
    assert bm.count() == len(model)
    seen: list[int] = []
    start = 0
    while (run := bm.next_run(start, max_blocks)) is not None:
        first, length = run
        assert first >= start and 1 <= length <= max_blocks
        seen.extend(range(first, first + length))
        start = first + length
    assert seen == sorted(model)


def test_bitmap_rejects_bits_past_its_end():
    with pytest.raises(ValueError, match="past its last block"):
        Bitmap(9, b"\x00\x04")  # bit 10 of a 9-bit bitmap
    with pytest.raises(ValueError, match="past its end"):
        Bitmap(8, b"\x00\x01")
    with pytest.raises(ValueError, match="need"):
        Bitmap(17, b"\x00\x00")
    assert Bitmap(8, b"\xff" + bytes(PAGE_BYTES - 1)).count() == 8


def test_bitmap_unaligned_edges():
    bm = Bitmap(10)
    assert bm.set_range(4095, 2) == 2  # one byte either side of a block edge: two blocks
    assert bm.clear_range(1, 8190) == 0  # covers neither block fully
    assert bm.clear_range(0, 8192) == 2
    assert bm.set_range(0, 0) == 0 and bm.clear_range(0, 0) == 0
    assert bm.set_range(9 * BLOCK_BYTES, BLOCK_BYTES) == 1  # the last block
    assert bm.next_run(0, 100) == (9, 1)
    assert bm.next_run(10, 100) is None
    with pytest.raises(AssertionError):
        bm.set_range(10 * BLOCK_BYTES, 1)


def test_bitmap_single_block_set_is_fast():
    bm = Bitmap(TiB // BLOCK_BYTES)
    n = 100_000
    offsets = [(i * 7919 % bm.nbits) * BLOCK_BYTES for i in range(n)]
    t0 = time.perf_counter()
    for off in offsets:
        bm.set_range(off, BLOCK_BYTES)
    per_op_us = (time.perf_counter() - t0) / n * 1e6
    assert bm.count() == n
    assert per_op_us < 5, f"set_range of one block took {per_op_us:.2f} us"


# --- CRC-32C -------------------------------------------------------------------------------


@given(st.binary(max_size=10_000))
def test_crc32c_package_agrees_with_crcmod(data):
    assert crc32c.crc32c(data) == crcmod.predefined.mkCrcFun("crc-32c")(data)


def test_superblock_slot_crc_is_crc32c(path):
    Metadata.create(path, "a", "r0", GiB).close()
    with open(path, "rb") as f:
        slot = f.read(SB_SLOT_BYTES)
    magic, version, seq, body_len = struct.unpack_from(">8sIQI", slot)
    assert (magic, version) == (b"RBLKMETA", 2)
    end = 24 + body_len
    (crc,) = struct.unpack_from(">I", slot, end)
    assert crc == crcmod.predefined.mkCrcFun("crc-32c")(slot[:end])


# --- superblock ----------------------------------------------------------------------------


def test_create_writes_a_fresh_superblock(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    assert md.sb == Superblock(node="alpha", resource="r0", size_bytes=GiB)
    assert md.sb.uuid_current == UUID_JUST_CREATED
    assert md.sb.disk_state == "inconsistent" and md.sb.clean_shutdown
    assert md.bitmap.nbits == GiB // BLOCK_BYTES and md.bitmap.count() == 0
    assert md.al_active() == []
    md.close()
    # 8 bitmap pages, then their CRC table (8 entries, rounded up to one page)
    assert os.path.getsize(path) == BITMAP_OFFSET + GiB // BLOCK_BYTES // 8 + PAGE_BYTES


def test_superblock_round_trip(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    sb = md.write_superblock(uuid_current=2**64 - 2, uuid_bitmap=12345,
                             uuid_history=[2**63, 99], disk_state="uptodate",
                             role_primary=True, extra={"later_field": [1, "x"]})
    assert sb.uuid_history == (2**63, 99)
    md.close()
    md = Metadata.open(path, "alpha", "r0", GiB)
    assert md.sb == sb
    md.close()


def test_superblock_writes_alternate_slots(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    for i in range(5):
        md.write_superblock(uuid_bitmap=i + 100)
        with open(path, "rb") as f:
            f.seek((md.sb_seq % 2) * SB_SLOT_BYTES)
            _, _, seq, _ = struct.unpack(">8sIQI", f.read(24))
        assert seq == md.sb_seq
    md.close()


def test_unknown_top_level_keys_survive_a_rewrite(path):
    """A later version's new field, read and rewritten by this one, comes back unchanged."""
    md = Metadata.create(path, "alpha", "r0", GiB)
    later = Superblock(node="alpha", resource="r0", size_bytes=GiB, extra={"quorum": 3})
    slot = M._encode_sb_slot(md.sb_seq + 1, later)
    assert b'"quorum":3' in slot
    md.file.pwrite(slot, ((md.sb_seq + 1) % 2) * SB_SLOT_BYTES)
    md.close()
    md = Metadata.open(path)
    assert md.sb.extra == {"quorum": 3}
    md.write_superblock(disk_state="outdated")
    md.close()
    assert opened(path).sb.extra == {"quorum": 3}


@pytest.mark.parametrize("changes", [
    {"disk_state": "fine"},
    {"uuid_current": 2**64},
    {"uuid_bitmap": -1},
    {"uuid_history": (1, 2, 3)},
    {"size_bytes": GiB + 1},
    {"role_primary": 1},
    {"extra": {"node": "b"}},
])
def test_invalid_superblock_is_never_written(path, changes):
    md = Metadata.create(path, "alpha", "r0", GiB)
    seq = md.sb_seq
    with pytest.raises(AssertionError, match="refusing to write superblock"):
        md.write_superblock(**changes)
    assert md.sb_seq == seq and md.sb.disk_state == "inconsistent"
    md.close()


def newest_slot_offset(md: Metadata) -> int:
    return (md.sb_seq % 2) * SB_SLOT_BYTES


def test_torn_newest_slot_falls_back_to_previous(path, caplog):
    md = Metadata.create(path, "alpha", "r0", GiB)
    old = md.write_superblock(disk_state="outdated")
    md.write_superblock(disk_state="uptodate")
    # A torn write: the first half of the slot made it, the rest is stale zeros.
    off = newest_slot_offset(md)
    md.file.pwrite(bytes(SB_SLOT_BYTES // 2), off + 40)
    md.close()
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = Metadata.open(path)
    assert md.sb == old
    assert "CRC-32C mismatch" in caplog.text and path in caplog.text
    # The next write goes into the broken slot, so both are valid again.
    md.write_superblock(disk_state="uptodate")
    md.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        assert opened(path).sb.disk_state == "uptodate"
    assert caplog.text == ""


@pytest.mark.parametrize("where", [0, 8, 13, 30, 200])
def test_flipped_byte_in_newest_slot_falls_back(path, where):
    md = Metadata.create(path, "alpha", "r0", GiB)
    old = md.write_superblock(uuid_bitmap=7)
    md.write_superblock(uuid_bitmap=8)
    off = newest_slot_offset(md) + where
    byte = md.file.pread(1, off)
    md.file.pwrite(bytes([byte[0] ^ 0x40]), off)
    md.close()
    assert opened(path).sb == old


def test_both_slots_corrupt_is_an_error_naming_file_and_fix(path):
    Metadata.create(path, "alpha", "r0", GiB).close()
    with open(path, "r+b") as f:
        for slot in range(2):
            f.seek(slot * SB_SLOT_BYTES + 30)
            f.write(b"garbage")
    with pytest.raises(MetadataError) as e:
        Metadata.open(path)
    assert path in str(e.value) and "rblock create-md" in str(e.value)
    assert "untouched" in str(e.value)


def test_valid_crc_with_invalid_content_counts_as_corrupt(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    good = md.sb
    bad = Superblock(node="alpha", resource="r0", size_bytes=GiB, disk_state="weird")
    md.file.pwrite(M._encode_sb_slot(md.sb_seq + 1, bad), ((md.sb_seq + 1) % 2) * 4096)
    md.close()
    assert opened(path).sb == good


def test_newer_format_version_is_refused(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    body = md.sb.to_json()
    head = struct.pack(">8sIQI", b"RBLKMETA", 3, 9, len(body)) + body
    md.file.pwrite(head + struct.pack(">I", crc32c.crc32c(head)), SB_SLOT_BYTES)
    md.close()
    with pytest.raises(MetadataError, match="format version 3"):
        Metadata.open(path)


def test_missing_and_truncated_files(path):
    with pytest.raises(MetadataError, match="does not exist.*create-md"):
        Metadata.open(path)
    Metadata.create(path, "alpha", "r0", GiB).close()
    os.truncate(path, BITMAP_OFFSET + 100)
    with pytest.raises(MetadataError, match="truncated.*create-md"):
        Metadata.open(path)


# --- identity ------------------------------------------------------------------------------


def test_identity_mismatches_say_which_and_the_fix(path):
    Metadata.create(path, "alpha", "r0", GiB).close()
    Metadata.open(path, "alpha", "r0", GiB).close()
    with pytest.raises(MetadataError) as e:
        Metadata.open(path, node="beta")
    assert all(s in str(e.value) for s in (path, "'alpha'", "'beta'", "create-md"))
    with pytest.raises(MetadataError) as e:
        Metadata.open(path, resource="r1")
    assert all(s in str(e.value) for s in ("resource 'r0'", "'r1'", "create-md"))
    with pytest.raises(MetadataError) as e:
        Metadata.open(path, size_bytes=2 * GiB)
    assert all(s in str(e.value) for s in (str(GiB), str(2 * GiB), "create-md"))


# --- create-md -----------------------------------------------------------------------------


def test_create_refuses_existing_metadata_unless_forced(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.bitmap.set_range(0, GiB)
    md.close()
    with pytest.raises(MetadataError) as e:
        Metadata.create(path, "alpha", "r0", GiB)
    assert path in str(e.value) and "--force" in str(e.value)
    assert opened(path).bitmap.count() == GiB // BLOCK_BYTES  # untouched
    md = Metadata.create(path, "beta", "r0", 2 * GiB, force=True)
    assert md.bitmap.count() == 0 and md.sb.node == "beta"
    md.close()
    md = Metadata.open(path, "beta", "r0", 2 * GiB)
    assert md.bitmap.count() == 0
    md.close()


def test_create_refuses_a_file_that_is_not_metadata(path):
    with open(path, "wb") as f:
        f.write(b"\xeb\x63\x90" + bytes(509) + b"guest data")  # looks like a disk image
    with pytest.raises(MetadataError, match="not rblock metadata.*--force"):
        Metadata.create(path, "alpha", "r0", GiB)
    assert os.path.getsize(path) == 522
    Metadata.create(path, "alpha", "r0", GiB, force=True).close()


def test_create_accepts_empty_or_broken_metadata_files(path):
    open(path, "wb").close()
    Metadata.create(path, "alpha", "r0", GiB).close()
    with open(path, "r+b") as f:  # both superblocks broken: create-md is the fix
        f.write(b"RBLKMETA" + b"\xff" * 100)
        f.seek(SB_SLOT_BYTES + 20)
        f.write(b"\xff" * 100)
    Metadata.create(path, "alpha", "r0", GiB).close()
    Metadata.open(path, "alpha", "r0", GiB).close()


def test_create_checks_the_size(path):
    with pytest.raises(MetadataError, match="multiple of 4096"):
        Metadata.create(path, "alpha", "r0", GiB + 512)


# --- bitmap persistence --------------------------------------------------------------------


def test_bitmap_persists_across_reopen(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.bitmap.set_range(0, BLOCK_BYTES)
    md.bitmap.set_range(GiB - 3 * BLOCK_BYTES, 3 * BLOCK_BYTES)
    md.bitmap.set_range(400 * MiB + 5, 1)
    assert md.bitmap.dirty_pages() == {0, 3, 7}
    assert md.flush_bitmap() == 3
    assert md.flush_bitmap() == 0 and md.bitmap.dirty_pages() == set()
    md.bitmap.clear_range(0, BLOCK_BYTES)
    expect = md.bitmap.to_bytes()
    md.close()  # writes back the cleared bit
    md = Metadata.open(path)
    assert md.bitmap.to_bytes() == expect and md.bitmap.count() == 4
    md.close()


def test_failed_bitmap_write_keeps_pages_dirty(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.bitmap.set_range(0, BLOCK_BYTES)
    with mock.patch.object(M.os, "fdatasync", side_effect=OSError(5, "EIO")), \
            pytest.raises(OSError):
        md.flush_bitmap()
    assert md.bitmap.dirty_pages() == {0}
    assert md.flush_bitmap() == 1
    md.close()


def test_bits_set_during_a_flush_in_another_thread_are_not_lost(path):
    """The loop sets bits while a worker thread flushes: pages are marked clean before they
    are copied, so the last flush leaves the disk equal to memory."""
    md = Metadata.create(path, "alpha", "r0", 4 * GiB)
    stop = threading.Event()
    flushes = []

    def flusher():
        while not stop.is_set():
            flushes.append(md.flush_bitmap())

    t = threading.Thread(target=flusher)
    t.start()
    try:
        for i in range(200_000):
            block = (i * 104_729) % md.bitmap.nbits
            if i % 3:
                md.bitmap.set_range(block * BLOCK_BYTES, BLOCK_BYTES)
            else:
                md.bitmap.clear_range(block * BLOCK_BYTES, BLOCK_BYTES)
    finally:
        stop.set()
        t.join()
    md.flush_bitmap()
    expect = md.bitmap.to_bytes()
    assert len(flushes) > 1
    crash(md)
    md = Metadata.open(path)
    assert md.bitmap.to_bytes() == expect
    md.close()


def test_one_tib_disk_metadata_is_quick_and_sparse(path):
    t0 = time.perf_counter()
    md = Metadata.create(path, "alpha", "r0", TiB)
    md.bitmap.set_range(TiB - BLOCK_BYTES, BLOCK_BYTES)
    md.close()
    md = Metadata.open(path, "alpha", "r0", TiB)
    elapsed_s = time.perf_counter() - t0
    assert md.bitmap.nbits == TiB // BLOCK_BYTES
    assert md.bitmap.count() == 1 and md.bitmap.next_run(0, 8) == (TiB // BLOCK_BYTES - 1, 1)
    md.close()
    st_ = os.stat(path)
    assert st_.st_size == BITMAP_OFFSET + 32 * MiB + 32 * 1024  # bitmap, 8192 CRCs
    assert st_.st_blocks * 512 < MiB  # sparse: only the pages ever written
    assert elapsed_s < 3, f"create + open of 1 TiB metadata took {elapsed_s:.2f} s"


# --- activity log --------------------------------------------------------------------------


def test_al_extents_for():
    md = Metadata.__new__(Metadata)
    assert md.al_extents_for(0, BLOCK_BYTES) == [0]
    assert md.al_extents_for(AL_EXTENT_BYTES - 1, 2) == [0, 1]
    assert md.al_extents_for(3 * AL_EXTENT_BYTES, 32 * MiB) == list(range(3, 11))
    assert md.al_extents_for(5, 0) == []


def test_al_capacity_is_what_fits_in_a_slot():
    assert M.AL_EXTENTS_MAX == (AL_SLOT_BYTES - 20 - 4) // 4
    assert len(M._encode_al_slot(1, list(range(M.AL_EXTENTS_MAX)))) == AL_SLOT_BYTES


def test_al_activate_evicts_least_recently_used(path):
    md = Metadata.create(path, "alpha", "r0", GiB, al_extents_max=4)
    md.al_activate([0, 1])
    md.al_activate([2, 3])
    assert md.al_active() == [0, 1, 2, 3]
    assert md.al_missing([3, 4, 4, 0, 9]) == [4, 9]
    md.al_touch([0])
    md.al_activate([4, 5])  # evicts 1 and 2, the least recently used
    assert md.al_active() == [3, 0, 4, 5]
    md.al_activate([3, 6])  # 3 is bumped, not evicted; 0 goes
    assert md.al_active() == [4, 5, 3, 6]
    seq = md.al_seq
    md.al_activate([5])  # already active: no I/O
    assert md.al_seq == seq and md.al_active() == [4, 3, 6, 5]
    md.close()
    md = Metadata.open(path, al_extents_max=4)
    assert md.al_active() == [4, 5, 3, 6]  # the order as last written
    md.close()


def test_al_eviction_flushes_the_evicted_extents_bitmap_pages(path):
    md = Metadata.create(path, "alpha", "r0", 8 * GiB, al_extents_max=2)
    extents_per_page = BITS_PER_PAGE // BLOCKS_PER_EXTENT
    far = 5 * extents_per_page  # an extent whose bits live on another bitmap page
    md.al_activate([0])
    md.al_activate([far])
    md.bitmap.set_range(0, BLOCK_BYTES)  # written while the peer was away
    md.bitmap.set_range(far * AL_EXTENT_BYTES, BLOCK_BYTES)
    assert md.bitmap.dirty_pages() == {0, 5}
    md.al_activate([1])  # evicts extent 0: its page must be on disk first
    assert md.al_active() == [far, 1]
    assert md.bitmap.dirty_pages() == {5}  # the other page waits for a normal flush
    crash(md)
    md = Metadata.open(path)
    assert md.bitmap.test_block(0)
    assert not md.bitmap.test_block(far * BLOCKS_PER_EXTENT)  # only the AL protects it
    md.close()


def test_al_pinned_extents_are_never_evicted(path):
    md = Metadata.create(path, "alpha", "r0", GiB, al_extents_max=3)
    md.al_activate([0, 1, 2])
    md.al_pin([0, 1])
    md.al_pin([1])
    md.al_activate([3])  # 0 and 1 are older, but writes are in flight there
    assert md.al_active() == [0, 1, 3]
    md.al_pin([3])
    with pytest.raises(ActivityLogFull, match="pinned"):
        md.al_activate([4])
    assert md.al_active() == [0, 1, 3]
    md.al_unpin([0, 1])
    assert md.al_pinned() == {1: 1, 3: 1}
    md.al_activate([4])
    assert md.al_active() == [1, 3, 4]
    md.al_unpin([1])
    md.al_unpin([3])
    assert md.al_pinned() == {}
    with pytest.raises(AssertionError, match="unpinned more often"):
        md.al_unpin([3])
    md.close()


def test_al_extent_pinned_before_the_check_survives_a_concurrent_activation(path):
    """The writer's protocol: pin, then al_missing. An activation in a worker thread that
    would evict the extent either skips it (pinned in time) or drops it before the check
    (which then reports it missing): never a write in an extent outside the AL."""
    md = Metadata.create(path, "alpha", "r0", 16 * GiB, al_extents_max=8)
    unprotected = []
    errors: list[BaseException] = []  # from the worker: pytest would only warn about them
    stop = threading.Event()
    # The worker cycles through extents the writer never uses (it uses 0..7), all of them
    # valid: 100 .. al_extents_total - 1.
    first, span = 100, md.al_extents_total - 100

    def activator():
        e = 0
        try:
            while not stop.is_set():
                md.al_activate([first + e % span])
                e += 1
        except BaseException as exc:  # noqa: BLE001 -- re-raised by the test below
            errors.append(exc)

    md.al_activate(list(range(8)))
    t = threading.Thread(target=activator)
    t.start()
    try:
        for i in range(200):
            ext = [i % 8]
            md.al_pin(ext)
            if md.al_missing(ext):
                md.al_activate(ext)
            # The "write" runs here, while the other thread activates (and evicts) more:
            # its extent must stay in the AL until it is unpinned.
            time.sleep(0.001)
            if md.al_missing(ext):
                unprotected.append(i)
            md.al_unpin(ext)
    finally:
        stop.set()
        t.join()
    assert errors == [], f"the activator thread failed: {errors[0]!r}"
    assert unprotected == []
    md.close()


def test_al_torn_slot_falls_back_to_previous(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.al_activate([1, 2])
    md.al_activate([3])
    off = AL_OFFSET + (md.al_seq % 2) * AL_SLOT_BYTES
    md.file.pwrite(b"\xff\xff\xff\xff", off + 20)
    md.close()
    assert opened(path).al_active() == [1, 2]


# --- crashes -------------------------------------------------------------------------------


def test_recover_crash_marks_every_block_of_the_al_extents(path):
    size = 20 * AL_EXTENT_BYTES + 3 * BLOCK_BYTES  # the last extent is a partial one
    md = Metadata.create(path, "alpha", "r0", size)
    md.mark_open()
    md.al_activate([2, 20])
    md.bitmap.set_range(50 * MiB, BLOCK_BYTES)  # flushed below, outside the AL
    md.flush_bitmap()
    md.bitmap.set_range(2 * AL_EXTENT_BYTES, BLOCK_BYTES)  # in memory only
    crash(md)
    md = Metadata.open(path)
    assert not md.sb.clean_shutdown
    assert md.bitmap.count() == 1
    newly = md.recover_crash()
    assert newly == BLOCKS_PER_EXTENT + 3
    assert md.bitmap.next_run(0, 10**6) == (2 * BLOCKS_PER_EXTENT, BLOCKS_PER_EXTENT)
    assert md.bitmap.next_run(3 * BLOCKS_PER_EXTENT, 10**6) == (50 * MiB // BLOCK_BYTES, 1)
    assert md.bitmap.next_run(50 * MiB // BLOCK_BYTES + 1, 10**6) == (20 * BLOCKS_PER_EXTENT, 3)
    crash(md)  # recover_crash flushed: the marks are on disk already
    md = Metadata.open(path)
    assert md.bitmap.count() == BLOCKS_PER_EXTENT + 3 + 1
    with pytest.raises(AssertionError, match="recover_crash"):
        md.al_activate([5])  # would evict what the crash left unmarked, if it were full
    assert md.recover_crash() == 0  # still unclean, but nothing new to mark
    md.al_activate([5])
    md.mark_clean_shutdown()
    md.close()


def test_clean_shutdown_needs_no_recovery(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.mark_open()
    md.write_superblock(role_primary=True)
    md.al_activate([1, 2])
    md.al_touch([1])
    md.bitmap.set_range(0, BLOCK_BYTES)
    sb = md.mark_clean_shutdown()
    assert sb.clean_shutdown and not sb.role_primary
    crash(md)  # nothing left to write
    md = Metadata.open(path)
    assert md.sb.clean_shutdown and md.bitmap.count() == 1
    assert md.al_active() == [2, 1]
    assert md.recover_crash() == 0
    md.mark_open()
    md.close()
    md = Metadata.open(path)
    assert not md.sb.clean_shutdown  # closed without mark_clean_shutdown: a crash
    md.close()


def test_crashed_primary_is_visible(path):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.mark_open()
    md.write_superblock(role_primary=True, disk_state="uptodate")
    crash(md)
    md = Metadata.open(path)
    assert md.sb.role_primary and not md.sb.clean_shutdown
    md.close()


def test_unreadable_al_after_a_crash_marks_the_whole_disk(path, caplog):
    md = Metadata.create(path, "alpha", "r0", GiB)
    md.mark_open()
    md.al_activate([3])
    crash(md)
    with open(path, "r+b") as f:
        f.seek(AL_OFFSET)
        f.write(b"\xff" * 2 * AL_SLOT_BYTES)
    with caplog.at_level(logging.ERROR, logger="rblock.meta"):
        md = Metadata.open(path)
    assert "whole disk" in caplog.text
    assert md.recover_crash() == GiB // BLOCK_BYTES
    md.close()


# --- bitmap page CRCs ----------------------------------------------------------------------

FOUR_GIB_PAGES = 4 * GiB // BLOCK_BYTES // BITS_PER_PAGE  # 32 pages of 128 MiB of disk each


def page_offset(page: int) -> int:
    return BITMAP_OFFSET + page * PAGE_BYTES


def crc_entry_offset(size: int, page: int) -> int:
    return M.crc_table_offset(size) + 4 * page


def patch_file(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_bit(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def written_bitmap(path: str, size: int = 4 * GiB) -> bytes:
    """Fresh metadata with a few bits on pages 0, 3 and 5, flushed and closed."""
    md = Metadata.create(path, "alpha", "r0", size)
    for page in (0, 3, 5):
        md.bitmap.set_blocks(page * BITS_PER_PAGE + 7, 3)
    md.flush_bitmap()
    expect = md.bitmap.to_bytes()
    md.close()
    return expect


def assert_page_all_set_rest_as_written(md: Metadata, page: int, expect: bytes) -> None:
    first = page * BITS_PER_PAGE
    count = min(BITS_PER_PAGE, md.bitmap.nbits - first)
    assert md.bitmap.next_run(first, BITS_PER_PAGE + 1) == (first, count)
    got = md.bitmap.to_bytes()
    a, z = page * PAGE_BYTES, (page + 1) * PAGE_BYTES
    assert got[:a] == expect[:a] and got[z:] == expect[z:]  # the other pages as written
    assert md.bitmap.count() == count + sum(
        bin(b).count("1") for b in expect[:a] + expect[z:])


def test_create_fills_the_crc_table_with_the_zero_page_crc(path):
    Metadata.create(path, "alpha", "r0", 4 * GiB).close()
    with open(path, "rb") as f:
        f.seek(M.crc_table_offset(4 * GiB))
        table = f.read(PAGE_BYTES)
    zero_crc = crcmod.predefined.mkCrcFun("crc-32c")(bytes(PAGE_BYTES))
    assert zero_crc != 0
    assert table == struct.pack(">I", zero_crc) * FOUR_GIB_PAGES + bytes(PAGE_BYTES - 4 * 32)


def test_flush_writes_each_pages_crc(path):
    expect = written_bitmap(path)
    crc = crcmod.predefined.mkCrcFun("crc-32c")
    with open(path, "rb") as f:
        for page in range(FOUR_GIB_PAGES):
            f.seek(crc_entry_offset(4 * GiB, page))
            (entry,) = struct.unpack(">I", f.read(4))
            assert entry == crc(expect[page * PAGE_BYTES:(page + 1) * PAGE_BYTES]), page


@pytest.mark.parametrize("damage", ["zero page", "zero page and its CRC", "flip a bit",
                                    "flip a CRC bit", "page written, CRC not"])
def test_damaged_bitmap_page_is_taken_as_all_set(path, caplog, damage):
    expect = written_bitmap(path)
    if damage == "zero page":
        patch_file(path, page_offset(3), bytes(PAGE_BYTES))
    elif damage == "zero page and its CRC":
        patch_file(path, page_offset(3), bytes(PAGE_BYTES))
        patch_file(path, crc_entry_offset(4 * GiB, 3), bytes(4))
    elif damage == "flip a bit":
        flip_bit(path, page_offset(3) + 2000, 5)  # a bit that was clear: it looks set
    elif damage == "flip a CRC bit":
        flip_bit(path, crc_entry_offset(4 * GiB, 3) + 1, 2)
    else:  # a write-back that set a new bit reached the page, not the table
        flip_bit(path, page_offset(3) + 100, 1)
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = Metadata.open(path, "alpha", "r0", 4 * GiB)
    assert md.bitmap_pages_bad == (3,)
    assert_page_all_set_rest_as_written(md, 3, expect)
    warning = caplog.text
    assert path in warning and "page 3 " in warning
    assert f"disk bytes {3 * 128 * MiB}-{4 * 128 * MiB - 1}" in warning
    assert "resynced in full" in warning
    md.close()  # the page was dirtied: written back, with its CRC
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = opened(path)
    assert md.bitmap_pages_bad == () and caplog.text == ""
    assert_page_all_set_rest_as_written(md, 3, expect)


def test_torn_write_back_leaves_its_pages_all_set(path):
    """A crash in the middle of a flush: the pages reached the disk, their CRCs did not."""
    expect = written_bitmap(path)
    md = Metadata.open(path)
    md.bitmap.set_blocks(3 * BITS_PER_PAGE + 1000, 1)
    md.bitmap.set_blocks(4 * BITS_PER_PAGE + 5, 1)  # pages 3 and 4: one run, one pwrite
    with mock.patch.object(M, "_write_crc_entries", side_effect=OSError(5, "EIO")), \
            pytest.raises(OSError):
        md.flush_bitmap()
    crash(md)
    md = Metadata.open(path)
    assert md.bitmap_pages_bad == (3, 4)
    for page in (3, 4):
        assert md.bitmap.page_bytes(page) == b"\xff" * PAGE_BYTES
    for p in range(FOUR_GIB_PAGES):
        if p not in (3, 4):
            assert md.bitmap.page_bytes(p) == expect[p * PAGE_BYTES:(p + 1) * PAGE_BYTES], p
    md.close()


def test_garbage_past_the_end_of_the_last_page_is_a_bad_page(path):
    """A bit past the last block used to make open fail ("bitmap is corrupt"); with a CRC
    it is a damaged page like any other."""
    size = 130 * MiB  # 33280 blocks: page 1 holds the bits of the last 512
    md = Metadata.create(path, "alpha", "r0", size)
    md.bitmap.set_blocks(5, 1)
    md.close()
    flip_bit(path, page_offset(1) + 100, 0)  # byte 4196 of the bitmap: past its 4160 bytes
    md = Metadata.open(path)
    assert md.bitmap_pages_bad == (1,)
    assert md.bitmap.count() == 1 + 512 and md.bitmap.next_run(6, 10**6) == (32768, 512)
    md.close()


def test_many_bad_pages_are_logged_in_runs_and_bounded(path, caplog):
    Metadata.create(path, "alpha", "r0", 4 * GiB).close()
    for page in (1, 2, 3, *range(10, 32, 2)):  # one run of 3, then 11 single pages
        patch_file(path, crc_entry_offset(4 * GiB, page), bytes(4))
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = opened(path)
    assert len(md.bitmap_pages_bad) == 14
    lines = [r.getMessage() for r in caplog.records]
    assert "pages 1-3 " in lines[0]
    assert len(lines) == M.BAD_PAGE_RUNS_LOGGED_MAX + 1
    assert "4 more runs of bitmap pages (4 pages)" in lines[-1]


# --- format version 1 (no CRC table) -------------------------------------------------------


def write_v1_file(path: str, size: int, blocks: list[int], clean: bool = True) -> bytes:
    """A version-1 file as rblock 1 wrote it: superblocks, AL slots, bitmap, nothing after
    the bitmap. Returns the bitmap."""
    sb = Superblock(node="alpha", resource="r0", size_bytes=size, disk_state="uptodate",
                    clean_shutdown=clean, uuid_current=0xABCDEF)
    bm = Bitmap(size // BLOCK_BYTES)
    for b in blocks:
        bm.set_blocks(b, 1)
    with open(path, "wb") as f:
        for seq in range(2):
            f.seek(seq * SB_SLOT_BYTES)
            f.write(M._encode_sb_slot(seq + 5, sb, version=1))
            f.seek(AL_OFFSET + seq * AL_SLOT_BYTES)
            f.write(M._encode_al_slot(seq + 1, [2] if seq else []))
        f.seek(BITMAP_OFFSET)
        f.write(bm.to_bytes())
        f.truncate(BITMAP_OFFSET + (size // BLOCK_BYTES // 8 + PAGE_BYTES - 1)
                   // PAGE_BYTES * PAGE_BYTES)
    return bm.to_bytes()


def slot_versions(path: str) -> list[int]:
    with open(path, "rb") as f:
        return [struct.unpack_from(">8sI", f.read(SB_SLOT_BYTES))[1] for _ in range(2)]


def test_version_1_file_is_upgraded_in_place(path, caplog):
    bits = write_v1_file(path, GiB, [0, 70_000, 262_143])
    assert os.path.getsize(path) == BITMAP_OFFSET + 32 * 1024
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = Metadata.open(path, "alpha", "r0", GiB)
    assert "upgraded in place from format version 1 to 2" in caplog.text and path in caplog.text
    assert md.bitmap.to_bytes() == bits and md.bitmap_pages_bad == ()
    assert md.sb.uuid_current == 0xABCDEF and md.sb.disk_state == "uptodate"
    assert md.al_active() == [2]
    md.close()
    assert os.path.getsize(path) == BITMAP_OFFSET + 32 * 1024 + PAGE_BYTES
    assert slot_versions(path) == [2, 2]  # both: a torn write never falls back to version 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rblock.meta"):
        md = opened(path, node="alpha")
    assert caplog.text == "" and md.bitmap.to_bytes() == bits
    patch_file(path, page_offset(2), bytes(PAGE_BYTES))  # now a damaged page is caught
    assert opened(path).bitmap_pages_bad == (2,)


def test_version_1_file_after_a_crash_upgrades_then_recovers(path):
    write_v1_file(path, GiB, [5], clean=False)
    md = Metadata.open(path)
    assert not md.sb.clean_shutdown
    assert md.recover_crash() == BLOCKS_PER_EXTENT  # AL extent 2, from the version-1 slot
    crash(md)
    md = opened(path)
    assert md.bitmap.count() == 1 + BLOCKS_PER_EXTENT


def test_interrupted_upgrade_is_redone(path):
    bits = write_v1_file(path, GiB, [9])
    with mock.patch.object(Metadata, "write_superblock", side_effect=OSError(5, "EIO")), \
            pytest.raises(OSError):
        Metadata.open(path)  # the table is written, the superblock still says version 1
    assert slot_versions(path) == [1, 1]
    md = opened(path)  # the failed open released the file; this one upgrades again
    assert md.bitmap.to_bytes() == bits and slot_versions(path) == [2, 2]


# --- the metadata over a file object of the caller's -------------------------------------


class MemFile:
    """An in-memory MetaFile: `data` is what reads see, `durable` what a crash would leave
    (the data as of the last sync)."""

    def __init__(self, data: bytes = b"", name: str = "mem:r0.meta"):
        self.name = name
        self.data = bytearray(data)
        self.durable = bytes(data)
        self.syncs = 0
        self.closed = False

    def pread(self, length: int, offset: int) -> bytes:
        assert not self.closed
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data, offset: int) -> None:
        assert not self.closed
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def sync(self) -> None:
        self.syncs += 1
        self.durable = bytes(self.data)

    def size(self) -> int:
        return len(self.data)

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def close(self) -> None:
        self.closed = True


def test_metadata_over_an_in_memory_file(tmp_path):
    f = MemFile()
    md = Metadata.create_on(f, "alpha", "r0", GiB, al_extents_max=4)
    assert md.path == "mem:r0.meta" and f.size() == M.metadata_file_bytes(GiB)
    md.mark_open()
    md.al_activate([1, 3])
    md.bitmap.set_range(5 * BLOCK_BYTES, BLOCK_BYTES)
    syncs = f.syncs
    assert md.flush_bitmap() == 1 and f.syncs == syncs + 1  # one sync for page and CRC
    md.bitmap.set_range(AL_EXTENT_BYTES, BLOCK_BYTES)  # in memory only: the AL covers it
    md.abandon()  # crash: only what was synced survives
    assert f.closed
    md = Metadata.open_on(MemFile(f.durable), "alpha", "r0", GiB)
    assert not md.sb.clean_shutdown and md.bitmap.count() == 1
    assert md.recover_crash() == 2 * BLOCKS_PER_EXTENT
    md.mark_clean_shutdown()
    g = md.file
    md.close()
    md = Metadata.open_on(MemFile(g.durable))
    assert md.sb.clean_shutdown and md.bitmap.count() == 1 + 2 * BLOCKS_PER_EXTENT
    assert md.bitmap_pages_bad == ()
    md.close()
    assert list(tmp_path.iterdir()) == []  # nothing went to a real file


def test_in_memory_torn_write_back(path):
    """The same tear through the file object: the page write lands, the CRC entry's fails."""

    class TearsCrcWrites(MemFile):
        tear = False

        def pwrite(self, data, offset: int) -> None:
            if self.tear and offset >= M.crc_table_offset(GiB):
                raise OSError(5, "EIO")
            super().pwrite(data, offset)

    f = TearsCrcWrites()
    md = Metadata.create_on(f, "alpha", "r0", GiB)
    md.bitmap.set_blocks(3, 1)
    md.bitmap.set_blocks(BITS_PER_PAGE * 4 + 3, 1)
    md.flush_bitmap()
    md.bitmap.set_blocks(BITS_PER_PAGE * 4 + 9, 1)
    f.tear = True
    with pytest.raises(OSError):
        md.flush_bitmap()
    md.abandon()
    md = Metadata.open_on(MemFile(f.data))  # the page reached the disk, its CRC did not
    assert md.bitmap_pages_bad == (4,)
    assert md.bitmap.count() == 1 + BITS_PER_PAGE and md.bitmap.test_block(3)


def test_open_on_failure_leaves_the_file_to_the_caller():
    f = MemFile(b"not metadata" * 1000)
    with pytest.raises(MetadataError, match="mem:r0.meta has no valid superblock"):
        Metadata.open_on(f)
    assert not f.closed


# --- file modes ----------------------------------------------------------------------------


def test_metadata_is_created_mode_0600(path):
    old = os.umask(0)  # the mode must come from the code, not from a strict umask
    try:
        Metadata.create(path, "alpha", "r0", GiB).close()
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
