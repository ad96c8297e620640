"""The peer link's frames: a versioned, CRC-32C protected framing. No I/O here.

Every frame is a fixed 36-byte header, a payload, and a CRC-32C (hardware, the `crc32c`
package) over header and payload:

    magic u32 | type u16 | flags u16 | payload length u32 | id u64 | offset u64 | aux u64
    payload (length bytes) | crc32c u32

`id` is the write sequence number or a request id, `offset` a byte offset on the disk, `aux`
a per-type number (epoch, length, errno). Control frames (HELLO, STATE, ...) carry JSON. A
frame whose CRC does not match, or whose magic is wrong, is a `LinkError`: the receiver drops
the connection without acting on it, so a corrupted write never reaches a disk (the primary
then marks the write out of sync, and resync repairs it).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

import crc32c

MAGIC = 0x52424C31  # "RBL1"
PROTOCOL_VERSION = 2  # 2: OUT_OF_SYNC, VERIFY_START, VERIFY_DONE; FLUSH_ACK carries an errno
HEADER = struct.Struct(">IHHIQQQ")
CRC = struct.Struct(">I")
FRAME_OVERHEAD_BYTES = HEADER.size + CRC.size
PAYLOAD_MAX_BYTES = 32 * 1024 * 1024 + 4096  # largest NBD write plus room for control data
JSON_PAYLOAD_MAX_BYTES = 1024 * 1024

FLAG_FUA = 1 << 0  # DATA/TRIM/ZEROES: durable on the peer before it acks
FLAG_LAST = 1 << 1  # BITMAP: last chunk
FLAG_NO_HOLE = 1 << 2  # ZEROES: allocate, do not punch


class T(enum.IntEnum):
    """Frame types."""

    HELLO = 1  # json: version, node, resource, size_bytes, challenge
    AUTH = 2  # payload: HMAC of the peer's challenge
    AUTH_OK = 3
    REFUSE = 4  # json: reason
    STATE = 5  # json: role, disk, generation UUIDs, flags
    BITMAP = 6  # offset: byte offset in the bitmap; payload: bitmap bytes
    DATA = 10  # id: seq, offset, aux: epoch, payload: data
    TRIM = 11  # id: seq, offset, aux: epoch, payload: u64 length
    ZEROES = 12  # id: seq, offset, aux: epoch, payload: u64 length
    WRITE_ACK = 13  # id: first seq, aux: how many seqs from id on (0 reads as 1): applied
    RECV_ACK = 14  # id: seq (protocol B: received by the peer)
    NEG_ACK = 15  # id: seq, aux: errno (the peer could not apply it)
    FLUSH = 16  # id: flush id, aux: epoch
    FLUSH_ACK = 17  # id: flush id, aux: 0, or the errno of the peer's failed flush
    RS_REQUEST = 20  # id, offset, aux: length, payload: u32 crc32c of the target's data
    RS_DATA = 21  # id, offset, payload: data
    RS_SAME = 22  # id, offset, aux: length (checksums matched: nothing to copy)
    READ_REQUEST = 23  # id, offset, aux: length
    READ_REPLY = 24  # id, offset, payload: data
    READ_ERROR = 25  # id, aux: errno
    VERIFY_REQUEST = 26  # id, offset, aux: length, payload: u32 crc32c
    VERIFY_REPLY = 27  # id, offset, aux: 1 same, 0 different; payload: u64 length
    SYNC_DONE = 28  # json: the source's generation UUIDs
    INVALIDATE = 29  # json: the sender's STATE; it invalidated its disk and is now SyncTarget
    PING = 30
    PONG = 31
    DISCONNECT = 32  # json: reason
    OUT_OF_SYNC = 33  # offset, aux: length (the sender's disk could not write it)
    VERIFY_START = 34  # json: {} (a Secondary asks its Primary to run a verify)
    VERIFY_DONE = 35  # json: outcome (the verify source finished)


class LinkError(Exception):
    """The peer broke framing or sent a corrupted frame: drop the connection."""


@dataclass(slots=True)
class Frame:
    type: T
    flags: int = 0
    id: int = 0
    offset: int = 0
    aux: int = 0
    payload: bytes | memoryview = b""

    def json(self) -> dict:
        try:
            obj = json.loads(bytes(self.payload))
        except ValueError as e:
            raise LinkError(f"{self.type.name} frame holds bad JSON: {e}") from None
        if not isinstance(obj, dict):
            raise LinkError(f"{self.type.name} frame holds {type(obj).__name__}, not an object")
        return obj

    def u64(self) -> int:
        if len(self.payload) != 8:
            raise LinkError(f"{self.type.name} frame needs an 8-byte payload")
        return struct.unpack(">Q", self.payload)[0]

    def u32(self) -> int:
        if len(self.payload) != 4:
            raise LinkError(f"{self.type.name} frame needs a 4-byte payload")
        return struct.unpack(">I", self.payload)[0]


def encode(f: Frame) -> list[bytes | memoryview]:
    """Buffers to send (header, payload, crc); the payload is not copied."""
    return encode_fields(f.type, f.flags, f.id, f.offset, f.aux, f.payload)


def encode_fields(t: int, flags: int, fid: int, offset: int, aux: int,
                  payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """`encode` without building a Frame first (the write path's frames)."""
    n = len(payload)
    assert n <= PAYLOAD_MAX_BYTES, n
    header = _pack_header(MAGIC, t, flags, n, fid, offset, aux)
    if n:
        return [header, payload, _pack_crc(_crc(payload, _crc(header)))]
    return [header + _pack_crc(_crc(header))]


def encode_json(t: T, obj: dict, **fields: int) -> list[bytes | memoryview]:
    return encode(Frame(t, payload=json.dumps(obj, sort_keys=True).encode(), **fields))


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def frame_size(buf: bytes | bytearray | memoryview, pos: int, end: int) -> int | None:
    """Total size of the frame at POS once its header is in; None before that."""
    if end - pos < HEADER.size:
        return None
    magic, t, flags, n = struct.unpack_from(">IHHI", buf, pos)
    if magic != MAGIC:
        raise LinkError(f"bad frame magic 0x{magic:08x}")
    if n > PAYLOAD_MAX_BYTES:
        raise LinkError(f"frame payload of {n} bytes is over the {PAYLOAD_MAX_BYTES}-byte limit")
    return HEADER.size + n + CRC.size


def decode(buf: bytes | bytearray | memoryview, pos: int, end: int,
           view: memoryview | None = None) -> tuple[Frame, int] | None:
    """Decode the frame at POS if all of it is in BUF[:END]; returns it and the next position.
    The payload is a memoryview of BUF (no copy); VIEW, if given, is memoryview(BUF), so
    that a caller decoding many frames from one buffer makes it once."""
    if end - pos < _HEADER_SIZE:
        return None
    magic, t, flags, n, fid, offset, aux = _unpack_header(buf, pos)
    if magic != MAGIC:
        raise LinkError(f"bad frame magic 0x{magic:08x}")
    if n > PAYLOAD_MAX_BYTES:
        raise LinkError(f"frame payload of {n} bytes is over the {PAYLOAD_MAX_BYTES}-byte limit")
    body_end = pos + _HEADER_SIZE + n
    if end < body_end + _CRC_SIZE:
        return None
    if view is None:
        view = memoryview(buf)
    (crc,) = _unpack_crc(buf, body_end)
    actual = _crc(view[pos:body_end])
    if crc != actual:
        raise LinkError(f"CRC-32C mismatch on a frame of type {t} (0x{crc:08x} != 0x{actual:08x})")
    ftype = _TYPES.get(t)
    if ftype is None:
        raise LinkError(f"unknown frame type {t}")
    return (Frame(ftype, flags, fid, offset, aux, view[pos + _HEADER_SIZE:body_end]),
            body_end + _CRC_SIZE)


# Bound methods and constants looked up once: the write path encodes and decodes a frame
# per write on both nodes.
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_pack_crc = CRC.pack
_unpack_crc = CRC.unpack_from
_crc = crc32c.crc32c
_HEADER_SIZE = HEADER.size
_CRC_SIZE = CRC.size
_TYPES = {int(t): t for t in T}  # T(t) costs an enum lookup with exception handling
