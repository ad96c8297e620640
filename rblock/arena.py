"""Receive arenas for asyncio BufferedProtocols: the kernel copies straight into them.

A protocol parses messages in place and hands payloads on as memoryviews of the arena. An
arena is never compacted in place, because payload views may still be in use (a write in
flight); when it runs short, the unparsed tail moves to a fresh arena and the old one lives
on until its last view is dropped. `reserve` sizes the fresh arena for the message being
received, so a 1 MiB payload arrives in one buffer.

Retired arenas are pooled and reused once no view of them is alive (a bytearray refuses to
resize while exported, which is how we tell). A fresh 1 MiB bytearray costs ~256 page faults
when the kernel first copies into it; reusing one costs nothing.
"""

from __future__ import annotations

ARENA_BYTES = 256 * 1024
ARENA_SPACE_MIN_BYTES = 16 * 1024  # below this much free space, start a new arena
POOL_BYTES_MAX = 64 * 1024 * 1024  # retired arenas kept for reuse, per process


class _Pool:
    """Retired arenas, reused once nothing references their memory any more."""

    def __init__(self) -> None:
        self.buffers: list[bytearray] = []
        self.bytes = 0

    def put(self, buf: bytearray) -> None:
        if self.bytes + len(buf) > POOL_BYTES_MAX:
            return  # let it go; the pool is bounded
        self.buffers.append(buf)
        self.bytes += len(buf)

    def get(self, size_bytes: int) -> bytearray:
        for i, buf in enumerate(self.buffers):
            if len(buf) >= size_bytes and not _exported(buf):
                del self.buffers[i]
                self.bytes -= len(buf)
                return buf
        return bytearray(_size_class(size_bytes))


def _exported(buf: bytearray) -> bool:
    """True while a memoryview of BUF is alive (resizing an exported bytearray fails).
    Shrinking first and growing back stays within the allocation: no realloc, no copy."""
    try:
        last = buf.pop()
    except BufferError:
        return True
    buf.append(last)
    return False


def _size_class(size_bytes: int) -> int:
    """Round up to a power of two so pooled arenas fit later messages of similar size."""
    return max(ARENA_BYTES, 1 << (size_bytes - 1).bit_length())


_pool = _Pool()


class Arena:
    def __init__(self, size_bytes: int = ARENA_BYTES):
        self.buf = bytearray(size_bytes)
        self.start = 0  # first unparsed byte
        self.end = 0  # end of received bytes

    def writable(self) -> memoryview:
        """Where the next receive goes (for BufferedProtocol.get_buffer)."""
        return memoryview(self.buf)[self.end:]

    def received(self, nbytes: int) -> None:
        self.end += nbytes
        assert self.end <= len(self.buf)

    def pending(self) -> int:
        return self.end - self.start

    def take(self, nbytes: int) -> memoryview:
        """The next NBYTES unparsed bytes, consumed."""
        assert nbytes <= self.pending()
        view = memoryview(self.buf)[self.start:self.start + nbytes]
        self.start += nbytes
        return view

    def take_bytes(self) -> bytes:
        """Everything unparsed, copied out and consumed (small control traffic only)."""
        data = bytes(self.buf[self.start:self.end])
        self.start = self.end = 0
        return data

    def reserve(self, message_bytes: int = 0) -> None:
        """Make sure the message that starts at `start` (MESSAGE_BYTES long, if known) fits,
        and that there is room for a useful receive."""
        need = max(ARENA_SPACE_MIN_BYTES, message_bytes - self.pending())
        if len(self.buf) - self.end >= need:
            return
        pending = self.pending()
        fresh = _pool.get(pending + need)
        fresh[:pending] = self.buf[self.start:self.end]
        _pool.put(self.buf)
        self.buf, self.start, self.end = fresh, 0, pending

    def reset_with(self, data: bytes) -> None:
        self.buf = bytearray(max(ARENA_BYTES, len(data) + ARENA_SPACE_MIN_BYTES))
        self.buf[:len(data)] = data
        self.start, self.end = 0, len(data)
