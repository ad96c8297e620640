"""Simulated hypervisor hosts (tools/libvirt_hosts.py): separate libvirtds on one machine,
a TCG guest booted through libvirt from an `rblock serve` NBD disk, nothing left after stop().

Needs root and libvirt; where that is missing the tests skip, except under CI=true, where
they fail with the fix in the message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, make_image

if str(REPO) not in sys.path:  # tools/ is not installed; see tests/test_qemu_guest.py
    sys.path.insert(0, str(REPO))
import tools.libvirt_hosts as lh  # noqa: E402
from tools.build_guest import GuestImage, build_guest, kernel_cmdline  # noqa: E402
from tools.libvirt_hosts import (  # noqa: E402
    PRIVATE_DIRS,
    LibvirtHost,
    LibvirtHostError,
    LibvirtHostUnavailable,
    alive,
    check_requirements,
    hosts,
)

BOOT_TIMEOUT_S = 120
SECTOR = 512


def require_hosts() -> None:
    try:
        check_requirements()
    except LibvirtHostUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    require_hosts()
    with hosts(tmp_path_factory.mktemp("hosts"), ["alpha", "beta"]) as started:
        yield started


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    require_hosts()
    return build_guest(REPO / "build" / "guest")


def domain_xml(name: str, guest: GuestImage, cmdline: str, serial: Path, nbd_uri: str = "") -> str:
    """A TCG domain booting GUEST's kernel; vda is the NBD export NBD_URI if given."""
    disk = ""
    if nbd_uri:
        parts = urlsplit(nbd_uri)
        disk = f"""
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='{parts.path.removeprefix("/")}'>
        <host name='{parts.hostname}' port='{parts.port}'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>"""
    # <acpi/>: without it libvirt passes -no-acpi and the guest's poweroff only halts.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk}
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def host_uuid(conn) -> str:
    return ET.fromstring(conn.getCapabilities()).findtext("host/uuid")


