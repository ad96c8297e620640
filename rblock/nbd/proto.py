"""NBD wire format: constants, struct layouts, encoders and decoders. No I/O here.

Everything follows NetworkBlockDevice/nbd `doc/proto.md` (fixed newstyle handshake, simple and
structured replies, the `base:allocation` meta context). Integers are big-endian on the wire.
The functions here are pure so the handshake and transmission state machines, the tests and a
future simulator all share one codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# --- handshake -----------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0  # client flags
CLIENT_FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission --------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Which command flags each command accepts (FUA is accepted everywhere: the issue says so and
# clients such as qemu send it on WRITE_ZEROES and TRIM). Anything else is EINVAL.
CMD_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0  # base:allocation flags
STATE_ZERO = 1 << 1

META_BASE_ALLOCATION = "base:allocation"

# NBD error values (the protocol's own numbering, which happens to match Linux errno).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STRING_LENGTH_MAX = 4096  # proto.md: names and messages MUST be no longer than 4096 bytes

# --- struct layouts ------------------------------------------------------------------------

SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header + offset
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
ERROR_CHUNK_HEADER = struct.Struct(">IHHQIIH")  # chunk header + error + message length
BLOCK_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # info type, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # info type, minimum, preferred, maximum

assert REQUEST.size == 28 and SIMPLE_REPLY.size == 16 and CHUNK_HEADER.size == 20


class ProtocolError(Exception):
    """The peer broke framing or a MUST of the protocol: the connection has to be closed."""


# --- handshake encoders --------------------------------------------------------------------


def server_greeting() -> bytes:
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    assert reply_type & REP_FLAG_ERROR
    return option_reply(option, reply_type, message.encode()[:STRING_LENGTH_MAX])


def export_name_reply(size_bytes: int, tflags: int, no_zeroes: bool) -> bytes:
    return EXPORT_NAME_REPLY.pack(size_bytes, tflags) + (b"" if no_zeroes else bytes(124))


def info_export(size_bytes: int, tflags: int) -> bytes:
    return INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, size_bytes, tflags)


def info_name(name: str) -> bytes:
    return U16.pack(INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return U16.pack(INFO_DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_PAYLOAD.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def rep_server(name: str) -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw


def rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


# --- handshake decoders --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""

    export: str
    queries: tuple[str, ...]


class _Reader:
    """Bounds-checked cursor over option data; every overrun is a ValueError with a reason."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(f"option data too short for {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return U16.unpack(self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return U32.unpack(self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u32(f"{what} length")
        if n > STRING_LENGTH_MAX:
            raise ValueError(f"{what} longer than {STRING_LENGTH_MAX} bytes")
        try:
            return bytes(self.take(n, what)).decode()
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes in option data")


def parse_info_request(data: bytes) -> InfoRequest:
    r = _Reader(data)
    name = r.string("export name")
    count = r.u16("information request count")
    infos = tuple(r.u16("information request") for _ in range(count))
    r.end()
    return InfoRequest(name, infos)


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    r = _Reader(data)
    export = r.string("export name")
    count = r.u32("query count")
    queries = tuple(r.string("query") for _ in range(count))
    r.end()
    return MetaContextRequest(export, queries)


def encode_info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def encode_meta_context_request(export: str, queries: tuple[str, ...]) -> bytes:
    raw = export.encode()
    out = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        out += [U32.pack(len(qb)), qb]
    return b"".join(out)


# --- transmission --------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int
    # When the server found the request in its receive buffer (rblock/nbd/stats.py's clock,
    # in ns; set by the server, not part of the wire format): its reply's latency starts here.
    arrived_ns: int = 0

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.type, f"CMD_{self.type}")


def parse_request(buf: bytes | memoryview, pos: int = 0, arrived_ns: int = 0) -> Request:
    """Decode a 28-byte request header; a bad magic loses framing and raises ProtocolError."""
    magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(buf, pos)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, cmd, handle, offset, length, arrived_ns)


def encode_request(req: Request) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.handle, req.offset, req.length)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_none(handle: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def chunk_offset_data_header(handle: int, offset: int, data_bytes: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; the data itself follows as a separate buffer."""
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_DATA,
        handle, 8 + data_bytes, offset,
    )


def chunk_offset_hole(handle: int, offset: int, hole_bytes: int, done: bool) -> bytes:
    return OFFSET_HOLE_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_HOLE,
        handle, 12, offset, hole_bytes,
    )


def chunk_error(handle: int, error: int, message: str) -> bytes:
    msg = message.encode()[:STRING_LENGTH_MAX]
    return ERROR_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + len(msg),
        error, len(msg),
    ) + msg


def chunk_block_status(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = U32.pack(context_id) + b"".join(BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents)
    return CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len(body),
    ) + body


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded structured reply chunk (used by tests and the replication client)."""

    flags: int
    type: int
    handle: int
    payload: bytes


def parse_chunk(buf: bytes) -> tuple[Chunk, int]:
    """Decode one structured chunk from the front of BUF; returns it and the bytes consumed."""
    magic, flags, rtype, handle, length = CHUNK_HEADER.unpack_from(buf, 0)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic 0x{magic:08x}")
    end = CHUNK_HEADER.size + length
    if len(buf) < end:
        raise ValueError("truncated chunk")
    return Chunk(flags, rtype, handle, bytes(buf[CHUNK_HEADER.size : end])), end
