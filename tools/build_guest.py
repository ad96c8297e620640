#!/usr/bin/env python3
"""Build a tiny test guest: an uncompressed kernel plus a busybox initramfs.

usage: python3 tools/build_guest.py [--kver KVER] OUTDIR

Writes OUTDIR/vmlinux and OUTDIR/initramfs.cpio.gz from the Debian packages linux-image-amd64
and busybox-static. The guest's /init loads the virtio block driver, waits for /dev/vda and then
acts on optional kernel command line parameters (see INIT_SCRIPT):

    rblock.peek=1         first of all, read sector 0 (what an earlier boot left); PEEK:<content>
    rblock.write=MARKER   write MARKER, NUL-padded, as sector 0 (O_DIRECT + fsync); WROTE:MARKER
    rblock.read=1         read sector 0 with O_DIRECT; READ:<content without NULs>
    rblock.loop=N         N times, 0.5 s apart, write "W<i>" to 4 KiB block 10; LOOP <i> ok|ERR
    rblock.hold=1         stay up (idle) instead of powering off, e.g. for libvirt guests

At any time the ACPI power button (virsh shutdown, hvctl guest stop) powers it off:
POWER-BUTTON.

It always prints GUEST-DONE, then powers off (unless held). The console is ttyS0.

Why an uncompressed kernel: QEMU boots the ELF vmlinux through its PVH entry, which under TCG
skips the in-guest decompression and halves boot time (~2 s instead of ~4 s).
Why our own cpio writer: no dependency on the cpio binary, and device nodes (/dev/console) can be
put in the archive without being root.

Outputs are reused when OUTDIR/stamp matches the inputs and the outputs are newer than them, so
a second run costs a few stat() calls. Everything written is world-readable because libvirt runs
guests as the unprivileged user libvirt-qemu.

Also importable: `from tools.build_guest import build_guest; img = build_guest(Path("build/g"))`.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
BUSYBOX = Path("/bin/busybox")

# What the guest must load to see a virtio-blk-pci disk, and the ACPI power button as an input
# device (button, evdev); dependencies come from modules.dep. Any of them may be built into
# the kernel, in which case it is simply absent from modules.dep.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "button", "evdev")

# Kernel command line every test guest needs; rblock.* parameters are appended to it.
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet"

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
FILE_MODE = 0o644
DIR_MODE = 0o755

INIT_SCRIPT = r"""#!/bin/busybox sh
# rblock test guest, PID 1. Built by tools/build_guest.py; all rblock.* parameters optional.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "GUEST-START $(uname -r)"

# Value of rblock.NAME=VALUE on the kernel command line, empty when absent. The kernel keeps
# dotted parameters away from init's argv/env, so /proc/cmdline is the one place to look.
param() {
    for a in $(cat /proc/cmdline); do
        case "$a" in "rblock.$1="*) echo "${a#rblock.$1=}"; return ;; esac
    done
}

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "INSMOD-ERR:$m"
done

# The ACPI power button (libvirt's shutdown) powers the guest off at any time, as a real OS
# would. evdev hands out whole 24-byte input events; the first one is enough.
for ev in /sys/class/input/event*; do
    [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null
     echo "POWER-BUTTON"; sync; poweroff -f) &
done

# The disk shows up asynchronously after virtio_blk probes the PCI device.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ -b /dev/vda ]; then
    echo "DISK:vda sectors=$(cat /sys/block/vda/size)"
else
    echo "NO-DISK"
fi

# Prints sector 0 of the disk as "LABEL:text" (NULs dropped), or "LABEL-ERR".
show_sector0() {
    if dd if=/dev/vda of=/tmp/sector0 bs=512 count=1 iflag=direct 2>/dev/null; then
        echo "$1:$(tr -d '\000' </tmp/sector0)"
    else
        echo "$1-ERR"
    fi
}

case "$(param peek)" in "" | 0) ;; *) show_sector0 PEEK ;; esac

mark=$(param write)
if [ -n "$mark" ]; then
    # conv=sync pads the short read from the pipe to a full NUL-filled sector.
    if printf '%s' "$mark" |
        dd of=/dev/vda bs=512 count=1 conv=sync,fsync oflag=direct 2>/dev/null; then
        sync
        echo "WROTE:$mark"
    else
        echo "WRITE-ERR:$mark"
    fi
