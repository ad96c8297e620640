"""A local raw volume (regular file or block device) as a BlockDevice.

Small I/O runs inline on the event loop: a page-cache pread/pwrite of a few KiB takes a few
microseconds, less than a hop to a thread. Large I/O and everything that waits for the disk
(fdatasync, RWF_DSYNC writes, fallocate) runs in a small thread pool, so the loop keeps
receiving while the kernel copies and the GIL is released.

Durability: a FLUSH makes every write that completed before it durable, whichever connection
sent it, because all connections share this one file descriptor (multi-conn safe).
Concurrent flushes share one fdatasync (`GroupSync`).

Exclusive use: like DRBD, which opens its backing device exclusively ("device is attached"),
a volume is opened so that a second user is refused rather than writing under the first: a
block device with O_EXCL (the kernel refuses a second O_EXCL open, and one of a mounted
device), a regular file with a flock (LOCK_EX; LOCK_SH when read-only, so read-only users
may share a file nobody writes; O_EXCL has no shared form, so they cannot share a device).
The metadata file takes the same kind of lock (`metadata.FdFile`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
from concurrent.futures import ThreadPoolExecutor

from rblock.store.device import (
    STATE_HOLE,
    STATE_ZERO,
    BlockDevice,
    Capabilities,
    DeviceError,
    WriteDone,
)

INLINE_IO_BYTES_MAX = 64 * 1024  # larger reads/writes go to the thread pool
# start_write (the NBD server's WRITE) copies a write without FUA up to this size into the
# page cache on the event loop, as the replicated nodes do (replica/core_common.py,
# INLINE_WRITE_BYTES_MAX): 1 MiB writes QD8 went from 2.5-2.6k to 4.2k IOPS in
# benchmarks/run.py (the pool's hand-off costs more than the ~0.1 ms/MiB the loop stalls).
INLINE_START_WRITE_BYTES_MAX = 4 * 1024 * 1024
IO_THREADS_MAX = 4
ZERO_CHUNK_BYTES = 1024 * 1024  # slow-path zeroing writes this much per call
EXTENTS_MAX = 1024  # extents per BLOCK_STATUS answer; the client asks again for the rest

# preadv2 flag (Linux 6.14+): pages this read brings into the page cache are dropped once
# it is done, pages that were cached before stay. Not in Python 3.11's os module.
RWF_DONTCACHE = 0x80

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


LOCK_HOLDER_CMDLINE_CHARS_MAX = 160  # of the holder's command line, in an error message
PROC_LOCKS_BYTES_MAX = 4 * 1024 * 1024  # read of /proc/locks when naming a lock's holder


class VolumeInUse(DeviceError):
    """The backing file or device is opened exclusively by someone else; errno EBUSY."""

    def __init__(self, message: str):
        super().__init__(errno.EBUSY, message)


def try_flock(fd: int, shared: bool) -> bool:
    """Take a flock on FD without waiting: True if taken, False if someone holds a
    conflicting one. flock locks belong to the open file description: a second open of the
    same file, even in this process, conflicts; the lock goes with the last close."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def in_use_message(fd: int, subject: str, hint: str) -> str:
    """The error for a flock on FD's file that someone else holds: SUBJECT ("metadata
    PATH") "is in use by" whom, from /proc/locks (the pid that took the lock) and that
    process's command line, then HINT (what to stop). A holder in this same process is a
    file given twice (two resources or exports on one file), and is reported as that."""
    pid = _flock_holder_pid(fd)
    if pid is None:
        return f"{subject} is in use by another process ({hint})"
    if pid == os.getpid():
        return (f"{subject} is already open in this process (pid {pid}): is the same file "
                "given twice? give each resource or export its own file")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(LOCK_HOLDER_CMDLINE_CHARS_MAX + 1)
    except OSError:
        raw = b""
    cmd = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    if len(cmd) > LOCK_HOLDER_CMDLINE_CHARS_MAX:
        cmd = cmd[:LOCK_HOLDER_CMDLINE_CHARS_MAX] + "..."
    who = f"pid {pid}: {cmd}" if cmd else f"pid {pid}"
    return f"{subject} is in use by another process ({who}) ({hint})"


