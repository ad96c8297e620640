"""A fault-injecting `BlockDevice` filter, like DRBD's fault injection and nbdkit's error
filter: stacked over a real device, it fails the chosen operations with EIO and passes
everything else through. `rblock inject-fault` puts one over a node's disk (tests use it to
fail a primary's or a secondary's disk under load)."""

from __future__ import annotations

import errno

from rblock.store.device import BlockDevice, DeviceError, FilterDevice


class FaultyDevice(FilterDevice):
    def __init__(self, inner: BlockDevice, *, reads: bool = False, writes: bool = False,
                 flushes: bool = False):
        super().__init__(inner, "fault injection")
        self.reads, self.writes, self.flushes = reads, writes, flushes

    @property
    def faults(self) -> list[str]:
        return [w for w, on in (("reads", self.reads), ("writes", self.writes),
                                ("flushes", self.flushes)) if on]

    def _fail(self, what: str, offset: int) -> DeviceError:
        return DeviceError(errno.EIO, f"injected fault: {what} at {offset} fails")

    async def read(self, offset: int, length: int) -> bytes:
        if self.reads:
            raise self._fail("read", offset)
        return await self.inner.read(offset, length)

    async def read_once(self, offset: int, length: int) -> bytes | bytearray:
        if self.reads:
            raise self._fail("read", offset)
        return await self.inner.read_once(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.writes:
            raise self._fail("write", offset)
        await self.inner.write(offset, data, fua)

    def write_inline(self, offset: int, data: memoryview) -> None:
        if self.writes:
            raise self._fail("write", offset)
        self.inner.write_inline(offset, data)

    async def flush(self) -> None:
        if self.flushes:
            raise self._fail("flush", 0)
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.writes:
            raise self._fail("trim", offset)
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        if self.writes:
            raise self._fail("write zeroes", offset)
        await self.inner.write_zeroes(offset, length, fua, may_punch, fast_only)