fi

case "$(param read)" in "" | 0) ;; *) show_sector0 READ ;; esac

n=$(param loop)
case "$n" in "" | *[!0-9]*) n=0 ;; esac
i=1
while [ $i -le $n ]; do
    if printf 'W%s' $i |
        dd of=/dev/vda bs=4096 count=1 seek=10 conv=sync,fsync oflag=direct 2>/dev/null; then
        echo "LOOP $i ok"
    else
        echo "LOOP $i ERR"
    fi
    sleep 0.5
    i=$((i+1))
done

echo "GUEST-DONE"
case "$(param hold)" in
    "" | 0) ;;
    *)
        while :; do sleep 3600; done
        ;;
esac
poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Inputs:
    kver: str
    bzimage: Path
    modules: list[Path]

    def paths(self) -> list[Path]:
        return [self.bzimage, BUSYBOX, *self.modules]


def kernel_cmdline(**params: str | int) -> str:
    """BASE_CMDLINE plus rblock.KEY=VALUE for each parameter, e.g. write="m1", read=1."""
    extra = [f"rblock.{key}={value}" for key, value in params.items()]
    return " ".join([BASE_CMDLINE, *extra])


# --- input discovery ---------------------------------------------------------------------


def _version_key(kver: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", kver)]


def newest_kernel_version() -> str:
    """Newest kernel that has both a /boot image and a module tree (the host's own kernel is
    irrelevant: this kernel runs inside the guest)."""
    kvers = [
        p.name.removeprefix("vmlinuz-")
        for p in BOOT_DIR.glob("vmlinuz-*")
        if (MODULES_DIR / p.name.removeprefix("vmlinuz-") / "modules.dep").exists()
    ]
    if not kvers:
        raise FileNotFoundError(
            f"no {BOOT_DIR}/vmlinuz-* with modules in {MODULES_DIR}; install linux-image-amd64"
        )
    return max(kvers, key=_version_key)


def _module_name(relpath: str) -> str:
    """kernel/drivers/virtio/virtio-foo.ko.xz -> virtio_foo (modprobe treats - and _ alike)."""
    return Path(relpath).name.split(".ko")[0].replace("-", "_")


def read_modules_dep(kver: str) -> dict[str, list[str]]:
    """Map module path -> its dependency paths, relative to /lib/modules/KVER."""
    deps: dict[str, list[str]] = {}
    for line in (MODULES_DIR / kver / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    return deps


def module_load_order(kver: str, wanted: Iterable[str] = WANTED_MODULES) -> list[Path]:
    """Module files for WANTED and their dependencies, each after what it depends on.
    Modules built into the kernel are not in modules.dep and are skipped."""
    deps = read_modules_dep(kver)
    by_name = {_module_name(path): path for path in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists dependencies so that modprobe loads them last-to-first.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return [MODULES_DIR / kver / path for path in order]


def find_inputs(kver: str | None = None) -> Inputs:
    kver = kver or newest_kernel_version()
    bzimage = BOOT_DIR / f"vmlinuz-{kver}"
    for path in (bzimage, BUSYBOX):
        if not path.exists():
            raise FileNotFoundError(f"{path} missing; install linux-image-amd64 busybox-static")
    return Inputs(kver, bzimage, module_load_order(kver))


# --- kernel --------------------------------------------------------------------------------


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz-compressed (Debian's default).
    The magic may also occur by chance earlier in the setup code, so try each occurrence."""
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        try:
            # The decompressor stops at the end of the xz stream and ignores the trailer.
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(ELF_MAGIC):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise ValueError("no xz-compressed ELF payload found in the kernel image")


# --- initramfs -----------------------------------------------------------------------------


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the kernel's "newc" format: per entry a 110-byte ASCII header of
    hex fields, the NUL-terminated name, then the data, each padded to 4 bytes.
    Owner root, mtime 0: the archive is reproducible and independent of who built it."""
    out = bytearray()
    trailer = CpioEntry("TRAILER!!!", 0)
    for ino, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        is_dir = stat.S_ISDIR(entry.mode)
        fields = (
            ino if entry is not trailer else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if is_dir else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check (unused by newc)
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod cannot load compressed modules."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".ko":
        return data
    raise ValueError(f"unsupported module compression: {path}")


def initramfs_entries(inputs: Inputs) -> list[CpioEntry]:
    dirs = ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"]
    entries = [CpioEntry(d, stat.S_IFDIR | DIR_MODE) for d in dirs]
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    names = [_module_name(str(path)) for path in inputs.modules]
    for name, path in zip(names, inputs.modules, strict=True):
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, read_module(path)))
    order = "".join(f"{name}\n" for name in names).encode()
    entries.append(CpioEntry("lib/modules/load-order", stat.S_IFREG | 0o644, order))
    return entries


def check_static(path: Path) -> None:
    """Refuse a dynamically linked busybox (package busybox, not busybox-static): the
    initramfs has no libc, so the guest would die with a cryptic kernel panic."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != ELF_MAGIC or head[4] != 2:
            raise ValueError(f"{path} is not a 64-bit ELF executable")
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == PT_INTERP:
            raise ValueError(f"{path} is dynamically linked; install busybox-static")


# --- output management ---------------------------------------------------------------------


def write_file(path: Path, data: bytes) -> None:
    """Write atomically (a concurrent reader never sees half a kernel) and world-readable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(FILE_MODE)
    os.replace(tmp, path)


def stamp_key(inputs: Inputs) -> str:
    """Changes whenever the init script, this builder, the kernel version or the set of
    input files changes; input *contents* are covered by the mtime check in is_fresh()."""
    digest = hashlib.sha256()
    digest.update(INIT_SCRIPT.encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(inputs.kver.encode())
    for path in inputs.paths():
        digest.update(str(path).encode() + b"\0")
    return digest.hexdigest()


def is_fresh(image: GuestImage, stamp: Path, inputs: Inputs) -> bool:
    try:
        recorded = json.loads(stamp.read_text()).get("key")
        oldest_output = min(image.kernel.stat().st_mtime_ns, image.initrd.stat().st_mtime_ns)
    except (OSError, ValueError, AttributeError):
        return False
    newest_input = max(path.stat().st_mtime_ns for path in inputs.paths())
    return recorded == stamp_key(inputs) and oldest_output >= newest_input


@contextmanager
def locked(outdir: Path) -> Iterator[None]:
    """Serialize builders (parallel pytest sessions, hvctl) sharing one OUTDIR."""
    with (outdir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_outdir(outdir: Path) -> None:
    """Create OUTDIR and its missing parents 0755 whatever the umask, so that libvirt-qemu can
    reach the files. Existing directories are left alone: they may belong to someone else."""
    missing = [path for path in (outdir, *outdir.parents) if not path.exists()]
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        path.chmod(DIR_MODE)


def build_guest(outdir: Path, kver: str | None = None) -> GuestImage:
    """Build (or reuse) OUTDIR/vmlinux and OUTDIR/initramfs.cpio.gz."""
    outdir = Path(outdir).resolve()
    image = GuestImage(outdir / "vmlinux", outdir / "initramfs.cpio.gz")
    inputs = find_inputs(kver)
    make_outdir(outdir)
    stamp = outdir / "stamp"
    with locked(outdir):
        if is_fresh(image, stamp, inputs):
            return image
        check_static(BUSYBOX)
        write_file(image.kernel, extract_vmlinux(inputs.bzimage.read_bytes()))
        # Level 1: the archive is mostly busybox, higher levels save little and cost time.
        archive = cpio_newc(initramfs_entries(inputs))
        write_file(image.initrd, gzip.compress(archive, compresslevel=1, mtime=0))
        record = {"key": stamp_key(inputs), "kver": inputs.kver, "built": time.time()}
        write_file(stamp, json.dumps(record, indent=1).encode())
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--kver", help="kernel version (default: newest in /boot)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    image = build_guest(args.outdir, args.kver)
    took = time.monotonic() - start
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\n({took:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
