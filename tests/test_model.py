"""Model-based test: random operation sequences over one libnbd connection to rblock serve,
checked against an in-memory model of the 1 MiB export.

The model is exact except after TRIM, whose range may read back as the old data or as zeroes
(proto.md: after a trim the client must not assume anything until it writes again). The model
keeps, per byte, the last written value and whether a trim made it "old value or zero".
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_image, start_server

nbd = pytest.importorskip("nbd")

SIZE = 1 << 20
KiB = 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    img = make_image(d / "model.img", SIZE)
    srv = start_server([str(img), "--export", "m"], d / "servers")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(srv.uri)
    assert h.get_size() == SIZE
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.can_fast_zero() and h.can_trim() and h.can_zero()
    yield srv, h, img
    h.shutdown()
    assert srv.stop() == 0


class Model:
    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.either = bytearray(SIZE)  # 1: byte may read as data[i] or as 0 (trimmed)

    def write(self, off: int, buf: bytes) -> None:
        self.data[off:off + len(buf)] = buf
        self.either[off:off + len(buf)] = bytes(len(buf))

    def zero(self, off: int, n: int) -> None:
        self.write(off, bytes(n))

    def trim(self, off: int, n: int) -> None:
        self.either[off:off + n] = b"\1" * n

    def check(self, off: int, got: bytes, what: str) -> None:
        want = self.data[off:off + len(got)]
        if got == want:
            return
        for i, g in enumerate(got):
            w = want[i]
            if g != w and not (self.either[off + i] and g == 0):
                raise AssertionError(
                    f"{what}: byte at {off + i} is {g:#04x}, model says {w:#04x}"
                    f"{' or 0x00 (trimmed)' if self.either[off + i] else ''}")

    def reads_as_zero(self, off: int, n: int) -> bool:
        """Could every byte of the range read as zero?"""
        d = self.data[off:off + n]
        e = self.either[off:off + n]
        return all(b == 0 or t for b, t in zip(d, e, strict=True))


# Offsets mostly in a small hot region so operations overlap, sometimes anywhere (the end of
# the export included).
_hot = st.integers(0, 64 * KiB)
offsets = st.one_of(_hot, _hot, _hot, st.integers(0, SIZE - 1),
                    st.sampled_from([0, 4 * KiB, 64 * KiB, SIZE - 4 * KiB, SIZE - 1]))


@st.composite
def ranges(draw, max_len: int = 256 * KiB):
    off = draw(offsets)
    n = draw(st.integers(1, min(max_len, SIZE - off)))
    return off, n


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(
        ["pwrite", "pwrite", "pwrite", "zero", "trim", "flush", "pread", "pread",
         "block_status", "cache"]))
    if kind == "pwrite":
        off = draw(offsets)
        n = draw(st.integers(1, min(16 * KiB, SIZE - off)))
        seed = draw(st.integers(0, 255))
        fua = draw(st.booleans())
        return ("pwrite", off, n, seed, fua)
    if kind == "zero":
        off, n = draw(ranges())
        return ("zero", off, n, draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    if kind in ("trim", "pread", "block_status", "cache"):
        off, n = draw(ranges())
        return (kind, off, n, draw(st.booleans()))
    return ("flush",)


def pattern(n: int, seed: int) -> bytes:
    # mostly non-zero bytes so a missing write is visible; cheap to build
    block = bytes((seed + i) % 255 + 1 for i in range(256))
    return (block * (n // 256 + 1))[:n]


def read_df(h, n: int, off: int) -> bytes:
    """A structured READ with DF: exactly one data chunk covering the request."""
    chunks = []

    def chunk(buf, start, status, err):
        chunks.append((status, start, bytes(buf)))
        return 0

    h.pread_structured(n, off, chunk, flags=nbd.CMD_FLAG_DF)
    assert [(s, start, len(b)) for s, start, b in chunks] == [(nbd.READ_DATA, off, n)], [
        (s, start, len(b)) for s, start, b in chunks]
    return chunks[0][2]


def check_block_status(h, model: Model, off: int, n: int, req_one: bool) -> None:
    extents: list[tuple[int, int]] = []

    def cb(ctx, start, entries, err):
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION
        assert start == off
        extents.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(n, off, cb, flags=nbd.CMD_FLAG_REQ_ONE if req_one else 0)
    assert extents, "block status returned no extent"
    if req_one:
        assert len(extents) == 1 and extents[0][0] <= n, extents
    assert all(length > 0 for length, _ in extents), extents
    assert sum(length for length, _ in extents[:-1]) < n, extents
    pos = off
    for length, flags in extents:
        stop = min(pos + length, off + n, SIZE)
        if flags & nbd.STATE_ZERO and stop > pos:
            assert model.reads_as_zero(pos, stop - pos), (
                f"extent {pos}+{length} reported zero but the model has data there: {extents}")
        pos += length


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops(), min_size=1, max_size=25))
def test_random_operations_match_model(served, sequence):
    srv, h, img = served
    h.pwrite(bytes(SIZE), 0)  # reset: one big write of zeroes
    model = Model()
    for op in sequence:
        kind = op[0]
        if kind == "pwrite":
            _, off, n, seed, fua = op
            buf = pattern(n, seed)
            h.pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
            model.write(off, buf)
        elif kind == "zero":
            _, off, n, no_hole, fast, fua = op
            flags = ((nbd.CMD_FLAG_NO_HOLE if no_hole else 0)
                     | (nbd.CMD_FLAG_FAST_ZERO if fast else 0)
                     | (nbd.CMD_FLAG_FUA if fua else 0))
            try:
                h.zero(n, off, flags=flags)
            except nbd.Error as e:
                # only a FAST_ZERO request may fail, with ENOTSUP, leaving the data alone
                assert fast and e.errnum == errno.ENOTSUP, (op, e)
                continue
            model.zero(off, n)
        elif kind == "trim":
            _, off, n, fua = op
            h.trim(n, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
            model.trim(off, n)
        elif kind == "flush":
            h.flush()
        elif kind == "cache":
            h.cache(op[2], op[1])
        elif kind == "pread":
            _, off, n, df = op
            got = read_df(h, n, off) if df else h.pread(n, off)
            assert len(got) == n
            model.check(off, bytes(got), f"pread {n}@{off}")
        elif kind == "block_status":
            _, off, n, req_one = op
            check_block_status(h, model, off, n, req_one)
    model.check(0, bytes(h.pread(SIZE, 0)), "final read of the whole export")
    with open(img, "rb") as f:
        model.check(0, f.read(), "backing file")
    assert os.path.getsize(img) == SIZE