def _flock_holder_pid(fd: int) -> int | None:
    """The pid that took a flock on FD's file (per /proc/locks), or None if not found."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(PROC_LOCKS_BYTES_MAX).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 7739 fe:00:2146354 0 EOF"; waiters have "->" at [1].
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


class GroupSync:
    """One fdatasync serves every caller waiting for it (group commit).

    A caller arriving while a sync runs cannot join it: that sync may have started before
    the caller's writes completed. It waits for the next one, which all late callers share.
    """

    def __init__(self, fd: int, executor: ThreadPoolExecutor):
        self._fd = fd
        self._executor = executor
        self._running: asyncio.Future | None = None
        self._next: asyncio.Future | None = None
        self.syncs = 0  # fdatasync calls made, for tests and status

    def sync(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._running is None:
            self._running = self._launch(loop)
            return self._running
        if self._next is None:
            self._next = loop.create_future()
        return self._next

    def _launch(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self.syncs += 1
        fut = loop.run_in_executor(self._executor, os.fdatasync, self._fd)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, fut: asyncio.Future) -> None:
        self._running = None
        waiter, self._next = self._next, None
        if waiter is None:
            return
        self._running = self._launch(asyncio.get_running_loop())
        self._running.add_done_callback(lambda f: _copy_outcome(f, waiter))


def _copy_outcome(src: asyncio.Future, dst: asyncio.Future) -> None:
    if dst.done():
        return
    if src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(None)


class FileVolume(BlockDevice):
    def __init__(self, path: str, read_only: bool = False, exclusive: bool = True):
        """Open PATH (a regular file or a block device). EXCLUSIVE (the default: both
        `rblock serve` and a node's daemon want it) refuses, with VolumeInUse, a file or
        device someone else has open the same way, or a mounted device; pass False only
        for a reader that knows it may share (a tool looking at a stopped node's disk)."""
        self.path = path
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        # O_EXCL without O_CREAT means "exclusive" only for a block device (Linux); it is
        # passed only when the path is one, and fstat below checks it still is.
        block = exclusive and stat.S_ISBLK(os.stat(path).st_mode)
        try:
            self.fd = os.open(path, flags | (os.O_EXCL if block else 0))
        except OSError as e:
            if block and e.errno == errno.EBUSY:
                raise VolumeInUse(
                    f"block device {path} is in use (mounted, held by md/LVM/device-mapper, "
                    "or opened by another process: is `rblock up` or `rblock serve` running "
                    "with it?): stop that first") from None
            raise
        try:
            st = os.fstat(self.fd)
            if exclusive and stat.S_ISBLK(st.st_mode) != block:
                raise DeviceError(errno.EAGAIN, f"{path} changed from or to a block device "
                                  "while being opened: retry")
            if exclusive and not block and not try_flock(self.fd, shared=read_only):
                raise VolumeInUse(in_use_message(
                    self.fd, path, "is `rblock up` or `rblock serve` running with it? stop "
                    "it first"))
        except BaseException:
            os.close(self.fd)
            raise
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size_bytes = os.lseek(self.fd, 0, os.SEEK_END)
        self.capabilities = Capabilities(read_only=read_only)
        self.description = f"{'block device' if self.is_block_device else 'raw file'} {path}"
        self._executor = ThreadPoolExecutor(IO_THREADS_MAX, thread_name_prefix="rblock-io")
        self._group_sync = GroupSync(self.fd, self._executor)
        self._seek_data_works = True

    # --- reads and writes ---------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if length <= INLINE_IO_BYTES_MAX:
            data = os.pread(self.fd, length, offset)
        else:
            data = await asyncio.get_running_loop().run_in_executor(
                self._executor, os.pread, self.fd, length, offset)
        if len(data) != length:
            raise DeviceError(errno.EIO, f"short read at {offset}: the backing file shrank")
        return data

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if fua:
            # RWF_DSYNC makes just this write durable, without syncing the whole file.
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _pwrite_all, self.fd, data, offset, os.RWF_DSYNC)
        elif len(data) <= INLINE_IO_BYTES_MAX:
            _pwrite_all(self.fd, data, offset, 0)
        else:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _pwrite_all, self.fd, data, offset, 0)

    async def read_once(self, offset: int, length: int) -> bytes | bytearray:
        """`read` for a one-pass sweep over the disk (resync, verify): what it brings into
        the page cache does not stay there. Measured on ext4 (Linux 6.18): after a plain
        read of a whole sparse image the page cache holds large folios of zeroes, and every
        later 4 KiB guest write into one of them costs 2-3x the CPU (ext4_block_write_begin
        walks the folio); a two-node cluster's first full sync did exactly that to both
        disks. Where RWF_DONTCACHE is unsupported (older kernels, which also lack ext4's
        large folios) this is a plain read."""
        if length <= INLINE_IO_BYTES_MAX:
            data = _pread_once(self.fd, length, offset)
        else:
            data = await asyncio.get_running_loop().run_in_executor(
                self._executor, _pread_once, self.fd, length, offset)
        if len(data) != length:
            raise DeviceError(errno.EIO, f"short read at {offset}: the backing file shrank")
        return data

    def start_write(self, offset: int, data: memoryview, fua: bool, done: WriteDone,
                    token: object) -> None:
        """The NBD server's WRITE (`rblock serve`): without FUA and up to
        INLINE_START_WRITE_BYTES_MAX, into the page cache now, on the loop, as the replicated
        nodes write theirs (no coroutine, and no thread pool for a large one); else `write`."""
        if fua or len(data) > INLINE_START_WRITE_BYTES_MAX:
            super().start_write(offset, data, fua, done, token)
            return
        try:
            self.write_inline(offset, data)
        except OSError as exc:
            done(token, exc)
            return
        done(token, None)

    def write_inline(self, offset: int, data: memoryview) -> None:
        """A write without FUA done now, on the caller's stack (the page cache takes it):
        what `write` does for a small one, minus the coroutine, and for a large one without
        the thread pool. The caller decides which writes are worth stalling the loop for."""
        n = os.pwrite(self.fd, data, offset)
        if n != len(data):  # short (rare for a regular file): the loop finishes it
            _pwrite_all(self.fd, memoryview(data)[max(n, 0):], offset + max(n, 0), 0)

    async def flush(self) -> None:
        await self._group_sync.sync()

    # --- trims, zeroes, extents -------------------------------------------------------------

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        try:
            await self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return  # trim is advisory: a volume that cannot punch simply keeps the data
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if may_punch:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                await self._fallocate(mode, offset, length)
                break
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        else:
            if fast_only:
                raise DeviceError(errno.ENOTSUP, "this volume cannot zero fast")
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _write_zeroes_slow, self.fd, offset, length)
        if fua:
            await self.flush()

    async def _fallocate(self, mode: int, offset: int, length: int) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, fallocate, self.fd, mode, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.extents_now(offset, length)

    def extents_now(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Data and hole extents from SEEK_DATA/SEEK_HOLE (two lseeks each, no I/O)."""
        assert 0 < length and offset + length <= self.size_bytes
        if not self._seek_data_works:
            return [(length, 0)]
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < EXTENTS_MAX:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: a hole to the end
                    data = end
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._seek_data_works = False  # e.g. a block device: all data
                    return out + [(end - pos, 0)]
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                out.append((stop - pos, STATE_HOLE | STATE_ZERO))
                pos = stop
                continue
            stop = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append((stop - pos, 0))
            pos = stop
        return out

    async def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self.capabilities.read_only:
                await self.flush()
        finally:
            # Even if the flush failed (a failing disk is why one detaches): a descriptor
            # left open would keep the lock, and re-attaching the disk would be refused.
            self._executor.shutdown(wait=True)
            fd, self.fd = self.fd, -1
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int, flags: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
        if n <= 0:
            raise DeviceError(errno.EIO, f"pwrite at {offset} wrote nothing")
        view = view[n:]
        offset += n


_dontcache = [True]  # RWF_DONTCACHE still believed to work (cleared at the first refusal)


def _pread_once(fd: int, length: int, offset: int) -> bytes | bytearray:
    if _dontcache[0]:
        buf = bytearray(length)
        try:
            n = os.preadv(fd, [buf], offset, RWF_DONTCACHE)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _dontcache[0] = False
        else:
            return buf if n == length else buf[:n]  # short only at the end of the file
    return os.pread(fd, length, offset)


def _write_zeroes_slow(fd: int, offset: int, length: int) -> None:
    zeroes = bytes(min(length, ZERO_CHUNK_BYTES))
    while length:
        n = min(length, len(zeroes))
        _pwrite_all(fd, memoryview(zeroes)[:n], offset, 0)
        offset += n
        length -= n


def create_image(path: str, size_bytes: int) -> None:
    """Create a sparse raw image of SIZE_BYTES, mode 0600 (it holds a guest's data: no one
    else on the host may read it); refuses (FileExistsError) to touch an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
