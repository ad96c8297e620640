"""The one interface between the NBD layer and what it serves.

A local volume (`volume.FileVolume`) and, later, the replicated device implement it, so
`rblock serve FILE` and a replicated resource share every line of NBD code. Methods are
coroutines; the NBD server starts them eagerly (`rblock.aio.run_eager`), so an operation
that finishes without waiting costs no task switch. WRITE, the one command that is hot on
every device, enters through `start_write`, a callback interface a device may implement
without any coroutine (the replicated device does: its writes complete on the peer's ack).

Errors: raise `DeviceError` (or let an `OSError` escape); its errno is sent to the client
(EIO for anything the protocol has no value for) with the message in a structured error.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rblock.aio import run_eager

STATE_HOLE = 1  # base:allocation extent flags, as in the NBD protocol
STATE_ZERO = 2


# done(token, None) once a write completed, done(token, exc) if it failed.
WriteDone = Callable[[Any, BaseException | None], None]


class DeviceError(OSError):
    """An operation failed; `errno` says how, the message says what and why."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)


@dataclass(frozen=True, slots=True)
class Capabilities:
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_extents: bool = True
    # True only if a flush on any connection makes every completed write durable: the
    # device must not keep per-connection write caches.
    can_multi_conn: bool = True


class BlockDevice(abc.ABC):
    size_bytes: int
    capabilities: Capabilities
    description: str = ""

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """LENGTH bytes at OFFSET (the caller checked the range)."""

    @abc.abstractmethod
    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Write DATA at OFFSET; with FUA, durable before returning. DATA is the caller's
        buffer and is only valid until this returns."""

    def start_write(self, offset: int, data: memoryview, fua: bool, done: WriteDone,
                    token: object) -> None:
        """`write`, as a callback: starts it now and calls done(token, None) once it has
        completed or done(token, exc) if it failed, possibly before returning. DATA stays
        valid until DONE is called. The NBD server starts every WRITE here; this default
        runs `write` eagerly."""
        try:
            coro = self.write(offset, data, fua)
        except Exception as exc:  # noqa: BLE001 -- a write() that is a plain function raising
            done(token, exc)
            return
        run_eager(coro, lambda _result, exc: done(token, exc))

    def write_inline(self, offset: int, data: memoryview) -> None:
        """A write without FUA, done before returning (into the page cache): the replicated
        device's fast path writes this way on both nodes. Raises OSError. A device that
        cannot write without waiting does not offer it (and cannot carry a resource)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write inline")

    async def read_once(self, offset: int, length: int) -> bytes | bytearray:
        """`read` for a one-pass sweep over the disk (resync, verify): a device may keep
        what it reads out of its caches."""
        return await self.read(offset, length)

    @abc.abstractmethod
    async def flush(self) -> None:
        """Every write that completed before this call is durable when it returns."""

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Advise that the range is unused; it may read back as zeroes afterwards."""

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        """Zero the range. MAY_PUNCH allows deallocating it; FAST_ONLY fails with ENOTSUP
        instead of writing zeroes the slow way."""

    async def cache(self, offset: int, length: int) -> None:  # noqa: B027 -- optional hook
        """Prefetch the range (advisory)."""

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from OFFSET covering at least one byte."""
        return [(length, 0)]

    async def close(self) -> None:  # noqa: B027 -- optional hook
        """Finish in-flight work, flush, release resources."""


class FilterDevice(BlockDevice):
    """A device stacked over INNER that passes every operation through: a filter (fault
    injection, a split-brain victim's saving) overrides only what it changes."""

    def __init__(self, inner: BlockDevice, what: str) -> None:
        self.inner = inner
        self.size_bytes = inner.size_bytes
        self.capabilities = inner.capabilities
        self.description = f"{inner.description} ({what})"

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def read_once(self, offset: int, length: int) -> bytes | bytearray:
        return await self.inner.read_once(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self.inner.write(offset, data, fua)

    def write_inline(self, offset: int, data: memoryview) -> None:
        self.inner.write_inline(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        await self.inner.write_zeroes(offset, length, fua, may_punch, fast_only)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.extents(offset, length)

    async def close(self) -> None:
        await self.inner.close()


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))
