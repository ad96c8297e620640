"""Libvirt domain XML for a guest, and the way back from XML to what it says. Pure: no libvirt.

Every guest disk is an rblock resource, attached as an NBD network disk to the export of the
node the guest runs on, with `cache='none'` (O_DIRECT semantics: the guest's flushes reach
rblock, whose durability contract then holds) and `discard='unmap'` (guest TRIM punches holes
on both replicas).

A guest must ride through an rblock restart (a stall, never an I/O error), which needs
QEMU's NBD `reconnect-delay`. Libvirt learned `<reconnect delay='N'/>` for NBD disks after
9.0 (Debian 12 ships 9.0, which silently drops the element), so there are two forms:

- `native`: the disk is a libvirt `<disk type='network'>` with `<reconnect delay>`;
- `passthrough`: the disk is handed to QEMU directly through `<qemu:commandline>` as a
  `-blockdev` (nbd driver with reconnect-delay, cache.direct) plus a `-device virtio-blk-pci`
  on a fixed PCI slot from PASSTHROUGH_PCI_SLOT_FIRST on, above the slots libvirt hands out
  for the few devices a guest here has.

The controller defines the native form and falls back to passthrough when the defined XML
comes back without the element (hvctl/virt.py), so newer libvirt gets the clean form.

A guest with `graphics = "vnc"` gets a standard VGA card (Windows and Linux drive it without
extra drivers; a kernel's VGA text console shows on it), a VNC server on the node's own
address with a port libvirt picks (autoport, from 5900), no password (the web page proxies it
behind one-time tickets, hvctl/web/vnc.py), and a USB tablet on an xHCI controller so the
pointer follows the browser's without grabbing. Guests without graphics keep no USB at all.

Identity: the domain's UUID and NIC MAC derive from the guest name (hvctl/config.py), and
`<metadata>` records that hvctl manages it, on which node and for which resources.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from hvctl.config import GuestConfig

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HVCTL_NS = "urn:rblock:hvctl:1"
PASSTHROUGH_PCI_SLOT_FIRST = 0x18
DISK_TARGETS = tuple(f"vd{chr(ord('a') + i)}" for i in range(26))
DISK_FORMS = ("native", "passthrough")

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("hvctl", HVCTL_NS)


@dataclass(frozen=True)
class NbdDisk:
    resource: str  # also the NBD export name
    host: str
    port: int

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.resource}"


@dataclass(frozen=True)
class DomainSpec:
    """What the controller decided for one start of a guest on one node."""

    guest: GuestConfig
    node: str
    domain_type: str  # "kvm" or "qemu"
    disks: tuple[NbdDisk, ...]
    disk_form: str = "native"

    def __post_init__(self) -> None:
        assert self.domain_type in ("kvm", "qemu"), self.domain_type
        assert self.disk_form in DISK_FORMS, self.disk_form
        assert [d.resource for d in self.disks] == list(self.guest.disks)
        assert len(self.disks) <= len(DISK_TARGETS)


@dataclass
class DomainInfo:
    """What a domain XML says, as far as hvctl cares (parse_xml)."""

    name: str
    uuid: str
    domain_type: str
    memory_bytes: int
    vcpus: int
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot_dev: str | None = None
    console_log: str | None = None
    managed: bool = False  # hvctl's metadata is present
    node: str | None = None
    disk_uris: dict[str, str] = field(default_factory=dict)  # resource -> NBD URI (metadata)
    disks: list[dict] = field(default_factory=list)  # resource, host, port, target, cache, ...
    interfaces: list[dict] = field(default_factory=list)
    graphics: list[dict] = field(default_factory=list)  # type, listen, port (-1: not yet)
    video: str | None = None  # the video model, e.g. "vga"


def build_xml(spec: DomainSpec) -> str:
    g = spec.guest
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = g.name
    ET.SubElement(dom, "uuid").text = g.uuid
    ET.SubElement(dom, "description").text = (
        f"hvctl guest {g.name}: disks {', '.join(g.disks)} (rblock); edit {g.source}, not this")
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{HVCTL_NS}}}guest",
                         node=spec.node, config=str(g.source))
    for d in spec.disks:
        ET.SubElement(meta, f"{{{HVCTL_NS}}}disk", resource=d.resource, uri=d.uri)
    ET.SubElement(dom, "memory", unit="KiB").text = str(g.memory_bytes // 1024)
    ET.SubElement(dom, "vcpu").text = str(g.vcpus)

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if g.kernel is not None:
        ET.SubElement(os_el, "kernel").text = str(g.kernel)
        if g.initrd is not None:
            ET.SubElement(os_el, "initrd").text = str(g.initrd)
        if g.cmdline is not None:
            ET.SubElement(os_el, "cmdline").text = g.cmdline
    elif spec.disk_form == "native":
        ET.SubElement(os_el, "boot", dev="hd")  # passthrough disks carry a bootindex instead

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.domain_type == "kvm":
        # A cold move may land on another CPU model; the guest boots afresh there.
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    if spec.disk_form == "native":
        for target, d in zip(DISK_TARGETS, spec.disks, strict=False):
            _native_disk(devices, d, target, g.reconnect_delay_s)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(g.console_log), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    if g.network is not None:
        n = g.network
        iface = ET.SubElement(devices, "interface", type=n.type)
        ET.SubElement(iface, "mac", address=n.mac)
        if n.type == "bridge":
            ET.SubElement(iface, "source", bridge=n.source or "")
        elif n.type == "network":
            ET.SubElement(iface, "source", network=n.source or "")
        ET.SubElement(iface, "model", type=n.model)
    ET.SubElement(devices, "memballoon", model="none")
    if g.graphics is not None:
        _graphics(devices, g.graphics.address(spec.node))
    else:
        # No USB controller: nothing of ours uses it, and probing it costs a TCG guest's
        # boot ~0.3 s. A display's tablet wants it (_graphics).
        ET.SubElement(devices, "controller", type="usb", model="none")
    if spec.disk_form == "passthrough":
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for i, d in enumerate(spec.disks):
            for arg in _passthrough_args(d, i, g.reconnect_delay_s, boot=g.kernel is None):
                ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _graphics(devices: ET.Element, address: str) -> None:
    ET.SubElement(devices, "controller", type="usb", model="qemu-xhci")
    ET.SubElement(devices, "input", type="tablet", bus="usb")
    gfx = ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes",
                        listen=address)
    ET.SubElement(gfx, "listen", type="address", address=address)
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="vga", vram="16384", heads="1", primary="yes")


def _native_disk(devices: ET.Element, d: NbdDisk, target: str, reconnect_delay_s: int) -> None:
    disk = ET.SubElement(devices, "disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", discard="unmap")
    src = ET.SubElement(disk, "source", protocol="nbd", name=d.resource)
    ET.SubElement(src, "host", name=d.host, port=str(d.port))
    if reconnect_delay_s:
        ET.SubElement(src, "reconnect", delay=str(reconnect_delay_s))
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(disk, "serial").text = d.resource[:20]  # /dev/disk/by-id names it


def _passthrough_args(d: NbdDisk, index: int, reconnect_delay_s: int, boot: bool) -> list[str]:
    node = f"hvctl-d{index}"
    blockdev = {
        "driver": "nbd", "node-name": node, "export": d.resource,
        "server": {"type": "inet", "host": d.host, "port": str(d.port)},
        "reconnect-delay": reconnect_delay_s,
        "cache": {"direct": True, "no-flush": False}, "discard": "unmap",
    }
    device = {"driver": "virtio-blk-pci", "drive": node, "id": f"hvctl-{DISK_TARGETS[index]}",
              "addr": hex(PASSTHROUGH_PCI_SLOT_FIRST + index), "serial": d.resource[:20]}
    if boot and index == 0:
        device["bootindex"] = 1
    return ["-blockdev", json.dumps(blockdev, separators=(",", ":")),
            "-device", json.dumps(device, separators=(",", ":"))]


def has_native_reconnect(xml: str) -> bool:
    """Whether libvirt kept `<reconnect>` on every NBD disk of a defined domain."""
    root = ET.fromstring(xml)
    sources = root.findall("./devices/disk[@type='network']/source[@protocol='nbd']")
    return bool(sources) and all(s.find("reconnect") is not None for s in sources)


def parse_xml(xml: str) -> DomainInfo:
    root = ET.fromstring(xml)
    mem = root.find("memory")
    assert mem is not None
    info = DomainInfo(
        name=_text(root, "name") or "", uuid=_text(root, "uuid") or "",
        domain_type=root.get("type", ""), memory_bytes=_kib(mem) * 1024,
        vcpus=int(_text(root, "vcpu") or 1),
        kernel=_text(root, "os/kernel"), initrd=_text(root, "os/initrd"),
        cmdline=_text(root, "os/cmdline"),
    )
    boot = root.find("os/boot")
    info.boot_dev = boot.get("dev") if boot is not None else None
    log = root.find("devices/serial/log")
    info.console_log = log.get("file") if log is not None else None
    meta = root.find(f"metadata/{{{HVCTL_NS}}}guest")
    if meta is not None:
        info.managed = True
        info.node = meta.get("node")
        info.disk_uris = {d.get("resource", ""): d.get("uri", "")
                          for d in meta.findall(f"{{{HVCTL_NS}}}disk")}
    for disk in root.findall("devices/disk"):
        src = disk.find("source")
        host = src.find("host") if src is not None else None
        drv = disk.find("driver")
        tgt = disk.find("target")
        rec = src.find("reconnect") if src is not None else None
        info.disks.append({
            "form": "native", "type": disk.get("type"),
            "protocol": src.get("protocol") if src is not None else None,
            "resource": src.get("name") if src is not None else None,
            "host": host.get("name") if host is not None else None,
            "port": int(host.get("port", 0)) if host is not None else None,
            "target": tgt.get("dev") if tgt is not None else None,
            "bus": tgt.get("bus") if tgt is not None else None,
            "cache": drv.get("cache") if drv is not None else None,
            "discard": drv.get("discard") if drv is not None else None,
            "reconnect_delay_s": int(rec.get("delay", 0)) if rec is not None else 0,
        })
    args = [a.get("value", "") for a in root.findall(f"{{{QEMU_NS}}}commandline/"
                                                     f"{{{QEMU_NS}}}arg")]
    devices = {}
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "-device":
            dev = json.loads(value)
            devices[dev.get("drive")] = dev
    for flag, value in zip(args, args[1:], strict=False):
        if flag != "-blockdev":
            continue
        bd = json.loads(value)
        dev = devices.get(bd.get("node-name"), {})
        cache = bd.get("cache", {})
        info.disks.append({
            "form": "passthrough", "type": "network", "protocol": bd.get("driver"),
            "resource": bd.get("export"), "host": bd.get("server", {}).get("host"),
            "port": int(bd.get("server", {}).get("port", 0)),
            "target": str(dev.get("id", "")).removeprefix("hvctl-") or None,
            "bus": "virtio" if dev.get("driver") == "virtio-blk-pci" else dev.get("driver"),
            "cache": "none" if cache.get("direct") and not cache.get("no-flush") else "other",
            "discard": bd.get("discard"),
            "reconnect_delay_s": int(bd.get("reconnect-delay", 0)),
            "bootindex": dev.get("bootindex"),
        })
    for iface in root.findall("devices/interface"):
        mac = iface.find("mac")
        src = iface.find("source")
        model = iface.find("model")
        info.interfaces.append({
            "type": iface.get("type"), "mac": mac.get("address") if mac is not None else None,
            "source": (src.get("bridge") or src.get("network")) if src is not None else None,
            "model": model.get("type") if model is not None else None,
        })
    for gfx in root.findall("devices/graphics"):
        lis = gfx.find("listen[@type='address']")
        info.graphics.append({
            "type": gfx.get("type"),
            "listen": lis.get("address") if lis is not None else gfx.get("listen"),
            "port": int(gfx.get("port", -1)), "autoport": gfx.get("autoport") == "yes"})
    model = root.find("devices/video/model")
    info.video = model.get("type") if model is not None else None
    return info


def _text(root: ET.Element, path: str) -> str | None:
    el = root.find(path)
    return el.text if el is not None else None


def _kib(mem: ET.Element) -> int:
    scale = {"b": 1 / 1024, "bytes": 1 / 1024, "kib": 1, "k": 1, "mib": 1024, "m": 1024,
             "gib": 1 << 20, "g": 1 << 20}[mem.get("unit", "KiB").lower()]
    return int(int(mem.text or 0) * scale)
