"""Transmission-phase rules, pure: what a request may do and how each answer is encoded.

The asyncio shell (nbd/server.py) parses a request header, asks `check_request` whether the
request is valid for this export and connection, runs it against the BlockDevice, and turns
the outcome into bytes with the `*_reply` helpers here. Keeping the rules out of the shell
lets hypothesis and a simulator exercise them without sockets.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from rblock.nbd import proto as p
from rblock.store.device import Capabilities

PAYLOAD_MAX_BYTES = 32 * 1024 * 1024  # largest READ/WRITE; a bigger WRITE payload closes
BLOCK_PREFERRED_BYTES = 4096

# The error values the protocol defines; any other errno is reported as EIO.
NBD_ERRNOS = frozenset({p.EPERM, p.EIO, p.ENOMEM, p.EINVAL, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP,
                        p.ESHUTDOWN})
assert errno.ENOTSUP == p.ENOTSUP and errno.ENOSPC == p.ENOSPC  # Linux numbering


@dataclass(frozen=True, slots=True)
class Session:
    """What the handshake settled for one connection."""

    size_bytes: int
    caps: Capabilities
    structured_replies: bool
    base_allocation_id: int | None


class RequestError(Exception):
    """The request is refused with an NBD error; the connection carries on."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.err = err


_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
_RANGED = (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE,
           p.CMD_BLOCK_STATUS)
# command -> capability that must be true for the command to be accepted
_NEEDS_CAP = {
    p.CMD_FLUSH: "can_flush",
    p.CMD_TRIM: "can_trim",
    p.CMD_WRITE_ZEROES: "can_zero",
    p.CMD_CACHE: "can_cache",
}


def transmission_flags(caps: Capabilities) -> int:
    f = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_DF
    if caps.read_only:
        f |= p.TFLAG_READ_ONLY
    if caps.can_flush:
        f |= p.TFLAG_SEND_FLUSH
    if caps.can_fua:
        f |= p.TFLAG_SEND_FUA
    if caps.can_trim and not caps.read_only:
        f |= p.TFLAG_SEND_TRIM
    if caps.can_zero and not caps.read_only:
        f |= p.TFLAG_SEND_WRITE_ZEROES
        if caps.can_fast_zero:
            f |= p.TFLAG_SEND_FAST_ZERO
    if caps.can_cache:
        f |= p.TFLAG_SEND_CACHE
    if caps.can_multi_conn:
        f |= p.TFLAG_CAN_MULTI_CONN
    return f


def check_request(req: p.Request, s: Session) -> None:
    """Raise RequestError if REQ must be refused. Framing problems are the caller's. (The
    server accepts the common WRITE, no flag but FUA, in range, on a writable export, in
    its receive loop without calling this: nbd/server.py `_process`.)"""
    allowed = p.CMD_FLAGS_ALLOWED.get(req.type)
    if allowed is None:
        raise RequestError(p.EINVAL, f"unknown command {req.type}")
    if req.flags & ~allowed:
        raise RequestError(p.EINVAL, f"flags 0x{req.flags & ~allowed:x} not valid for {req.name}")
    if req.flags & p.CMD_FLAG_DF and not s.structured_replies:
        raise RequestError(p.EINVAL, "DF needs structured replies")
    cap = _NEEDS_CAP.get(req.type)
    if cap and not getattr(s.caps, cap):
        raise RequestError(p.EINVAL, f"{req.name} is not supported by this export")
    if req.type in _WRITES and s.caps.read_only:
        raise RequestError(p.EPERM, "export is read-only")
    if req.type in _RANGED and req.offset + req.length > s.size_bytes:
        err = p.ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
        raise RequestError(err, f"{req.name} of {req.length} bytes at {req.offset} is past the "
                                f"end of the export ({s.size_bytes} bytes)")
    if req.type == p.CMD_READ and req.length > PAYLOAD_MAX_BYTES:
        raise RequestError(p.EINVAL, f"READ of {req.length} bytes is over the "
                                     f"{PAYLOAD_MAX_BYTES}-byte maximum")
    if req.type == p.CMD_BLOCK_STATUS:
        if s.base_allocation_id is None:
            raise RequestError(p.EINVAL, "BLOCK_STATUS needs a negotiated meta context")
        if req.length == 0:
            raise RequestError(p.EINVAL, "BLOCK_STATUS of length 0")
    if req.flags & p.CMD_FLAG_FAST_ZERO and not s.caps.can_fast_zero:
        raise RequestError(p.ENOTSUP, "this export cannot zero fast")


def nbd_errno(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    if err in (errno.EFBIG, errno.EDQUOT):
        return p.ENOSPC  # proto.md: out-of-space conditions are reported as ENOSPC
    return err if err in NBD_ERRNOS else p.EIO


def error_reply(handle: int, err: int, message: str, structured: bool) -> bytes:
    if structured:
        return p.chunk_error(handle, err, message)
    return p.simple_reply(handle, err)


def read_reply(handle: int, offset: int, pieces: list[tuple[int, bytes | int]],
               structured: bool) -> list[bytes]:
    """Encode a READ answer. PIECES are (offset, data) or (offset, hole length), in order,
    covering the request; simple replies get holes as zero bytes."""
    if not structured:
        out = [p.simple_reply(handle)]
        out += [d if isinstance(d, bytes) else bytes(d) for _, d in pieces]
        return out
    if not pieces:
        return [p.chunk_none(handle)]
    out = []
    last = len(pieces) - 1
    for i, (off, d) in enumerate(pieces):
        if isinstance(d, int):
            out.append(p.chunk_offset_hole(handle, off, d, i == last))
        else:
            out += [p.chunk_offset_data_header(handle, off, len(d), i == last), d]
    return out