def foreign_mounts(base_dir: Path) -> list[str]:
    """Mounts in our own namespace that a host made: on a private dir, or from BASE_DIR."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        root, mount_point = line.split()[3:5]
        if mount_point in PRIVATE_DIRS or str(base_dir) in root:
            found.append(line)
    return found


def test_two_hosts_are_separate(two_hosts):
    alpha, beta = two_hosts["alpha"], two_hosts["beta"]
    assert alpha.running and beta.running
    assert alpha.uri != beta.uri
    a, b = alpha.connect(), beta.connect()
    try:
        assert host_uuid(a) != host_uuid(b)
        name = f"only-on-alpha-{uuid.uuid4().hex[:8]}"
        xml = f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
        dom = a.defineXML(xml)
        try:
            assert name in a.listDefinedDomains()
            assert name not in b.listDefinedDomains()
            assert (alpha.dir / "etc" / "qemu" / f"{name}.xml").exists()
            assert not (beta.dir / "etc" / "qemu" / f"{name}.xml").exists()
        finally:
            dom.undefine()
    finally:
        a.close()
        b.close()
    assert set(alpha.pids.values()) <= set(alpha.processes())
    assert not set(alpha.processes()) & set(beta.processes())
    assert foreign_mounts(alpha.base_dir) == [], "bind mounts leaked into our namespace"


@pytest.mark.slow
def test_tcg_guest_boots_through_libvirt_from_rblock(two_hosts, guest, rblock_serve, tmp_path):
    import libvirt

    alpha = two_hosts["alpha"]
    img = make_image(tmp_path / "disk.img", 64 << 20)
    server = rblock_serve(img)
    marker = f"lv-{uuid.uuid4().hex[:12]}"
    serial = tmp_path / "serial.log"  # in a 0700 dir: libvirt opens it and passes the fd
    name = f"boot-{marker}"
    xml = domain_xml(name, guest, kernel_cmdline(write=marker), serial, server.uri)

    conn = alpha.connect()
    try:
        dom = conn.defineXML(xml)
        start = time.monotonic()
        dom.create()
        while dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
            if time.monotonic() - start > BOOT_TIMEOUT_S:
                dom.destroy()
                break
            time.sleep(0.05)
        took = time.monotonic() - start
        dom.undefine()
    finally:
        conn.close()

    console = serial.read_text(errors="replace") if serial.exists() else ""
    qemu_log = alpha.domain_log_path(name)
    context = (
        f"after {took:.1f}s\nserial:\n{console}\nqemu log:\n"
        f"{qemu_log.read_text() if qemu_log.exists() else '-'}\nserver log:\n{server.log()}"
    )
    assert took < BOOT_TIMEOUT_S, context
    assert f"WROTE:{marker}" in console.splitlines(), context
    assert "GUEST-DONE" in console.splitlines(), context
    assert server.stop() == 0, server.log()
    with img.open("rb") as f:
        assert f.read(SECTOR) == marker.encode().ljust(SECTOR, b"\0"), context


@pytest.mark.parametrize("how", ["stop", "stop-libvirtd-dead", "stop-init-dead", "crash"])
def test_nothing_left_behind(guest, tmp_path, how):
    """stop() destroys running guests through libvirt; if libvirtd died, the host's init kills
    them; if the init died too, stop() finds them by pidfile and namespace. crash() kills all."""
    require_hosts()
    host = LibvirtHost("gamma", tmp_path / "hosts")
    host.start()
    try:
        conn = host.connect()
        try:  # transient and held: it would run until killed
            conn.createXML(
                domain_xml("held", guest, kernel_cmdline(hold=1), tmp_path / "held.log"), 0
            )
        finally:
            conn.close()
        qemu = host.qemu_pids()
        assert len(qemu) == 1
        everything = host.processes()
        pids = host.pids
        assert set(pids) == {"init", "virtlogd", "libvirtd"}
        assert set(pids.values()) | set(qemu) == set(everything)
        if how == "stop-libvirtd-dead":
            os.kill(pids["libvirtd"], signal.SIGKILL)
        elif how == "stop-init-dead":
            os.kill(pids["init"], signal.SIGKILL)
            os.kill(pids["libvirtd"], signal.SIGKILL)
        elif how == "crash":
            host.crash()
            assert [pid for pid in everything if alive(pid)] == []
            host.start()  # a crashed host boots again, over its stale run/
            assert host.running
    finally:
        host.stop()
    assert [pid for pid in everything if alive(pid)] == []
    assert host.processes() == []
    assert host.pids == {}
    assert foreign_mounts(host.base_dir) == []


def test_start_after_owner_died(tmp_path):
    """A host whose owner was SIGKILLed leaves daemons, sockets, pidfiles; start() copes."""
    require_hosts()
    base = tmp_path / "hosts"
    owner = subprocess.run(
        [sys.executable, "-c", (
            "import os, sys; from pathlib import Path; from tools.libvirt_hosts import LibvirtHost\n"
            "h = LibvirtHost('delta', Path(sys.argv[1])); h.start()\n"
            "print(*h.pids.values(), flush=True); os._exit(0)"
        ), str(base)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert owner.returncode == 0, owner.stderr
    orphans = [int(pid) for pid in owner.stdout.split()]
    assert len(orphans) == 3 and all(alive(pid) for pid in orphans)

    host = LibvirtHost("delta", base)
    assert sorted(host.processes()) == sorted(orphans)
    host.start()
    try:
        assert not any(alive(pid) for pid in orphans)
        conn = host.connect()
        assert conn.getLibVersion() > 0
        conn.close()
    finally:
        host.stop()
    assert host.processes() == []


def test_start_failure_names_the_cause(tmp_path, monkeypatch):
    require_hosts()
    monkeypatch.setattr(lh, "DAEMON_LOG_LEVEL", 9)  # the daemons reject this level
    host = LibvirtHost("broken", tmp_path / "hosts")
    with pytest.raises(LibvirtHostError) as info:
        host.start(timeout_s=20)
    message = str(info.value)
    assert "host broken" in message and "exited with status" in message, message
    assert "Invalid log priority '9'" in message, message
    assert host.processes() == [] and host.pids == {}


def test_start_timeout_leaves_no_process(tmp_path):
    require_hosts()
    host = LibvirtHost("slow", tmp_path / "hosts")
    with pytest.raises(LibvirtHostError, match="in time"):
        host.start(timeout_s=0)
    assert host.processes() == [] and host.pids == {}


def test_base_dir_under_a_private_dir_is_refused():
    with pytest.raises(ValueError, match="/var/lib/libvirt"):
        LibvirtHost("h", Path("/var/lib/libvirt/hosts"))
