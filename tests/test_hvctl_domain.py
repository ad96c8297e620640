"""hvctl's guest config and domain XML: each guest shape built, validated against libvirt's own
schema (virt-xml-validate), defined in libvirt's test driver, and parsed back."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from hvctl.config import GuestConfig, HvConfig, load, mac_for
from hvctl.domain import (
    PASSTHROUGH_PCI_SLOT_FIRST,
    QEMU_NS,
    DomainSpec,
    NbdDisk,
    build_xml,
    has_native_reconnect,
    parse_xml,
)
from rblock.config import ConfigError

BASE = textwrap.dedent("""\
    [resource.r0]
    size = "64M"
    secret = "s"
    [resource.r1]
    size = "64M"
    secret = "s"
    [node.alpha]
    replication = "127.0.0.1:7790"
    control = "127.0.0.1:7800"
    nbd = "0.0.0.0:10809"
    libvirt = "test:///default"
    [node.alpha.disk]
    r0 = "a/r0.img"
    r1 = "a/r1.img"
    [node.beta]
    replication = "127.0.0.1:7791"
    control = "127.0.0.1:7801"
    nbd = "127.0.0.1:10810"
    [node.beta.disk]
    r0 = "b/r0.img"
    r1 = "b/r1.img"
    """)

KERNEL_GUEST = textwrap.dedent("""\
    [guest.tiny]
    disks = ["r0"]
    memory = "256M"
    kernel = "boot/vmlinux"
    initrd = "boot/initrd.gz"
    cmdline = "console=ttyS0 rblock.hold=1"
    console_log = "logs/tiny.log"
    domain_type = "qemu"
    """)

DISK_GUEST = textwrap.dedent("""\
    [guest.big]
    disks = ["r0", "r1"]
    memory = "2G"
    vcpus = 4
    node = "beta"
    network = { type = "bridge", source = "br0" }
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> HvConfig:
    return load(write(tmp_path, BASE + KERNEL_GUEST + DISK_GUEST))


def spec(g: GuestConfig, form: str = "native", dtype: str = "qemu") -> DomainSpec:
    return DomainSpec(g, "alpha", dtype, tuple(NbdDisk(r, "127.0.0.1", 10809 + i)
                                               for i, r in enumerate(g.disks)), form)


# --- config ---------------------------------------------------------------------------------

def test_guest_config_values_and_paths(cfg: HvConfig, tmp_path: Path) -> None:
    tiny, big = cfg.guest("tiny"), cfg.guest("big")
    assert tiny.kernel == tmp_path / "boot" / "vmlinux"
    assert tiny.console_log == tmp_path / "logs" / "tiny.log"
    assert tiny.memory_bytes == 256 << 20 and tiny.vcpus == 1 and tiny.domain_type == "qemu"
    assert big.disks == ("r0", "r1") and big.vcpus == 4 and big.domain_type == "auto"
    assert big.network is not None and big.network.mac == mac_for("big")
    assert big.console_log == cfg.state_dir / "console" / "big.log"
    assert cfg.nodes_for(big) == ["alpha"]  # beta has no libvirt URI
    assert tiny.uuid == load(cfg.path).guest("tiny").uuid  # stable across loads


def test_guest_directory(tmp_path: Path) -> None:
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests" / "vm7.toml").write_text('disks = ["r1"]\nkernel = "k"\n')
    cfg = load(write(tmp_path, BASE + '[hvctl]\nguests = "guests"\nstop_timeout_s = 5\n'))
    g = cfg.guest("vm7")
    assert g.disks == ("r1",) and g.kernel == tmp_path / "guests" / "k"
    assert g.stop_timeout_s == 5.0 and g.source == tmp_path / "guests" / "vm7.toml"


