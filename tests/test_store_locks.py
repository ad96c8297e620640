"""Exclusive use of a node's files: the metadata and the backing disk are locked by whoever
opens them (a second open, in this process or another, is refused with a message naming the
file and the fix); backing files are created 0600 and create-md never touches an existing
disk."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest

from rblock.store.metadata import Metadata, MetadataError
from rblock.store.volume import FileVolume, VolumeInUse, create_image

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = Path(__file__).resolve().parent.parent
HOLDER_READY_TIMEOUT_S = 30.0


@pytest.fixture
def meta(tmp_path):
    path = str(tmp_path / "r0.meta")
    Metadata.create(path, "alpha", "r0", GiB).close()
    return path


@pytest.fixture
def disk(tmp_path):
    path = str(tmp_path / "r0.img")
    create_image(path, 16 * MiB)
    return path


class Holder:
    """Another process holding a file open the way CODE does until its stdin closes."""

    def __init__(self, code: str):
        script = textwrap.dedent(code) + "\nprint('holding', flush=True)\nsys.stdin.read()\n"
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + script],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=REPO, text=True)
        line = self.proc.stdout.readline()  # the child prints only once it holds the file
        if line.strip() != "holding":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"holder failed: {line}{err}")

    def release(self) -> None:
        """Let the holder exit (closing its file) and wait for it."""
        _, err = self.proc.communicate(timeout=HOLDER_READY_TIMEOUT_S)
        assert self.proc.returncode == 0, err

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()  # reaps it and closes the pipes


def close_volume(vol: FileVolume) -> None:
    asyncio.run(vol.close())


# --- metadata ------------------------------------------------------------------------------


def test_second_open_in_the_same_process_is_refused(meta):
    """flock locks belong to the open file description: the same process opening the file
    twice conflicts like two processes do."""
    md = Metadata.open(meta, "alpha", "r0", GiB)
    for attempt in (lambda: Metadata.open(meta),
                    lambda: Metadata.create(meta, "alpha", "r0", GiB, force=True)):
        with pytest.raises(MetadataError) as e:
            attempt()
        msg = str(e.value)
        assert f"metadata {meta} is already open in this process (pid {os.getpid()})" in msg
        assert "given twice" in msg
    md.close()
    Metadata.open(meta).close()  # released by close


def test_metadata_held_by_another_process_is_neither_read_nor_written(meta):
    """The running daemon's metadata: a second `rblock up` must not recover or write it, and
    create-md --force must not wipe it (and report success) under the daemon."""
    md = Metadata.open(meta)
    md.mark_open()  # as a running daemon leaves it: not cleanly shut down
    md.bitmap.set_range(0, 64 * MiB)
    md.close()
    before = Path(meta).read_bytes()
    with Holder(f"""
        from rblock.store.metadata import Metadata
        md = Metadata.open({meta!r})
    """) as holder:
        with pytest.raises(MetadataError) as e:
            Metadata.open(meta, "alpha", "r0", GiB)
        msg = str(e.value)
        assert meta in msg and "in use by another process" in msg
        assert f"pid {holder.proc.pid}" in msg and "-c" in msg  # who holds it
        assert "is `rblock up` running for this node? stop it first" in msg
        with pytest.raises(MetadataError, match="in use"):
            Metadata.create(meta, "beta", "r9", 2 * GiB, force=True)
        assert Path(meta).read_bytes() == before
        holder.release()
    md = Metadata.open(meta)
    assert md.bitmap.count() == 64 * MiB // 4096 and not md.sb.clean_shutdown
    md.close()


def test_lock_is_taken_before_anything_is_read(meta):
    """Even a file the holder has made unreadable as metadata reports "in use", not
    "corrupt": the second opener does not look at the contents."""
    with Holder(f"""
        import fcntl, os
        fd = os.open({meta!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, bytes(8192), 0)
    """) as holder:
        with pytest.raises(MetadataError, match="in use by another process"):
            Metadata.open(meta)
        holder.release()
    with pytest.raises(MetadataError, match="no valid superblock"):
        Metadata.open(meta)


def test_a_failed_open_releases_the_lock(meta, tmp_path):
    with pytest.raises(MetadataError, match="belongs to node 'alpha'"):
        Metadata.open(meta, node="beta")
    Metadata.open(meta).close()
    with pytest.raises(MetadataError, match="already exists"):
        Metadata.create(meta, "alpha", "r0", GiB)
    Metadata.open(meta).close()


# --- the backing disk ----------------------------------------------------------------------


def test_volume_second_open_in_the_same_process_is_refused(disk):
    vol = FileVolume(disk)
    with pytest.raises(VolumeInUse) as e:
        FileVolume(disk)
    assert isinstance(e.value, OSError) and e.value.errno == errno.EBUSY
    assert f"{disk} is already open in this process" in e.value.strerror
    assert "given twice" in e.value.strerror
    with pytest.raises(VolumeInUse):
        FileVolume(disk, read_only=True)  # a reader would see the writer's writes torn
    shared = FileVolume(disk, exclusive=False)  # what a caller asks for, it gets
    close_volume(shared)
    close_volume(vol)
    close_volume(FileVolume(disk))  # released by close


def test_a_volume_whose_flush_fails_still_releases_its_lock(disk):
    """Detaching a failing disk closes it with a failing flush; re-attaching must work."""
    vol = FileVolume(disk)
    with mock.patch.object(os, "fdatasync", side_effect=OSError(errno.EIO, "EIO")), \
            pytest.raises(OSError):
        close_volume(vol)
    assert vol.fd == -1
    close_volume(FileVolume(disk))


def test_read_only_volumes_share_a_file(disk):
    a = FileVolume(disk, read_only=True)
    b = FileVolume(disk, read_only=True)
    with pytest.raises(VolumeInUse):
        FileVolume(disk)
    close_volume(a)
    close_volume(b)


def test_volume_held_by_another_process_is_refused(disk):
    with Holder(f"""
        from rblock.store.volume import FileVolume
        vol = FileVolume({disk!r})
    """) as holder:
        with pytest.raises(VolumeInUse) as e:
            FileVolume(disk)
        assert f"{disk} is in use by another process (pid {holder.proc.pid}" in str(e.value)
        assert "`rblock up` or `rblock serve` running with it? stop it first" in str(e.value)
        holder.release()
    close_volume(FileVolume(disk))


def _losetup_works() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None \
        and os.path.exists("/dev/loop-control")


@pytest.mark.skipif(not _losetup_works(), reason="needs root and loop devices")
def test_block_device_is_opened_with_o_excl(disk):
    """Linux refuses a second O_EXCL open of a block device (and one of a mounted one)."""
    res = subprocess.run(["losetup", "--find", "--show", disk], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        vol = FileVolume(dev)
        assert vol.is_block_device and vol.size_bytes == 16 * MiB
        with pytest.raises(VolumeInUse) as e:
            FileVolume(dev)
        assert f"block device {dev} is in use" in str(e.value) and "mounted" in str(e.value)
        close_volume(vol)
        close_volume(FileVolume(dev))
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


# --- creating backing files ----------------------------------------------------------------


def test_backing_file_is_created_mode_0600(tmp_path):
    path = str(tmp_path / "new.img")
    old = os.umask(0)  # the mode must come from the code, not from a strict umask
    try:
        create_image(path, 8 * MiB)
    finally:
        os.umask(old)
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == 8 * MiB and st.st_blocks == 0  # sparse


def test_create_image_never_touches_an_existing_file(disk):
    with open(disk, "r+b") as f:
        f.write(b"guest data")
    os.chmod(disk, 0o640)
    before = os.stat(disk)
    with pytest.raises(FileExistsError):
        create_image(disk, 4 * MiB)
    after = os.stat(disk)
    assert (after.st_size, after.st_mode, after.st_mtime_ns) == \
        (before.st_size, before.st_mode, before.st_mtime_ns)
    assert Path(disk).read_bytes()[:10] == b"guest data"


# --- through the commands ------------------------------------------------------------------


def test_serve_refuses_an_image_in_use(rblock_serve, disk):
    srv = rblock_serve(disk, "--export", "x")
    second = subprocess.run([sys.executable, "-m", "rblock", "serve", disk, "--listen",
                             "127.0.0.1:0"], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr  # failed (cli.py)
    assert f"{disk} is in use by another process (pid {srv.pid}" in second.stderr
    assert srv.stop() == 0


def test_running_node_refuses_a_second_up_and_create_md(cluster):
    c = cluster(size="16M")
    c.create_md("alpha")
    Path(c.disk("alpha")).write_bytes(b"guest data".ljust(16 * MiB, b"\0"))
    c.up("alpha")
    meta_before = c.meta("alpha").read_bytes()
    second = c.rblock("alpha", "up", check=False, timeout_s=30)
    assert second.returncode != 0
    assert f"metadata {c.meta('alpha')} is in use by another process" in second.stderr, \
        second.stderr
    forced = c.rblock("alpha", "create-md", "--force", check=False)
    assert forced.returncode != 0 and "is in use by another process" in forced.stderr, \
        forced.stdout + forced.stderr
    assert c.meta("alpha").read_bytes() == meta_before  # nothing written under the daemon
    assert c.status("alpha")["node"] == "alpha"
    assert c.stop("alpha") == 0
    # create-md of an existing disk rewrites the metadata only, never the disk
    c.rblock("alpha", "create-md", "--force")
    assert Path(c.disk("alpha")).read_bytes()[:10] == b"guest data"
