"""rblock serve against python3-libnbd and a raw-socket client: errors, framing, handshake
options, pipelining, multi-conn and structured replies."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from tests.conftest import make_image
from tests.nbdwire import (
    CMD_READ,
    CMD_WRITE,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    Raw,
    file_bytes,
    info_request,
    meta_context_request,
    wait_for_log,
)

nbd = pytest.importorskip("nbd")

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB


def connect(uri: str, meta: bool = True, strict: bool = False, structured: bool = True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h


def errno_of(fn) -> int | None:
    try:
        fn()
    except nbd.Error as e:
        return e.errnum
    return None


@pytest.fixture
def served(rblock_serve, tmp_path):
    """A 64 MiB sparse image with a known 1 MiB of data at 1 MiB, served as export 'x'."""
    img = make_image(tmp_path / "disk.img", SIZE)
    data = os.urandom(MiB)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(data)
    srv = rblock_serve(img, "--export", "x")
    return srv, img, data


# --- bad requests: the right errno, and the connection stays usable --------------------------


def test_bad_requests_get_errno_and_connection_carries_on(served):
    srv, img, data = served
    h = connect(srv.uri)
    size = h.get_size()
    assert size == SIZE

    def good_read():
        assert h.pread(4096, MiB) == data[:4096]

    bad = {
        "read past end": (lambda: h.pread(4096, size - 100), errno.EINVAL),
        "write past end": (lambda: h.pwrite(b"y" * 4096, size - 100), errno.ENOSPC),
        "zero past end": (lambda: h.zero(4096, size - 100), errno.ENOSPC),
        "trim past end": (lambda: h.trim(4096, size - 100), errno.EINVAL),
        "cache past end": (lambda: h.cache(4096, size - 100), errno.EINVAL),
        "offset overflow": (lambda: h.pread(4096, 2**64 - 100), errno.EINVAL),
        "undefined flag 0x80 on read": (lambda: h.pread(512, 0, flags=0x80), errno.EINVAL),
        "undefined flag 1<<5 on read": (lambda: h.pread(512, 0, flags=1 << 5), errno.EINVAL),
        "DF on write": (lambda: h.pwrite(b"y", 0, flags=nbd.CMD_FLAG_DF), errno.EINVAL),
        "NO_HOLE on write": (lambda: h.pwrite(b"y", 0, flags=nbd.CMD_FLAG_NO_HOLE),
                             errno.EINVAL),
        "REQ_ONE on read": (lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
        "FAST_ZERO on trim": (lambda: h.trim(512, 0, flags=nbd.CMD_FLAG_FAST_ZERO),
                              errno.EINVAL),
        "read over 32 MiB": (lambda: h.pread(32 * MiB + 1, 0), errno.EINVAL),
    }
    for what, (fn, want) in bad.items():
        got = errno_of(fn)
        assert got == want, f"{what}: errno {got}, want {want}"
        good_read()
    # nothing was written by the refused writes
    assert file_bytes(img, size - 100, 100) == bytes(100)
    assert file_bytes(img, 0, 1) == b"\0"
    h.shutdown()
    assert srv.stop() == 0


def test_read_of_exactly_32_mib_is_allowed(served):
    srv, _, data = served
    h = connect(srv.uri)
    got = h.pread(32 * MiB, 0)
    assert len(got) == 32 * MiB
    assert got[MiB:2 * MiB] == data
    h.shutdown()


def test_write_on_read_only_export_is_eperm(rblock_serve, tmp_path):
    img = make_image(tmp_path / "ro.img", 4 * MiB, random_data=True)
    before = img.read_bytes()
    srv = rblock_serve(img, "--export", "ro", "--read-only")
    h = connect(srv.uri)
    assert h.is_read_only()
    for what, fn in {
        "write": lambda: h.pwrite(b"z" * 512, 0),
        "zero": lambda: h.zero(512, 0),
        "trim": lambda: h.trim(512, 0),
    }.items():
        assert errno_of(fn) == errno.EPERM, what
        assert h.pread(512, 0) == before[:512]
    h.flush()  # flush of a read-only export is harmless
    h.shutdown()
    assert srv.stop() == 0
    assert img.read_bytes() == before


def test_block_status_without_meta_context_is_einval(served):
    srv, _, data = served
    h = connect(srv.uri, meta=False)
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert errno_of(lambda: h.block_status(4096, 0, lambda *a: 0)) == errno.EINVAL
    assert h.pread(4096, MiB) == data[:4096]
    h.shutdown()


def test_df_without_structured_replies_is_einval(served):
    srv, _, data = served
    h = connect(srv.uri, meta=False, structured=False)
    assert not h.get_structured_replies_negotiated()
    assert errno_of(lambda: h.pread(4096, MiB, flags=nbd.CMD_FLAG_DF)) == errno.EINVAL
    assert h.pread(4096, MiB) == data[:4096]
    h.shutdown()


# --- framing loss: only the offending connection is closed ------------------------------------


def raw_transmission(uri: str, name: str = "x") -> Raw:
    """A raw connection in the transmission phase with simple replies."""
    r = Raw(uri)
    r.start()
    r.go(name)
    return r


def test_bad_request_magic_closes_only_that_connection(served):
    srv, _, data = served
    other = connect(srv.uri)
    with raw_transmission(srv.uri) as r:
        assert r.read(MiB, 16) == data[:16]
        r.request(CMD_READ, 0, 512, magic=0x12345678)
        assert r.wait_closed(), "server kept a connection that lost framing"
    log = wait_for_log(srv.log, "bad request magic")
    assert "bad request magic 0x12345678" in log
    assert other.pread(4096, MiB) == data[:4096]
    other.shutdown()
    assert srv.stop() == 0


def test_write_header_over_32_mib_closes_connection(served):
    srv, img, data = served
    other = connect(srv.uri)
    with raw_transmission(srv.uri) as r:
        r.request(CMD_WRITE, 0, 32 * MiB + 1)  # header only; no payload follows
        assert r.wait_closed(), "server waited for a 32 MiB + 1 payload"
    log = wait_for_log(srv.log, "WRITE payload of")
    assert f"WRITE payload of {32 * MiB + 1} bytes is over" in log
    assert other.pread(4096, MiB) == data[:4096]
    other.shutdown()
    assert srv.stop() == 0
    assert file_bytes(img, 0, 4096) == bytes(4096)


def test_client_vanishing_mid_write_payload_leaves_server_healthy(served):
    srv, img, data = served
    with raw_transmission(srv.uri) as r:
        r.request(CMD_WRITE, 0, 64 * KiB, payload=b"\xee" * (32 * KiB))
    # The half-sent write must not be applied, the server must log the close, and serve on.
    log = wait_for_log(srv.log, "closed: client closed")
    assert "export 'x' (simple) closed: client closed" in log
    h = connect(srv.uri)
    assert h.pread(64 * KiB, 0) == bytes(64 * KiB)
    assert h.pread(4096, MiB) == data[:4096]
    h.shutdown()
    assert srv.stop() == 0
    assert file_bytes(img, 0, 64 * KiB) == bytes(64 * KiB)


# --- handshake options, byte by byte -----------------------------------------------------------


def test_unknown_option_is_unsupported_and_handshake_carries_on(served):
    srv, _, data = served
    with Raw(srv.uri) as r:
        r.start()
        replies = r.option(0x4242, b"junk")
        assert [t for t, _ in replies] == [REP_ERR_UNSUP]
        size, tflags = r.go("x")
        assert size == SIZE
        assert r.read(MiB, 512) == data[:512]


def test_go_with_unknown_export_names_the_known_ones(rblock_serve, tmp_path):
    a = make_image(tmp_path / "a.img", MiB)
    b = make_image(tmp_path / "b.img", 2 * MiB)
    srv = rblock_serve(f"alpha={a}", f"beta={b}")
    with Raw(srv.uri) as r:
        r.start()
        replies = r.option(OPT_GO, info_request("nope"))
        assert len(replies) == 1
        rtype, msg = replies[0]
        assert rtype == REP_ERR_UNKNOWN
        text = msg.decode()
        assert "nope" in text and "alpha" in text and "beta" in text, text
        # the handshake continues: the empty name picks the first export
        size, _ = r.go("")
        assert size == MiB
    assert srv.stop() == 0


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_with_and_without_no_zeroes(served, no_zeroes):
    srv, _, data = served
    with Raw(srv.uri) as r:
        server_flags = r.start(no_zeroes=no_zeroes)
        assert server_flags & 2  # the server offers NO_ZEROES
        r.send_option(OPT_EXPORT_NAME, b"x")
        size, tflags = struct.unpack(">QH", r.recv_exact(10))
        assert size == SIZE
        assert tflags & 1 and not tflags & 2  # HAS_FLAGS, not read-only
        if not no_zeroes:
            assert r.recv_exact(124) == bytes(124)
        # The next bytes must be exactly the reply to our READ: no stray padding.
        assert r.read(MiB, 256) == data[:256]


def test_export_name_unknown_closes(served):
    srv, _, _ = served
    with Raw(srv.uri) as r:
        r.start()
        r.send_option(OPT_EXPORT_NAME, b"nope")
        assert r.wait_closed()


def test_opt_list_names_every_export(rblock_serve, tmp_path):
    imgs = [make_image(tmp_path / f"{n}.img", MiB) for n in ("one", "two", "three")]
    srv = rblock_serve(*imgs)
    with Raw(srv.uri) as r:
        r.start()
        replies = r.option(OPT_LIST)
        assert replies[-1][0] == REP_ACK
        names = []
        for rtype, payload in replies[:-1]:
            assert rtype == REP_SERVER
            (n,) = struct.unpack(">I", payload[:4])
            names.append(payload[4:4 + n].decode())
        assert names == ["one", "two", "three"]
        # LIST with data is invalid but not fatal
        bad = r.option(OPT_LIST, b"x")
        assert bad[-1][0] & 2**31
        assert r.go("two")[0] == MiB


def test_opt_abort_is_acked_then_closed(served):
    srv, _, _ = served
    with Raw(srv.uri) as r:
        r.start()
        replies = r.option(OPT_ABORT)
        assert replies == [(REP_ACK, b"")]
        assert r.wait_closed()
    assert "client sent NBD_OPT_ABORT" in wait_for_log(srv.log, "NBD_OPT_ABORT")


def meta_replies(replies) -> list[tuple[int, str]]:
    out = []
    for rtype, payload in replies:
        if rtype == REP_META_CONTEXT:
            (ctx_id,) = struct.unpack(">I", payload[:4])
            out.append((ctx_id, payload[4:].decode()))
        else:
            assert rtype == REP_ACK, (rtype, payload)
    return out


def test_meta_contexts_list_and_set(served):
    srv, _, _ = served
    with Raw(srv.uri) as r:
        r.start()
        listed = meta_replies(r.option(OPT_LIST_META_CONTEXT,
                                       meta_context_request("x", ("base:allocation",))))
        assert [name for _, name in listed] == ["base:allocation"]
        everything = meta_replies(r.option(OPT_LIST_META_CONTEXT, meta_context_request("x", ())))
        assert [name for _, name in everything] == ["base:allocation"]
        unknown = meta_replies(r.option(OPT_LIST_META_CONTEXT,
                                        meta_context_request("x", ("qemu:dirty-bitmap:b",))))
        assert unknown == []
        unknown2 = meta_replies(r.option(OPT_LIST_META_CONTEXT,
                                         meta_context_request("x", ("nosuch:thing",))))
        assert unknown2 == []
        assert r.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        chosen = meta_replies(r.option(OPT_SET_META_CONTEXT,
                                       meta_context_request("x", ("base:allocation",))))
        assert len(chosen) == 1 and chosen[0][1] == "base:allocation"
        assert chosen[0][0] != 0
        none = meta_replies(r.option(OPT_SET_META_CONTEXT,
                                     meta_context_request("x", ("nosuch:thing",))))
        assert none == []


def test_opt_info_answers_name_description_block_size(served):
    srv, img, data = served
    with Raw(srv.uri) as r:
        r.start()
        replies = r.option(OPT_INFO, info_request(
            "", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)))
        assert replies[-1] == (REP_ACK, b"")
        infos = {}
        for rtype, payload in replies[:-1]:
            assert rtype == REP_INFO
            infos[struct.unpack(">H", payload[:2])[0]] = payload[2:]
        assert set(infos) == {INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE}
        size, tflags = struct.unpack(">QH", infos[INFO_EXPORT])
        assert size == SIZE
        assert infos[INFO_NAME].decode() == "x"  # the canonical name for ""
        assert str(img) in infos[INFO_DESCRIPTION].decode()
        assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
        # INFO does not end the handshake
        assert r.go("x")[0] == SIZE
        assert r.read(MiB, 64) == data[:64]


# --- pipelining --------------------------------------------------------------------------------


def test_pipelined_mixed_size_requests_all_complete_correctly(rblock_serve, tmp_path):
    img = make_image(tmp_path / "pipe.img", 96 * MiB)
    srv = rblock_serve(img, "--export", "p")
    h = connect(srv.uri)
    sizes = [4 * MiB if i % 4 == 0 else 512 * (1 + i % 7) for i in range(32)]
    # 32 writes into [0, 48 MiB) and 32 reads of data written beforehand into [48, 96 MiB)
    write_ops, read_ops = [], []
    off = 0
    for n in sizes:
        write_ops.append((off, os.urandom(n)))
        off += (n + 4095) // 4096 * 4096
    read_base = 48 * MiB
    off = read_base
    for n in reversed(sizes):
        read_ops.append((off, os.urandom(n)))
        off += (n + 4095) // 4096 * 4096
    for o, d in read_ops:
        h.pwrite(d, o)

    completed: list[tuple[str, int]] = []
    errors: list[tuple[tuple[str, int], int]] = []
    cookies = []
    bufs = []

    def done(tag):
        def cb(err):
            if err.value:
                errors.append((tag, err.value))
            completed.append(tag)
            return 1  # retire the command
        return cb

    for i in range(32):
        o, d = write_ops[i]
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), o, done(("w", i))))
        ro, rd = read_ops[i]
        buf = nbd.Buffer(len(rd))
        bufs.append(buf)
        cookies.append(h.aio_pread(buf, ro, done(("r", i))))
    max_in_flight = h.aio_in_flight()
    in_flight_at_first_reply = None
    while len(completed) < len(cookies):
        h.poll(-1)
        n = h.aio_in_flight()
        if completed and in_flight_at_first_reply is None:
            in_flight_at_first_reply = n
        max_in_flight = max(max_in_flight, n)
    assert len(completed) == 64
    assert errors == []
    assert max_in_flight > 1
    # The first replies arrived while other requests were still outstanding (issued and not
    # yet answered): the server accepted pipelined requests rather than one at a time.
    assert in_flight_at_first_reply is not None and in_flight_at_first_reply > 1
    for i, (ro, rd) in enumerate(read_ops):
        assert bufs[i].to_bytearray() == rd, f"read {i} of {len(rd)} bytes at {ro}"
    for o, d in write_ops:
        assert h.pread(len(d), o) == d
        assert file_bytes(img, o, len(d)) == d
    h.shutdown()
    assert srv.stop() == 0


def test_big_then_small_read_both_correct(served):
    """Replies may complete out of order (allowed, not required): only correctness is
    asserted; the order seen is in the assertion message if it fails."""
    srv, _, data = served
    h = connect(srv.uri)
    order = []
    big = nbd.Buffer(16 * MiB)
    small = nbd.Buffer(512)
    h.aio_pread(big, 0, lambda err: order.append("big") or 1)
    h.aio_pread(small, MiB, lambda err: order.append("small") or 1)
    while len(order) < 2:
        h.poll(-1)
    assert sorted(order) == ["big", "small"], order
    got = big.to_bytearray()
    assert got[MiB:2 * MiB] == data and got[:MiB] == bytes(MiB), order
    assert small.to_bytearray() == data[:512], order
    h.shutdown()


# --- multi-conn --------------------------------------------------------------------------------


def test_multi_conn_flush_on_b_after_write_on_a_succeeds_and_data_visible(served):
    """A write replied to on connection A (no FUA) then FLUSH on connection B: the flush
    succeeds, B reads A's data and so does the backing file. (Durability across a power cut
    cannot be checked here; the server advertises multi-conn and shares one fd.)"""
    srv, img, _ = served
    a = connect(srv.uri)
    b = connect(srv.uri)
    assert a.can_multi_conn() and b.can_multi_conn()
    payload = os.urandom(256 * KiB)
    a.pwrite(payload, 8 * MiB)
    b.flush()
    assert b.pread(len(payload), 8 * MiB) == payload
    assert file_bytes(img, 8 * MiB, len(payload)) == payload
    # and the other way round, with FUA on the write instead of a flush
    payload2 = os.urandom(64 * KiB)
    b.pwrite(payload2, 12 * MiB, flags=nbd.CMD_FLAG_FUA)
    assert a.pread(len(payload2), 12 * MiB) == payload2
    a.shutdown()
    b.shutdown()
    assert srv.stop() == 0


# --- structured replies ------------------------------------------------------------------------


def read_chunks(h, count, offset, flags=0):
    chunks = []

    def chunk(buf, off, status, err):
        chunks.append((status, off, bytes(buf)))
        return 0

    h.pread_structured(count, offset, chunk, flags=flags)
    return chunks


def test_sparse_structured_read_sends_hole_chunks(served):
    srv, _, data = served
    h = connect(srv.uri)
    assert h.get_structured_replies_negotiated()
    # [0, 1M) hole, [1M, 2M) data, [2M, 3M) hole
    chunks = read_chunks(h, 3 * MiB, 0)
    statuses = [s for s, _, _ in chunks]
    assert nbd.READ_HOLE in statuses and nbd.READ_DATA in statuses, chunks
    assembled = bytearray(3 * MiB)
    covered = 0
    for status, off, buf in chunks:
        assert status in (nbd.READ_DATA, nbd.READ_HOLE)
        if status == nbd.READ_HOLE:
            assert buf == bytes(len(buf))
        assembled[off:off + len(buf)] = buf
        covered += len(buf)
    assert covered == 3 * MiB
    assert assembled == bytes(MiB) + data + bytes(MiB)
    holes = sorted((off, len(buf)) for s, off, buf in chunks if s == nbd.READ_HOLE)
    assert holes[0] == (0, MiB) and holes[-1] == (2 * MiB, MiB), holes

    # a pure hole of 64 KiB is one hole chunk
    only_hole = read_chunks(h, 64 * KiB, 4 * MiB)
    assert [(s, off, len(b)) for s, off, b in only_hole] == [(nbd.READ_HOLE, 4 * MiB, 64 * KiB)]

    # DF: one data chunk for the whole range, holes as zero bytes
    df = read_chunks(h, 3 * MiB, 0, flags=nbd.CMD_FLAG_DF)
    assert len(df) == 1
    status, off, buf = df[0]
    assert (status, off) == (nbd.READ_DATA, 0)
    assert buf == bytes(MiB) + data + bytes(MiB)
    h.shutdown()


def test_plain_read_without_structured_replies(served):
    srv, _, data = served
    h = connect(srv.uri, meta=False, structured=False)
    assert not h.get_structured_replies_negotiated()
    assert h.pread(3 * MiB, 0) == bytes(MiB) + data + bytes(MiB)
    assert h.pread(64 * KiB, 4 * MiB) == bytes(64 * KiB)
    h.pwrite(b"abc", 5 * MiB)
    assert h.pread(3, 5 * MiB) == b"abc"
    h.shutdown()


def test_block_status_with_and_without_req_one(served):
    srv, _, _ = served
    h = connect(srv.uri)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    def status(count, offset, flags=0):
        got = []

        def cb(ctx, off, entries, err):
            assert ctx == nbd.CONTEXT_BASE_ALLOCATION
            got.append((off, list(entries)))
            return 0

        h.block_status(count, offset, cb, flags=flags)
        assert len(got) == 1
        off, entries = got[0]
        assert off == offset
        return list(zip(entries[::2], entries[1::2], strict=True))

    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    full = status(3 * MiB, 0)
    assert full == [(MiB, hole), (MiB, 0), (MiB, hole)], full
    one = status(3 * MiB, 0, flags=nbd.CMD_FLAG_REQ_ONE)
    assert one == [(MiB, hole)], one
    one_data = status(3 * MiB, MiB, flags=nbd.CMD_FLAG_REQ_ONE)
    assert one_data == [(MiB, 0)], one_data
    mid = status(MiB, MiB + 4096)
    assert mid == [(MiB - 4096, 0), (4096, hole)], mid
    mid_one = status(MiB, MiB + 4096, flags=nbd.CMD_FLAG_REQ_ONE)
    assert mid_one == [(MiB - 4096, 0)], mid_one
    h.shutdown()


# --- protocol MUSTs ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["go", "export_name"])
def test_send_df_flag_clear_without_structured_replies(served, how):
    """proto.md, NBD_FLAG_SEND_DF: the server 'MUST leave this flag clear if structured replies
    have not been negotiated'."""
    srv, _, _ = served
    send_df = 1 << 7
    with Raw(srv.uri) as r:
        r.start()
        if how == "go":
            _, tflags = r.go("x")
        else:
            r.send_option(OPT_EXPORT_NAME, b"x")
            _, tflags = struct.unpack(">QH", r.recv_exact(10))
        assert not tflags & send_df, f"transmission flags 0x{tflags:x} have SEND_DF"


def test_send_df_flag_set_with_structured_replies(served):
    srv, _, _ = served
    with Raw(srv.uri) as r:
        r.start()
        assert r.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        _, tflags = r.go("x")
        assert tflags & (1 << 7)


def test_set_meta_context_ignores_bare_base_namespace(served):
    """proto.md, the base: namespace: the query 'base:' - 'the server MUST ignore this form
    during NBD_OPT_SET_META_CONTEXT' (it is a wildcard for LIST only)."""
    srv, _, _ = served
    with Raw(srv.uri) as r:
        r.start()
        listed = meta_replies(r.option(OPT_LIST_META_CONTEXT,
                                       meta_context_request("x", ("base:",))))
        assert [n for _, n in listed] == ["base:allocation"]
        assert r.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        chosen = meta_replies(r.option(OPT_SET_META_CONTEXT,
                                       meta_context_request("x", ("base:",))))
        assert chosen == [], "SET_META_CONTEXT 'base:' selected a context"