@pytest.mark.parametrize("extra, where, fix", [
    ('[guest.g]\nmemory = "1G"\n', "guest.g.disks: missing", 'disks = ["r0"]'),
    ('[guest.g]\ndisks = ["r9"]\n', "guest.g.disks[0]: resource 'r9' is not in",
     "add [resource.r9]"),
    ('[guest.g]\ndisks = []\n', "guest.g.disks: is empty", 'disks = ["r0"]'),
    ('[guest.g]\ndisks = ["r0", "r0"]\n', "guest.g.disks[1]: resource 'r0' is listed twice",
     "one disk of one guest"),
    ('[guest.g]\ndisks = ["r0"]\nmemroy = "1G"\n', "guest.g.memroy: unknown key",
     "did you mean 'memory'"),
    ('[guest.g]\ndisks = ["r0"]\nmemory = "1X"\n', "guest.g.memory:", '"512M"'),
    ('[guest.g]\ndisks = ["r0"]\nmemory = "1M"\n', "guest.g.memory: '1M' is less than",
     'memory = "512M"'),
    ('[guest.g]\ndisks = ["r0"]\nvcpus = 0\n', "guest.g.vcpus: 0 is not", "vcpus = 1"),
    ('[guest.g]\ndisks = ["r0"]\ninitrd = "i"\n', "guest.g.initrd: only used with",
     'kernel = "PATH"'),
    ('[guest.g]\ndisks = ["r0"]\nnode = "gamma"\n', "guest.g.node: 'gamma' is not a node",
     "nodes: alpha, beta"),
    ('[guest.g]\ndisks = ["r0"]\ndomain_type = "xen"\n', "guest.g.domain_type: 'xen' is not",
     'domain_type = "auto"'),
    ('[guest.g]\ndisks = ["r0"]\nnetwork = { type = "bridge" }\n',
     "guest.g.network.source: missing", 'source = "br0"'),
    ('[guest.g]\ndisks = ["r0"]\nnetwork = { mac = "zz" }\n', "guest.g.network.mac:",
     "derived from the name"),
    ('[guest.g]\ndisks = ["r0"]\nreconnect_delay_s = -1\n', "guest.g.reconnect_delay_s:",
     "reconnect_delay_s = 30"),
    ('[hvctl]\ndomain_typ = "kvm"\n', "hvctl.domain_typ: unknown key",
     "did you mean 'domain_type'"),
    ('[hvctl]\nguests = "nope"\n', "hvctl.guests:", "create it"),
    ('[hvctl]\nprobe_kernel = "vmlinuz"\n', "hvctl.probe_kernel:", "absolute path"),
    ('hvctl = 3\n', "hvctl: must be a table", "[hvctl] header"),
    ('[guest.g]\ndisks = ["r0"]\nha = "on"\n', "guest.g.ha: 'on' is not one of",
     'ha = "disabled"'),
    ('[guest.g]\ndisks = ["r0"]\nha = "started"\nprefer = ["gamma"]\n',
     "guest.g.prefer[0]: 'gamma' is not a node", "fix the name or remove it"),
    ('[guest.g]\ndisks = ["r0"]\nha = "started"\nprefer = ["beta"]\n',
     "guest.g.prefer[0]: node 'beta' has no libvirt URI", "remove it from prefer"),
    ('[guest.g]\ndisks = ["r0"]\nprefer = "alpha"\n', "guest.g.prefer:",
     'prefer = ["alpha"]'),
    ('[guest.g]\ndisks = ["r0"]\nmax_restart = -1\n', "guest.g.max_restart: -1 is not",
     "max_restart = 1"),
    ('[guest.g]\ndisks = ["r0"]\nmax_relocate = 1.5\n', "guest.g.max_relocate:",
     "max_relocate = 1"),
    ('[guest.g]\ndisks = ["r0"]\ngraphics = "spice"\n',
     "guest.g.graphics: 'spice' is not one of none, vnc", 'graphics = "none"'),
])
def test_bad_config_names_key_and_fix(tmp_path: Path, extra: str, where: str, fix: str) -> None:
    # top-level scalars must come before the first table header
    text = extra + BASE if not extra.startswith("[") else BASE + extra
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert where in str(e.value) and fix in str(e.value), str(e.value)
    assert str(tmp_path / "cluster.toml") in str(e.value)


def test_ha_guest_preferring_a_node_without_its_disk(tmp_path: Path) -> None:
    text = '[resource.r0]\nsize = "64M"\nsecret = "s"\n[resource.r1]\nsize = "64M"\nsecret = "s"\n'
    for i, (node, res) in enumerate([("alpha", "r0"), ("beta", "r0"), ("gamma", "r1")]):
        text += (f'[node.{node}]\nreplication = "127.0.0.1:{7790 + i}"\n'
                 f'control = "127.0.0.1:{7800 + i}"\nnbd = "127.0.0.1:{10809 + i}"\n'
                 f'libvirt = "test:///default"\n[node.{node}.disk]\n{res} = "{node}/{res}.img"\n'
                 + ('r1 = "b/r1.img"\n' if node == "beta" else ""))
    text += '[guest.g]\ndisks = ["r0"]\nha = "started"\nprefer = ["gamma"]\n'
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert ("guest.g.prefer[0]: node 'gamma' holds no replica of r0, so the guest cannot run "
            "there; prefer one of alpha, beta, or add a disk for r0 to [node.gamma.disk]"
            in str(e.value)), str(e.value)


