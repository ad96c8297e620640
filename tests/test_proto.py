"""Codec round trips and the transmission rules, as pure functions (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rblock.nbd import proto as p
from rblock.nbd.transmission import (
    PAYLOAD_MAX_BYTES,
    RequestError,
    Session,
    check_request,
    read_reply,
    transmission_flags,
)
from rblock.store.device import Capabilities

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=64)


@given(flags=u16, cmd=u16, handle=u64, offset=u64, length=u32)
def test_request_round_trip(flags, cmd, handle, offset, length):
    req = p.Request(flags, cmd, handle, offset, length)
    wire = p.encode_request(req)
    assert len(wire) == 28
    assert p.parse_request(wire) == req


@given(magic=u32.filter(lambda m: m != p.REQUEST_MAGIC))
def test_bad_request_magic_is_a_protocol_error(magic):
    wire = struct.pack(">IHHQQI", magic, 0, 0, 1, 0, 512)
    with pytest.raises(p.ProtocolError):
        p.parse_request(wire)


@given(name=names, infos=st.lists(u16, max_size=8).map(tuple))
def test_info_request_round_trip(name, infos):
    assert p.parse_info_request(p.encode_info_request(name, infos)) == p.InfoRequest(name, infos)


@given(export=names, queries=st.lists(names, max_size=5).map(tuple))
def test_meta_context_request_round_trip(export, queries):
    got = p.parse_meta_context_request(p.encode_meta_context_request(export, queries))
    assert got == p.MetaContextRequest(export, queries)


@given(data=st.binary(max_size=64))
def test_info_request_parser_never_crashes(data):
    try:
        p.parse_info_request(data)
    except ValueError:
        pass


@given(handle=u64, err=u32, message=names)
def test_error_chunk_round_trip(handle, err, message):
    chunk, used = p.parse_chunk(p.chunk_error(handle, err, message))
    assert (chunk.handle, chunk.type, chunk.flags) == (handle, p.REPLY_TYPE_ERROR,
                                                       p.REPLY_FLAG_DONE)
    got_err, n = struct.unpack(">IH", chunk.payload[:6])
    assert got_err == err and chunk.payload[6:].decode() == message and n == len(message.encode())


@given(handle=u64, ctx=u32, extents=st.lists(st.tuples(u32, u32), min_size=1, max_size=20))
def test_block_status_chunk_round_trip(handle, ctx, extents):
    chunk, used = p.parse_chunk(p.chunk_block_status(handle, ctx, extents))
    assert chunk.type == p.REPLY_TYPE_BLOCK_STATUS
    assert struct.unpack(">I", chunk.payload[:4])[0] == ctx
    body = chunk.payload[4:]
    assert [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)] == extents


@st.composite
def read_pieces(draw):
    """A READ answer: alternating data and holes covering [offset, offset+n)."""
    offset = draw(st.integers(0, 2**40))
    pos, pieces = offset, []
    for is_hole in draw(st.lists(st.booleans(), max_size=6)):
        n = draw(st.integers(1, 300))
        pieces.append((pos, n if is_hole else draw(st.binary(min_size=n, max_size=n))))
        pos += n
    return offset, pieces


@given(handle=u64, rp=read_pieces())
def test_structured_read_reply_reassembles(handle, rp):
    offset, pieces = rp
    wire = b"".join(read_reply(handle, offset, pieces, structured=True))
    image: dict[int, int] = {}
    pos, chunks = 0, []
    while pos < len(wire):
        chunk, used = p.parse_chunk(wire[pos:])
        chunks.append(chunk)
        pos += used
    assert all(c.handle == handle for c in chunks)
    assert [c.flags & p.REPLY_FLAG_DONE for c in chunks] == [0] * (len(chunks) - 1) + [1]
    for c in chunks:
        if c.type == p.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack(">Q", c.payload[:8])
            image.update((off + i, b) for i, b in enumerate(c.payload[8:]))
        elif c.type == p.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", c.payload)
            image.update((off + i, 0) for i in range(n))
    expected: dict[int, int] = {}
    for off, d in pieces:
        expected.update((off + i, b) for i, b in enumerate(d if isinstance(d, bytes) else
                                                           bytes(d)))
    assert image == expected


@given(handle=u64, rp=read_pieces())
def test_simple_read_reply_is_header_plus_bytes(handle, rp):
    offset, pieces = rp
    wire = b"".join(read_reply(handle, offset, pieces, structured=False))
    assert wire[:16] == p.simple_reply(handle)
    assert wire[16:] == b"".join(d if isinstance(d, bytes) else bytes(d) for _, d in pieces)


SIZE = 1 << 20
RW = Session(SIZE, Capabilities(), structured_replies=True, base_allocation_id=1)
RO = Session(SIZE, Capabilities(read_only=True), structured_replies=False, base_allocation_id=None)


@pytest.mark.parametrize("session,req,err", [
    (RW, p.Request(0, p.CMD_READ, 1, SIZE - 1, 2), p.EINVAL),
    (RW, p.Request(0, p.CMD_WRITE, 1, SIZE - 1, 2), p.ENOSPC),
    (RW, p.Request(0, p.CMD_WRITE_ZEROES, 1, SIZE, 1), p.ENOSPC),
    (RW, p.Request(0, p.CMD_TRIM, 1, SIZE, 1), p.EINVAL),
    (RW, p.Request(0, p.CMD_READ, 1, 0, PAYLOAD_MAX_BYTES + 1), p.EINVAL),
    (RW, p.Request(0, 42, 1, 0, 0), p.EINVAL),
    (RW, p.Request(1 << 7, p.CMD_READ, 1, 0, 512), p.EINVAL),
    (RW, p.Request(p.CMD_FLAG_DF, p.CMD_WRITE, 1, 0, 512), p.EINVAL),
    (RW, p.Request(p.CMD_FLAG_REQ_ONE, p.CMD_READ, 1, 0, 512), p.EINVAL),
    (RW, p.Request(p.CMD_FLAG_NO_HOLE, p.CMD_TRIM, 1, 0, 512), p.EINVAL),
    (RW, p.Request(0, p.CMD_BLOCK_STATUS, 1, 0, 0), p.EINVAL),
    (RO, p.Request(0, p.CMD_WRITE, 1, 0, 512), p.EPERM),
    (RO, p.Request(0, p.CMD_TRIM, 1, 0, 512), p.EPERM),
    (RO, p.Request(p.CMD_FLAG_DF, p.CMD_READ, 1, 0, 512), p.EINVAL),
    (RO, p.Request(0, p.CMD_BLOCK_STATUS, 1, 0, 512), p.EINVAL),
])
def test_check_request_refuses(session, req, err):
    with pytest.raises(RequestError) as e:
        check_request(req, session)
    assert e.value.err == err
    assert str(e.value)


@given(offset=st.integers(0, SIZE), length=st.integers(0, SIZE),
       cmd=st.sampled_from([p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES,
                            p.CMD_CACHE]),
       fua=st.booleans())
def test_check_request_accepts_in_range(offset, length, cmd, fua):
    req = p.Request(p.CMD_FLAG_FUA if fua else 0, cmd, 7, offset, length)
    if offset + length <= SIZE:
        check_request(req, RW)
    else:
        with pytest.raises(RequestError):
            check_request(req, RW)


def test_transmission_flags_follow_capabilities():
    rw = transmission_flags(Capabilities())
    for f in (p.TFLAG_HAS_FLAGS, p.TFLAG_SEND_FLUSH, p.TFLAG_SEND_FUA, p.TFLAG_SEND_TRIM,
              p.TFLAG_SEND_WRITE_ZEROES, p.TFLAG_SEND_FAST_ZERO, p.TFLAG_SEND_CACHE,
              p.TFLAG_SEND_DF, p.TFLAG_CAN_MULTI_CONN):
        assert rw & f
    assert not rw & p.TFLAG_READ_ONLY
    ro = transmission_flags(Capabilities(read_only=True))
    assert ro & p.TFLAG_READ_ONLY and not ro & (p.TFLAG_SEND_TRIM | p.TFLAG_SEND_WRITE_ZEROES)
