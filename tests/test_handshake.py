"""The handshake state machine, fed bytes directly (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rblock.nbd import proto as p
from rblock.nbd.handshake import (
    Close,
    ExportInfo,
    ExportRefused,
    Handshake,
    Negotiated,
    StartTLS,
    TLSMode,
)


class Catalog:
    def __init__(self, *names: str):
        self.exports = {n: ExportInfo(n, 1 << 20, p.TFLAG_HAS_FLAGS, f"disk {n}") for n in names}

    def names(self):
        return list(self.exports)

    def lookup(self, name):
        name = name or next(iter(self.exports))
        if name not in self.exports:
            raise ExportRefused(f"export '{name}' not found; exports: {', '.join(self.exports)}")
        return self.exports[name]


def opt(option: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data


def replies(wire: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(wire):
        magic, option, rtype, n = p.OPTION_REPLY_HEADER.unpack_from(wire, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += p.OPTION_REPLY_HEADER.size
        out.append((option, rtype, wire[pos:pos + n]))
        pos += n
    return out


def started(tls=TLSMode.OFF, flags=p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES):
    hs = Handshake(Catalog("a", "b"), tls)
    magic, ihaveopt, hflags = p.SERVER_GREETING.unpack(hs.greeting())
    assert (magic, ihaveopt) == (p.NBDMAGIC, p.IHAVEOPT)
    assert hflags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    out, ev = hs.feed(struct.pack(">I", flags))
    assert out == b"" and ev is None
    return hs


def test_go_with_info_requests_and_trailing_bytes():
    hs = started()
    out, ev = hs.feed(opt(p.OPT_STRUCTURED_REPLY))
    assert replies(out) == [(p.OPT_STRUCTURED_REPLY, p.REP_ACK, b"")]
    req = p.encode_info_request("b", (p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE))
    out, ev = hs.feed(opt(p.OPT_GO, req) + b"early request bytes")
    r = replies(out)
    assert r[-1] == (p.OPT_GO, p.REP_ACK, b"")
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for _, t, d in r[:-1] if t == p.REP_INFO}
    assert struct.unpack(">QH", infos[p.INFO_EXPORT]) == (1 << 20, p.TFLAG_HAS_FLAGS)
    assert infos[p.INFO_NAME] == b"b" and infos[p.INFO_DESCRIPTION] == b"disk b"
    assert struct.unpack(">III", infos[p.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert isinstance(ev, Negotiated) and ev.export.name == "b" and ev.structured_replies
    assert ev.rest == b"early request bytes"


def test_bytes_arrive_one_at_a_time():
    hs = started()
    wire = opt(p.OPT_LIST) + opt(p.OPT_GO, p.encode_info_request("a"))
    out, ev = b"", None
    for i in range(len(wire)):
        o, ev = hs.feed(wire[i:i + 1])
        out += o
    assert isinstance(ev, Negotiated) and ev.export.name == "a"
    assert [(o, t) for o, t, _ in replies(out)][:3] == [
        (p.OPT_LIST, p.REP_SERVER), (p.OPT_LIST, p.REP_SERVER), (p.OPT_LIST, p.REP_ACK)]


def test_unknown_export_names_the_known_ones_and_carries_on():
    hs = started()
    out, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("nope")))
    (option, rtype, msg), = replies(out)
    assert rtype == p.REP_ERR_UNKNOWN and b"'nope' not found; exports: a, b" in msg
    assert ev is None
    out, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("")))
    assert isinstance(ev, Negotiated) and ev.export.name == "a"


def test_unknown_option_is_unsupported_and_carries_on():
    hs = started()
    out, ev = hs.feed(opt(999, b"xyz"))
    assert replies(out)[0][:2] == (999, p.REP_ERR_UNSUP) and ev is None
    out, ev = hs.feed(opt(p.OPT_EXPORT_NAME, b"a"))
    assert isinstance(ev, Negotiated)


@pytest.mark.parametrize("no_zeroes,length", [(True, 10), (False, 134)])
def test_export_name_reply_padding(no_zeroes, length):
    flags = p.CLIENT_FLAG_FIXED_NEWSTYLE | (p.CLIENT_FLAG_NO_ZEROES if no_zeroes else 0)
    hs = started(flags=flags)
    out, ev = hs.feed(opt(p.OPT_EXPORT_NAME, b"b"))
    assert len(out) == length and struct.unpack(">QH", out[:10]) == (1 << 20, p.TFLAG_HAS_FLAGS)
    assert isinstance(ev, Negotiated)


def test_export_name_unknown_closes():
    hs = started()
    out, ev = hs.feed(opt(p.OPT_EXPORT_NAME, b"zzz"))
    assert out == b"" and isinstance(ev, Close) and "zzz" in ev.reason


def test_unknown_client_flags_close():
    hs = Handshake(Catalog("a"))
    out, ev = hs.feed(struct.pack(">I", 1 << 5))
    assert isinstance(ev, Close)


def test_bad_option_magic_closes():
    hs = started()
    out, ev = hs.feed(struct.pack(">QII", 0x1234, p.OPT_LIST, 0))
    assert isinstance(ev, Close) and "magic" in ev.reason


def test_abort_is_acked_then_closed():
    hs = started()
    out, ev = hs.feed(opt(p.OPT_ABORT))
    assert replies(out) == [(p.OPT_ABORT, p.REP_ACK, b"")] and isinstance(ev, Close)


def test_oversized_option_is_skipped_with_too_big():
    hs = started()
    out, ev = hs.feed(opt(p.OPT_GO, bytes(100_000)))
    assert replies(out)[0][1] == p.REP_ERR_TOO_BIG and ev is None
    out, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("a")))
    assert isinstance(ev, Negotiated)


def test_meta_contexts():
    hs = started()
    set_req = p.encode_meta_context_request("a", (p.META_BASE_ALLOCATION,))
    out, _ = hs.feed(opt(p.OPT_SET_META_CONTEXT, set_req))
    assert replies(out)[0][1] == p.REP_ERR_INVALID  # structured replies first
    hs.feed(opt(p.OPT_STRUCTURED_REPLY))
    out, _ = hs.feed(opt(p.OPT_LIST_META_CONTEXT, p.encode_meta_context_request("a", ())))
    r = replies(out)
    assert r[0][1] == p.REP_META_CONTEXT and r[0][2][4:] == b"base:allocation"
    out, _ = hs.feed(opt(p.OPT_LIST_META_CONTEXT,
                         p.encode_meta_context_request("a", ("qemu:dirty-bitmap:x",))))
    assert replies(out) == [(p.OPT_LIST_META_CONTEXT, p.REP_ACK, b"")]
    out, _ = hs.feed(opt(p.OPT_SET_META_CONTEXT, set_req))
    r = replies(out)
    ctx_id = struct.unpack(">I", r[0][2][:4])[0]
    assert ctx_id != 0 and r[-1][1] == p.REP_ACK
    _, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("a")))
    assert isinstance(ev, Negotiated) and ev.base_allocation_id == ctx_id


def test_meta_context_for_another_export_is_dropped_at_go():
    hs = started()
    hs.feed(opt(p.OPT_STRUCTURED_REPLY))
    hs.feed(opt(p.OPT_SET_META_CONTEXT,
                p.encode_meta_context_request("a", (p.META_BASE_ALLOCATION,))))
    _, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("b")))
    assert isinstance(ev, Negotiated) and ev.base_allocation_id is None


def test_tls_required_refuses_everything_but_starttls():
    hs = started(TLSMode.REQUIRE)
    for option in (p.OPT_LIST, p.OPT_INFO, p.OPT_GO, p.OPT_STRUCTURED_REPLY, 999):
        out, ev = hs.feed(opt(option, p.encode_info_request("a") if option in
                              (p.OPT_INFO, p.OPT_GO) else b""))
        assert replies(out)[0][1] == p.REP_ERR_TLS_REQD and ev is None
    out, ev = hs.feed(opt(p.OPT_STARTTLS))
    assert replies(out) == [(p.OPT_STARTTLS, p.REP_ACK, b"")] and isinstance(ev, StartTLS)
    hs.tls_established()
    out, ev = hs.feed(opt(p.OPT_STARTTLS))
    assert replies(out)[0][1] == p.REP_ERR_INVALID
    _, ev = hs.feed(opt(p.OPT_GO, p.encode_info_request("a")))
    assert isinstance(ev, Negotiated) and ev.tls


def test_tls_required_export_name_closes():
    hs = started(TLSMode.REQUIRE)
    _, ev = hs.feed(opt(p.OPT_EXPORT_NAME, b"a"))
    assert isinstance(ev, Close)


def test_starttls_without_tls_configured_is_policy():
    hs = started(TLSMode.OFF)
    out, ev = hs.feed(opt(p.OPT_STARTTLS))
    assert replies(out)[0][1] == p.REP_ERR_POLICY and ev is None


@given(st.lists(st.binary(max_size=40), max_size=30))
def test_garbage_never_crashes(chunks):
    """Whatever the bytes, the machine answers, waits, or closes; it never raises."""
    hs = started()
    for c in chunks:
        _, ev = hs.feed(c)
        if ev is not None:
            break
