"""A tiny blocking NBD client over a raw socket, for tests that need exact control of bytes.

Constants are written out from NetworkBlockDevice/nbd doc/proto.md on purpose: the tests must
not share the server's codec (rblock.nbd.proto), or a wrong constant would go unnoticed.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

TFLAG_HAS_FLAGS = 1
TFLAG_READ_ONLY = 2


def address(uri: str) -> tuple[str, int] | str:
    """(host, port) for nbd://HOST:PORT/NAME, or the socket path for nbd+unix:///NAME?socket=P."""
    parts = urlsplit(uri)
    if parts.scheme.endswith("+unix"):
        return parse_qs(parts.query)["socket"][0]
    assert parts.hostname and parts.port, uri
    return parts.hostname, parts.port


class Raw:
    """One connection; methods block (with a timeout) and raise on short reads."""

    def __init__(self, uri: str, timeout_s: float = 10.0):
        where = address(uri)
        if isinstance(where, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(where)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bytes ------------------------------------------------------------------------------

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout_s: float = 10.0) -> bool:
        """True once the server has closed the connection (EOF or reset) within TIMEOUT_S;
        any bytes still arriving are read and dropped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    # --- handshake --------------------------------------------------------------------------

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        return flags

    def start(self, no_zeroes: bool = True) -> int:
        """Read the greeting and send the client flags; returns the server's flags."""
        flags = self.greeting()
        assert flags & FLAG_FIXED_NEWSTYLE
        cflags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)
        self.send(struct.pack(">I", cflags))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, rtype, self.recv_exact(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send OPTION; return every (reply type, data) up to and including the final ACK or
        error reply."""
        self.send_option(option, data)
        replies = []
        while True:
            opt, rtype, payload = self.read_option_reply()
            assert opt == option, (opt, option)
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & 2**31:
                return replies

    def go(self, name: str, option: int = OPT_GO) -> tuple[int, int]:
        """NBD_OPT_GO (or INFO) for NAME; returns (size, transmission flags)."""
        replies = self.option(option, info_request(name))
        assert replies[-1][0] == REP_ACK, replies
        for rtype, payload in replies:
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", payload)
                return size, tflags
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    # --- transmission -----------------------------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, handle: int = 1,
                flags: int = 0, payload: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload)

    def simple_reply(self) -> tuple[int, int]:
        """(error, handle) of a simple reply."""
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, handle

    def read(self, offset: int, length: int, handle: int = 7) -> bytes:
        """A READ with simple replies (the connection must not have structured replies)."""
        self.request(CMD_READ, offset, length, handle)
        error, got_handle = self.simple_reply()
        assert (error, got_handle) == (0, handle)
        return self.recv_exact(length)


def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_context_request(export: str, queries: tuple[str, ...]) -> bytes:
    raw = export.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def wait_for_log(server_log, needle: str, timeout_s: float = 10.0) -> str:
    """Poll SERVER_LOG() until NEEDLE appears; returns the log (the caller asserts)."""
    deadline = time.monotonic() + timeout_s
    text = server_log()
    while needle not in text and time.monotonic() < deadline:
        time.sleep(0.02)
        text = server_log()
    return text


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