def test_guest_whose_disks_share_no_node(tmp_path: Path) -> None:
    text = '[resource.r0]\nsize = "64M"\nsecret = "s"\n[resource.r1]\nsize = "64M"\nsecret = "s"\n'
    for i, (node, res) in enumerate([("a", "r0"), ("b", "r0"), ("c", "r1"), ("d", "r1")]):
        text += (f'[node.{node}]\nreplication = "127.0.0.1:{7790 + i}"\n'
                 f'control = "127.0.0.1:{7800 + i}"\nnbd = "127.0.0.1:{10809 + i}"\n'
                 f'[node.{node}.disk]\n{res} = "{node}/{res}.img"\n')
    text += '[guest.g]\ndisks = ["r0", "r1"]\n'
    with pytest.raises(ConfigError, match=r"guest.g.disks: no node holds all of r0, r1"):
        load(write(tmp_path, text))


def test_unknown_guest_lists_the_known_ones(cfg: HvConfig) -> None:
    with pytest.raises(ConfigError, match=r"guest 'nope' not in .*guests: tiny, big"):
        cfg.guest("nope")


# --- domain XML -----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="libvirt-clients missing")
@pytest.mark.parametrize("form", ["native", "passthrough"])
@pytest.mark.parametrize("guest, dtype", [("tiny", "qemu"), ("big", "kvm")])
def test_xml_is_valid_for_libvirt(cfg: HvConfig, tmp_path: Path, guest: str, dtype: str,
                                  form: str) -> None:
    xml = build_xml(spec(cfg.guest(guest), form, dtype))

    def validate(text: str) -> subprocess.CompletedProcess:
        path = tmp_path / "d.xml"
        path.write_text(text)
        return subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                              text=True)

    res = validate(xml)
    if res.returncode != 0 and form == "native":
        # A libvirt without NBD <reconnect> (9.0) rejects just that element; its parser drops
        # it too (test_defined_in_libvirt_and_read_back), so hvctl uses passthrough there.
        assert "reconnect" in xml
        res = validate(re.sub(r"\s*<reconnect [^>]*/>", "", xml))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("form", ["native", "passthrough"])
def test_kernel_boot_guest_round_trip(cfg: HvConfig, form: str) -> None:
    g = cfg.guest("tiny")
    info = parse_xml(build_xml(spec(g, form)))
    assert (info.name, info.uuid, info.domain_type) == ("tiny", g.uuid, "qemu")
    assert info.memory_bytes == 256 << 20 and info.vcpus == 1
    assert (info.kernel, info.initrd) == (str(g.kernel), str(g.initrd))
    assert info.cmdline == "console=ttyS0 rblock.hold=1" and info.boot_dev is None
    assert info.console_log == str(g.console_log) and info.managed and info.node == "alpha"
    assert info.disk_uris == {"r0": "nbd://127.0.0.1:10809/r0"}
    [d] = info.disks
    assert d["form"] == form and d["protocol"] == "nbd" and d["resource"] == "r0"
    assert (d["host"], d["port"], d["target"], d["bus"]) == ("127.0.0.1", 10809, "vda",
                                                              "virtio")
    assert d["cache"] == "none" and d["discard"] == "unmap" and d["reconnect_delay_s"] == 30
    assert info.interfaces == []


def test_disk_boot_guest_with_two_disks_and_a_bridge(cfg: HvConfig) -> None:
    g = cfg.guest("big")
    native = parse_xml(build_xml(spec(g, "native", "kvm")))
    assert native.domain_type == "kvm" and native.boot_dev == "hd" and native.kernel is None
    assert [(d["resource"], d["target"], d["port"]) for d in native.disks] == [
        ("r0", "vda", 10809), ("r1", "vdb", 10810)]
    assert native.interfaces == [{"type": "bridge", "mac": mac_for("big"), "source": "br0",
                                  "model": "virtio"}]
    root = ET.fromstring(build_xml(spec(g, "native", "kvm")))
    assert root.find("cpu").get("mode") == "host-passthrough"

    passthrough = parse_xml(build_xml(spec(g, "passthrough", "kvm")))
    assert passthrough.boot_dev is None  # the first disk carries bootindex 1 instead
    assert [d.get("bootindex") for d in passthrough.disks] == [1, None]
    assert [(d["resource"], d["target"]) for d in passthrough.disks] == [("r0", "vda"),
                                                                       ("r1", "vdb")]
    args = [a.get("value") for a in ET.fromstring(build_xml(spec(g, "passthrough")))
            .findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert f'"addr":"{hex(PASSTHROUGH_PCI_SLOT_FIRST)}"' in args[3]
    assert not ET.fromstring(build_xml(spec(g, "passthrough"))).findall("devices/disk")


def test_user_network_and_no_reconnect(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE + '[guest.n]\ndisks = ["r0"]\nreconnect_delay_s = 0\n'
                     'network = { type = "user", model = "e1000", mac = "52:54:00:AA:bb:01" }\n'))
    info = parse_xml(build_xml(spec(cfg.guest("n"))))
    assert info.interfaces == [{"type": "user", "mac": "52:54:00:aa:bb:01", "source": None,
                                "model": "e1000"}]
    assert info.disks[0]["reconnect_delay_s"] == 0


