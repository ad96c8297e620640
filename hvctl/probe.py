"""Which domain type a node can run: `kvm` where hardware virtualization really works, else
`qemu` (TCG, software emulation: slower, but it runs anywhere).

Why a boot test and not just "/dev/kvm exists": on nested or emulated hosts /dev/kvm can open,
create VMs and even run a few real-mode instructions, while a real kernel hangs early in
boot (seen on this project's CI machines). So the probe asks the node's libvirt for the kvm
domain capabilities and then boots the node's own kernel (`probe_kernel`, default /vmlinuz)
in a transient 'kvm' domain with no root disk: a working KVM reaches the "cannot mount root"
panic and, with panic=-1 and on_reboot=destroy, stops within a second or two. A domain still
running after PROBE_TIMEOUT_S means KVM cannot run guests there.

Results are cached per node in STATE_DIR/probe.json, keyed by the libvirt URI and
invalidated when the node's hostname or libvirt version changes or after PROBE_CACHE_MAX_AGE_S.
`hvctl node probe` forces a fresh probe; `domain_type = "kvm"|"qemu"` skips it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from hvctl.virt import NodeVirt, VirtError

log = logging.getLogger("hvctl.probe")

PROBE_TIMEOUT_S = 10.0
PROBE_MEMORY_MIB = 128
PROBE_CACHE_MAX_AGE_S = 7 * 24 * 3600
PROBE_DOMAIN_PREFIX = "hvctl-kvm-probe-"


@dataclass(frozen=True)
class ProbeResult:
    domain_type: str
    reason: str
    cached: bool = False


def probe_xml(name: str, kernel: str) -> str:
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(PROBE_MEMORY_MIB)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "kernel").text = kernel
    # No initrd, no disk: the kernel panics at "VFS: Unable to mount root fs", and panic=-1
    # reboots at once, which on_reboot=destroy turns into a stop we can wait for.
    ET.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1 root=/dev/hvctl-probe quiet"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


class Prober:
    def __init__(self, state_dir: Path, kernel: str):
        self.cache_path = state_dir / "probe.json"
        self.kernel = kernel

    async def domain_type(self, virt: NodeVirt, fresh: bool = False) -> ProbeResult:
        ident = virt.info()
        cache = self._load()
        entry = cache.get(virt.uri)
        if (not fresh and entry and entry.get("hostname") == ident["hostname"]
                and entry.get("libvirt_version") == ident["libvirt_version"]
                and time.time() - entry.get("time", 0) < PROBE_CACHE_MAX_AGE_S):
            return ProbeResult(entry["domain_type"], entry["reason"], cached=True)
        result = await self._probe(virt)
        log.info("node %s: domain type %s (%s)", virt.node, result.domain_type, result.reason)
        cache[virt.uri] = {"domain_type": result.domain_type, "reason": result.reason,
                           "time": time.time(), **ident}
        self._save(cache)
        return result

    def cached(self, virt: NodeVirt) -> ProbeResult | None:
        entry = self._load().get(virt.uri)
        return ProbeResult(entry["domain_type"], entry["reason"], True) if entry else None

    async def _probe(self, virt: NodeVirt) -> ProbeResult:
        conn = virt.conn()
        try:
            conn.getDomainCapabilities(None, "x86_64", None, "kvm")
        except libvirt.libvirtError as e:
            return ProbeResult("qemu", f"libvirt on {virt.node} offers no kvm: "
                                       f"{(e.get_error_message() or str(e)).strip()}")
        name = f"{PROBE_DOMAIN_PREFIX}{os.getpid()}"
        stale = virt.lookup(name)
        if stale is not None:
            await virt.destroy(stale)
        started = time.monotonic()
        try:
            dom = conn.createXML(probe_xml(name, self.kernel), libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as e:
            return ProbeResult("qemu", f"a kvm test guest did not start on {virt.node}: "
                                       f"{(e.get_error_message() or str(e)).strip()}")
        # Started paused, so the stop cannot come before we listen for it.
        waiter = virt.wait_for(name, lambda ev: ev.code == libvirt.VIR_DOMAIN_EVENT_STOPPED)
        try:
            dom.resume()
            await virt.wait(waiter, PROBE_TIMEOUT_S, "the kvm test guest")
        except VirtError:
            try:
                await virt.destroy(dom)
            except VirtError:
                pass
            return ProbeResult("qemu", f"a kvm test guest booting {self.kernel} did not finish "
                                       f"within {PROBE_TIMEOUT_S:g} s: /dev/kvm on {virt.node} "
                                       f"cannot run guests")
        except libvirt.libvirtError as e:
            virt.drop(waiter)
            return ProbeResult("qemu", f"the kvm test guest failed on {virt.node}: "
                                       f"{(e.get_error_message() or str(e)).strip()}")
        return ProbeResult("kvm", f"a kvm test guest booted {self.kernel} in "
                                  f"{time.monotonic() - started:.1f} s")

    def _load(self) -> dict:
        try:
            data = json.loads(self.cache_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # no cache, or a broken one: probe again

    def _save(self, cache: dict) -> None:
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=2))
            os.replace(tmp, self.cache_path)
        except OSError as e:
            log.warning("cannot cache the probe result in %s: %s", self.cache_path, e)
