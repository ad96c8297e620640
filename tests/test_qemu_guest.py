"""A real QEMU guest (TCG, busybox initramfs) uses an `rblock serve` export as its virtio disk.

The guest image is built once into REPO/build/guest and reused by later runs (see
tools/build_guest.py); booting it to power-off takes a few seconds under TCG.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, make_image

# tools/ is not an installed package; `python -m pytest` from the repo root finds it through the
# working directory, a bare `pytest` or another cwd does not.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.build_guest import (  # noqa: E402
    CpioEntry,
    GuestImage,
    build_guest,
    cpio_newc,
    kernel_cmdline,
)

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 120
SECTOR = 512


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (make test installs qemu-system-x86)")
    return build_guest(REPO / "build" / "guest")


def nbd_drive(uri: str) -> str:
    """QEMU -drive options for an nbd://HOST:PORT/EXPORT URI printed by rblock serve."""
    parts = urlsplit(uri)
    assert parts.scheme == "nbd", uri
    export = parts.path.removeprefix("/")
    return (
        f"driver=nbd,host={parts.hostname},port={parts.port},export={export},"
        "if=none,id=d0,cache.direct=on"
    )


def boot(guest: GuestImage, drive: str, cmdline: str, log: Path) -> subprocess.CompletedProcess:
    """Boot the guest until it powers off; its serial console goes to LOG."""
    argv = [
        QEMU, "-accel", "tcg", "-m", "256", "-smp", "1",
        "-display", "none", "-no-reboot", "-nodefaults",
        "-serial", f"file:{log}",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", cmdline,
        "-drive", drive, "-device", "virtio-blk-pci,drive=d0",
    ]  # fmt: skip
    # run() kills QEMU on timeout, so a hung guest fails the test instead of hanging it.
    return subprocess.run(argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S)


@pytest.mark.slow
def test_guest_writes_and_reads_marker(guest, rblock_serve, tmp_path):
    img = make_image(tmp_path / "disk.img", 64 << 20)
    server = rblock_serve(img)
    marker = f"rblock-{uuid.uuid4().hex[:12]}"
    log = tmp_path / "serial.log"

    start = time.monotonic()
    qemu = boot(guest, nbd_drive(server.uri), kernel_cmdline(write=marker, read=1), log)
    took = time.monotonic() - start
    console = log.read_text(errors="replace") if log.exists() else ""
    context = (
        f"qemu rc={qemu.returncode} after {took:.1f}s\nstderr: {qemu.stderr}\n"
        f"serial:\n{console}\nserver log:\n{server.log()}"
    )

    assert qemu.returncode == 0, context
    lines = console.splitlines()
    assert "GUEST-DONE" in lines, context
    assert f"WROTE:{marker}" in lines, context
    assert f"READ:{marker}" in lines, context

    assert server.stop() == 0, server.log()
    with img.open("rb") as f:
        sector0 = f.read(SECTOR)
    assert sector0 == marker.encode().ljust(SECTOR, b"\0")


def test_guest_image_is_world_readable_and_reused(guest):
    """libvirt runs guests as libvirt-qemu; a second build must reuse the first one's files."""
    for path in (guest.kernel, guest.initrd):
        mode = path.stat().st_mode
        assert mode & stat.S_IROTH, path
    assert guest.kernel.read_bytes()[:4] == b"\x7fELF"
    assert guest.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert guest.kernel.parent.stat().st_mode & stat.S_IXOTH
    before = [p.stat().st_mtime_ns for p in (guest.kernel, guest.initrd)]
    again = build_guest(guest.kernel.parent)
    assert again == guest
    assert [p.stat().st_mtime_ns for p in (again.kernel, again.initrd)] == before


def test_cpio_newc_layout():
    """Headers are 110 bytes of ASCII hex; name and data are each padded to 4 bytes."""
    archive = cpio_newc([CpioEntry("init", stat.S_IFREG | 0o755, b"abc")])
    assert archive[:6] == b"070701"
    assert int(archive[54:62], 16) == 3  # c_filesize
    assert int(archive[94:102], 16) == len(b"init\0")  # c_namesize
    assert archive[110:115] == b"init\0"
    data_start = 116  # 110 + len("init\0") = 115, padded to a multiple of 4
    assert archive[data_start : data_start + 4] == b"abc\0"
    assert b"TRAILER!!!\0" in archive
    assert len(archive) % 4 == 0