def test_defined_in_libvirt_and_read_back(cfg: HvConfig) -> None:
    """libvirt's test driver parses our XML with the same code as the QEMU driver; what it
    keeps is what a node would run. Libvirt 9.0 drops <reconnect>: has_native_reconnect says
    so, and the controller then uses the passthrough form."""
    conn = libvirt.open("test:///default")
    try:
        for g in (cfg.guest("tiny"), cfg.guest("big")):
            dom = conn.defineXML(build_xml(spec(g)))
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                info = parse_xml(xml)
                assert info.managed and info.uuid == g.uuid and info.node == "alpha"
                assert [d["resource"] for d in info.disks] == list(g.disks)
                assert all(d["cache"] == "none" for d in info.disks)
                kept = libvirt.getVersion() >= 9_003_000 and has_native_reconnect(xml)
                assert has_native_reconnect(xml) == kept
            finally:
                dom.undefine()
    finally:
        conn.close()


def test_nbd_uri_for_ipv6() -> None:
    assert NbdDisk("r0", "::1", 10809).uri == "nbd://[::1]:10809/r0"


# --- graphics -------------------------------------------------------------------------------

SCREEN_GUEST = '[guest.win]\ndisks = ["r0"]\nmemory = "1G"\ngraphics = "vnc"\n'


def test_graphics_listen_on_each_nodes_own_address(tmp_path: Path) -> None:
    text = BASE.replace('replication = "127.0.0.1:7791"', 'replication = "10.0.0.2:7791"')
    g = load(write(tmp_path, text + SCREEN_GUEST)).guest("win")
    assert g.graphics is not None and g.graphics.type == "vnc"
    assert g.graphics.address("alpha") == "127.0.0.1" and g.graphics.address("beta") == "10.0.0.2"
    assert load(write(tmp_path, BASE + KERNEL_GUEST)).guest("tiny").graphics is None


def test_graphics_refuse_a_wildcard_address(tmp_path: Path) -> None:
    text = BASE.replace('replication = "127.0.0.1:7791"', 'replication = "0.0.0.0:7791"')
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text + SCREEN_GUEST))
    assert ("guest.win.graphics: node beta replicates on '0.0.0.0', every address, but VNC "
            "(no password) must listen on the node's own address only; set "
            "node.beta.replication to that address" in str(e.value)), str(e.value)


@pytest.mark.parametrize("form", ["native", "passthrough"])
def test_graphics_xml_round_trip(tmp_path: Path, form: str) -> None:
    cfg = load(write(tmp_path, BASE + KERNEL_GUEST + SCREEN_GUEST))
    xml = build_xml(spec(cfg.guest("win"), form))
    info = parse_xml(xml)
    assert info.graphics == [{"type": "vnc", "listen": "127.0.0.1", "port": -1,
                              "autoport": True}]
    assert info.video == "vga"
    root = ET.fromstring(xml)
    assert [c.get("model") for c in root.findall("devices/controller[@type='usb']")] == [
        "qemu-xhci"]
    assert root.find("devices/input[@type='tablet']").get("bus") == "usb"
    assert root.find("devices/graphics").get("passwd") is None  # the web's tickets guard it
    plain = parse_xml(build_xml(spec(cfg.guest("tiny"), form)))
    assert plain.graphics == [] and plain.video is None
    assert [c.get("model") for c in ET.fromstring(build_xml(spec(cfg.guest("tiny"), form)))
            .findall("devices/controller[@type='usb']")] == ["none"]


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="libvirt-clients missing")
def test_graphics_xml_is_valid_for_libvirt_and_kept(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE + SCREEN_GUEST))
    xml = build_xml(spec(cfg.guest("win"), "passthrough"))
    path = tmp_path / "d.xml"
    path.write_text(xml)
    res = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(xml)
        try:
            info = parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            assert info.graphics == [{"type": "vnc", "listen": "127.0.0.1", "port": -1,
                                      "autoport": True}] and info.video == "vga"
        finally:
            dom.undefine()
    finally:
        conn.close()
