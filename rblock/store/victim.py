"""What a split-brain victim loses, kept: before a resync that resolves a split brain (by
`connect --discard-my-data` or an after-sb policy) overwrites a block of the victim's disk,
the block's old content goes to a sparse snapshot file beside the disk. No anchor does this:
DRBD, Ganeti and HAST throw the loser's writes away.

Files, beside the backing disk DISK (for a block device: beside its metadata file, since
/dev is in memory; `snapshot_dir`):

    DISK.splitbrain-N.img    sparse, the disk's size: each saved block at its own offset;
                             a block that was never saved is a hole
    DISK.splitbrain-N.json   the index: id, resource, node, peer, the decision, when, the
                             victim's generation, whether the resync finished

Which blocks were saved is the image's allocated data (SEEK_DATA / SEEK_HOLE): a saved block
is written with pwrite, which allocates it even when it holds zeroes. So there is nothing
more to keep per write, and a crash cannot leave the index and the saved blocks apart.

Each save is durable (fdatasync of the image) before the overwrite is issued: the old content
is never lost to a power cut in between. The saves run synchronously, on the event loop:
a split-brain resync is rare and slow anyway; the hot path without one is untouched.

`export` writes the victim's disk as it was: saved blocks from the image, every other block
from the disk as it is now (those were not overwritten by the resync; guest writes since then
may have changed them on both nodes).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from rblock.store.device import BlockDevice, FilterDevice

BLOCK = 4096
EXPORT_CHUNK = 1 << 20
SAVE_CHUNK = 1 << 20


def snapshot_dir(disk: Path, meta: Path) -> Path | None:
    """Where DISK's snapshots go: None (beside it), or for a block device its metadata's
    directory."""
    try:
        return meta.parent if stat.S_ISBLK(os.stat(disk).st_mode) else None
    except OSError:
        return None


def _paths(disk: Path, sid: int, where: Path | None = None) -> tuple[Path, Path]:
    d = where or disk.parent
    return (d / f"{disk.name}.splitbrain-{sid}.img", d / f"{disk.name}.splitbrain-{sid}.json")


def list_snapshots(disk: Path, where: Path | None = None) -> list[dict]:
    """The index of every snapshot of DISK, oldest first, with the bytes saved."""
    out = []
    for p in sorted((where or disk.parent).glob(f"{disk.name}.splitbrain-*.json")):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        img = _paths(disk, int(info["id"]), where)[0]
        info["saved_bytes"] = sum(n for _o, n in data_extents(img)) if img.exists() else 0
        info["image"] = str(img)
        out.append(info)
    return sorted(out, key=lambda i: int(i["id"]))


def unfinished(disk: Path, resource: str, where: Path | None = None) -> dict | None:
    """The snapshot of a split-brain resync of RESOURCE that has not finished (it goes on
    after a restart, and so does saving)."""
    for info in list_snapshots(disk, where):
        if info.get("resource") == resource and not info.get("finished"):
            return info
    return None


def data_extents(img: Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated data in IMG."""
    fd = os.open(img, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            pos = end
    finally:
        os.close(fd)


class VictimSnapshot:
    """An open snapshot: saves blocks before they are overwritten."""

    def __init__(self, disk: Path, info: dict, size_bytes: int,
                 where: Path | None = None) -> None:
        self.disk = disk
        self.info = info
        self.img, self.index = _paths(disk, int(info["id"]), where)
        self.fd = os.open(self.img, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size_bytes)
        self.saved = bytearray((size_bytes // BLOCK + 7) // 8)
        for off, n in data_extents(self.img):
            for b in range(off // BLOCK, (off + n + BLOCK - 1) // BLOCK):
                self.saved[b >> 3] |= 1 << (b & 7)

    @classmethod
    def create(cls, disk: Path, size_bytes: int, where: Path | None = None,
               **info: object) -> VictimSnapshot:
        ids = [int(i["id"]) for i in list_snapshots(disk, where)]
        sid = max(ids, default=0) + 1
        info = {"id": sid, "created": time.time(), "finished": False, **info}
        snap = cls(disk, info, size_bytes, where)
        snap._write_index()
        return snap

    def _write_index(self) -> None:
        tmp = self.index.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.info, indent=1, sort_keys=True))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.index)
        dfd = os.open(self.index.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def save(self, disk_fd: int, offset: int, length: int) -> None:
        """Copy the blocks of [offset, offset + length) not saved yet from DISK_FD, durably."""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        todo = [b for b in range(first, last + 1) if not self.saved[b >> 3] >> (b & 7) & 1]
        if not todo:
            return
        run_start = prev = todo[0]
        for b in [*todo[1:], None]:
            if b is not None and b == prev + 1:
                prev = b
                continue
            self._copy(disk_fd, run_start * BLOCK, (prev - run_start + 1) * BLOCK)
            if b is not None:
                run_start = prev = b
        os.fdatasync(self.fd)
        for b in todo:
            self.saved[b >> 3] |= 1 << (b & 7)

    def _copy(self, disk_fd: int, offset: int, length: int) -> None:
        """Copy [offset, offset + length) of the disk into the image, a chunk at a time
        (a guest's TRIM may span gigabytes); short reads and writes are retried, a read
        that ends before the disk does is an error (never saved as zeroes)."""
        end = offset + length
        pos = offset
        while pos < end:
            n = min(SAVE_CHUNK, end - pos)
            data = os.pread(disk_fd, n, pos)
            if len(data) < n:
                size = os.fstat(disk_fd).st_size if stat.S_ISREG(os.fstat(disk_fd).st_mode) \
                    else end
                if pos + len(data) < min(end, size):
                    raise OSError(errno.EIO, f"short read of the disk at {pos + len(data)}")
                data += bytes(n - len(data))  # past the end of a regular file: zeroes
            view = memoryview(data)
            done = 0
            while done < n:
                done += os.pwrite(self.fd, view[done:], pos + done)
            pos += n

    def finish(self) -> None:
        self.info["finished"] = True
        self.info["finished_at"] = time.time()
        self._write_index()
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SavingDevice(FilterDevice):
    """The victim's disk during a split-brain resync: every write first saves what it
    overwrites (VictimSnapshot.save), then goes to the disk."""

    def __init__(self, inner: BlockDevice, fd: int, snap: VictimSnapshot) -> None:
        super().__init__(inner, "saving split-brain victim blocks")
        self._fd = fd
        self.snap = snap

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.snap.save(self._fd, offset, len(data))
        await self.inner.write(offset, data, fua)

    def write_inline(self, offset: int, data: memoryview) -> None:
        self.snap.save(self._fd, offset, len(data))
        self.inner.write_inline(offset, data)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self.snap.save(self._fd, offset, length)
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        self.snap.save(self._fd, offset, length)
        await self.inner.write_zeroes(offset, length, fua, may_punch, fast_only)

    async def close(self) -> None:
        self.snap.close()
        await self.inner.close()


def export(disk: Path, sid: int, out: Path, where: Path | None = None) -> int:
    """Write the victim's disk as it was before the resync to OUT; the bytes written."""
    img, index = _paths(disk, sid, where)
    if not index.exists():
        raise FileNotFoundError(f"no split-brain snapshot {sid} beside {disk}")
    saved = list(data_extents(img))
    with open(disk, "rb") as f:
        size = f.seek(0, os.SEEK_END)  # (a block device's size too)
    with open(disk, "rb") as src, open(img, "rb") as snap, open(out, "wb") as dst:
        pos = 0
        while pos < size:
            n = min(EXPORT_CHUNK, size - pos)
            dst.write(src.read(n))
            pos += n
        for off, n in saved:
            snap.seek(off)
            dst.seek(off)
            dst.write(snap.read(min(n, size - off)))
        dst.flush()
        os.fsync(dst.fileno())
    return size


def drop(disk: Path, sid: int, where: Path | None = None) -> None:
    img, index = _paths(disk, sid, where)
    if not index.exists():
        raise FileNotFoundError(f"no split-brain snapshot {sid} beside {disk}")
    img.unlink(missing_ok=True)
    index.unlink()
