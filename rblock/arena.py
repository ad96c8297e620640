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
LARGE_MESSAGE_BYTES = 64 * 1024  # a message this big is received into an arena it ends
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
    """Receive buffer of one connection. `limit` is where receives stop: the end of the
    buffer, or, while a large message (LARGE_MESSAGE_BYTES and more) is being received, the
    end of that message. A large message thus ends exactly where its receive buffer does,
    and the next message starts in a fresh arena (sized like the last large one), so no
    part of a large message is ever copied from one arena into the next. (Before, the
    start of the next 1 MiB write arrived behind the current one and was copied into a
    fresh arena: a memmove of up to 1 MiB per write, 10% of both nodes' CPU in a
    replicated 1 MiB write workload.) Costs one extra receive call per large message."""

    def __init__(self, size_bytes: int = ARENA_BYTES):
        self.buf = bytearray(size_bytes)
        self.start = 0  # first unparsed byte
        self.end = 0  # end of received bytes
        self.limit = size_bytes  # receives stop here
        self._message_end = False  # limit is the end of a large message
        self._last_large_bytes = 0  # size of the last large message

    def writable(self) -> memoryview:
        """Where the next receive goes (for BufferedProtocol.get_buffer)."""
        if self.end >= self.limit:
            if self._message_end:
                # A large message is all in: the next one probably is as large, give it an
                # arena of its own that it ends exactly (see reserve). The limit is its
                # expected end: if it arrives whole in one receive, it is all in here too,
                # and the one after gets a fresh arena. (Without that, a whole message in
                # one receive left the limit at the end of the buffer, the next message
                # began behind it, and most of it was then copied to a fresh arena: 1/3 of
                # replicated 1 MiB writes paid a 1 MiB memmove on each node.)
                self._move(self._last_large_bytes, self._last_large_bytes)
                self._message_end = True
            else:
                self._move(ARENA_BYTES)
        return memoryview(self.buf)[self.end:self.limit]

    def received(self, nbytes: int) -> None:
        self.end += nbytes
        assert self.end <= self.limit <= len(self.buf)

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
        pending = self.pending()
        if message_bytes >= LARGE_MESSAGE_BYTES:
            assert pending < message_bytes, "reserve is for a message not all received yet"
            if self.start + message_bytes > len(self.buf):
                self._move(message_bytes)
            self.limit = self.start + message_bytes
            self._message_end = True
            self._last_large_bytes = message_bytes
            return
        if self._message_end and self.end >= self.limit:
            return  # a large message ended here: writable() starts the next arena
        self._message_end = False
        need = max(ARENA_SPACE_MIN_BYTES, message_bytes - pending)
        if self.limit - self.end >= need:
            return
        if len(self.buf) - self.end >= need:
            self.limit = len(self.buf)  # the limit was sized for a large message that did not come
            return
        self._move(pending + need)

    def _move(self, size_bytes: int, limit_bytes: int | None = None) -> None:
        """Continue in a fresh arena of at least SIZE_BYTES, taking the unparsed bytes along;
        receives stop at LIMIT_BYTES (default: the end of the arena)."""
        pending = self.pending()
        fresh = _pool.get(max(size_bytes, pending + ARENA_SPACE_MIN_BYTES))
        if pending:
            fresh[:pending] = memoryview(self.buf)[self.start:self.end]  # one copy, no slice
        _pool.put(self.buf)
        self.buf, self.start, self.end = fresh, 0, pending
        self.limit = len(fresh) if limit_bytes is None else \
            min(len(fresh), max(limit_bytes, pending + ARENA_SPACE_MIN_BYTES))
        self._message_end = False

    def reset_with(self, data: bytes) -> None:
        self.buf = bytearray(max(ARENA_BYTES, len(data) + ARENA_SPACE_MIN_BYTES))
        self.buf[:len(data)] = data
        self.start, self.end = 0, len(data)
        self.limit = len(self.buf)
        self._message_end = False
