"""One node's libvirt, for the controller: connection, domains, lifecycle events.

Libvirt's events reach us through libvirtaio on the running asyncio loop (no polling): a
lifecycle callback per connection feeds the futures of whoever waits for a domain to start
or stop, and the queues of `hvctl events` subscribers. libvirt allows one event loop
implementation per process, so `register_event_loop` binds the first loop that asks and
refuses another one.

libvirt-python calls block, but on a local or LAN connection they take milliseconds; the
remote driver does its own socket I/O inside a call, so calling from the loop thread cannot
deadlock with the event dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import libvirt
import libvirtaio

from hvctl.domain import DomainSpec, build_xml, has_native_reconnect, parse_xml

log = logging.getLogger("hvctl.virt")

KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
EVENT_QUEUE_MAX = 1000  # per subscriber; a slow reader loses the oldest events

# libvirt prints every error on stderr unless told otherwise; ours carry them in exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down", libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "Defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "Undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "Started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "Suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "Resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "Stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "Shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED:
    "PMSuspended", libvirt.VIR_DOMAIN_EVENT_CRASHED: "Crashed",
}
STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from snapshot",
}


class VirtError(Exception):
    """Libvirt on a node failed or is out of reach; the message names node and fix."""


def register_event_loop() -> None:
    """Route libvirt's events through the running asyncio loop (once per process)."""
    impl = libvirtaio.getCurrentImpl()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if impl is None:
            raise RuntimeError("hvctl's libvirt connections need a running asyncio loop the "
                               "first time") from None
        return  # a synchronous call between awaits of the registered loop
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    elif impl.loop is not loop:
        raise RuntimeError("libvirt events are bound to another asyncio loop in this process; "
                           "run every hvctl controller on one loop")


@dataclass(frozen=True)
class LifecycleEvent:
    node: str
    domain: str
    event: str  # Started, Stopped, ...
    detail: int
    code: int

    def to_json(self) -> dict:
        return {"node": self.node, "guest": self.domain, "event": self.event,
                "detail": STOPPED_DETAILS.get(self.detail, str(self.detail))
                if self.code == libvirt.VIR_DOMAIN_EVENT_STOPPED else str(self.detail)}


class NodeVirt:
    """Libvirt of one node. Opens lazily; every failure is a VirtError naming node and fix."""

    def __init__(self, node: str, uri: str, config_path: str):
        self.node = node
        self.uri = uri
        self.config_path = config_path
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._waiters: list[tuple[str, Callable[[LifecycleEvent], bool], asyncio.Future]] = []
        self._subscribers: set[asyncio.Queue] = set()

    # --- connection ---------------------------------------------------------------------------

    def conn(self) -> libvirt.virConnect:
        if self._conn is not None and self._conn.isAlive():
            return self._conn
        register_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise VirtError(f"node {self.node}: cannot reach libvirtd at {self.uri}: "
                            f"{_msg(e)}; start libvirtd on {self.node} or fix "
                            f"node.{self.node}.libvirt in {self.config_path}") from None
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        except libvirt.libvirtError:
            pass  # local drivers (test://) have no keepalive; nothing to detect there
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._callback_id is not None:
                conn.domainEventDeregisterAny(self._callback_id)
            conn.close()
        except libvirt.libvirtError:
            pass
        self._callback_id = None

    def info(self) -> dict:
        c = self.conn()
        try:
            return {"hostname": c.getHostname(), "libvirt_version": _version(c.getLibVersion()),
                    "hypervisor_version": _version(c.getVersion())}
        except libvirt.libvirtError as e:
            raise self._error("asking for its version", e) from None

    # --- domains ------------------------------------------------------------------------------

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._error(f"looking up {name}", e) from None

    def names(self) -> list[str]:
        try:
            return sorted(d.name() for d in self.conn().listAllDomains())
        except libvirt.libvirtError as e:
            raise self._error("listing domains", e) from None

    @staticmethod
    def state(dom: libvirt.virDomain) -> str:
        try:
            return STATE_NAMES.get(dom.state()[0], "unknown")
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "undefined"
            raise

    def define(self, spec: DomainSpec) -> tuple[libvirt.virDomain, DomainSpec]:
        """Define (or redefine) the guest's domain. If this libvirt drops `<reconnect>` on NBD
        disks, redefine it in the passthrough form (hvctl/domain.py says why)."""
        try:
            dom = self.conn().defineXML(build_xml(spec))
            if spec.disk_form == "native" and spec.guest.reconnect_delay_s and \
                    not has_native_reconnect(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
                log.info("%s: libvirt %s drops <reconnect> on NBD disks; passing them to QEMU "
                         "directly", self.node, self.info()["libvirt_version"])
                spec = DomainSpec(spec.guest, spec.node, spec.domain_type, spec.disks,
                                  disk_form="passthrough")
                dom = self.conn().defineXML(build_xml(spec))
            return dom, spec
        except libvirt.libvirtError as e:
            raise self._error(f"defining {spec.guest.name}", e) from None

    def undefine(self, dom: libvirt.virDomain) -> None:
        try:
            dom.undefine()  # hvctl guests boot BIOS or a kernel: no NVRAM to keep or drop
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise self._error(f"undefining {dom.name()}", e) from None

    async def start(self, dom: libvirt.virDomain, timeout_s: float) -> None:
        name = dom.name()
        waiter = self.wait_for(name, lambda ev: ev.code == libvirt.VIR_DOMAIN_EVENT_STARTED)
        try:
            dom.create()
        except libvirt.libvirtError as e:
            self.drop(waiter)
            raise self._error(f"starting {name}", e) from None
        await self.wait(waiter, timeout_s, f"{name} to start")

    async def shutdown(self, dom: libvirt.virDomain, timeout_s: float) -> bool:
        """ACPI power button; True if the guest powered off within TIMEOUT_S."""
        name = dom.name()
        waiter = self.wait_for(name, _is_stopped)
        try:
            if not dom.isActive():
                self.drop(waiter)
                return True
            dom.shutdown()  # no guest agent is configured, so QEMU presses the ACPI button
        except libvirt.libvirtError as e:
            self.drop(waiter)
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                return True
            raise self._error(f"shutting {name} down", e) from None
        try:
            await self.wait(waiter, timeout_s, f"{name} to power off")
        except VirtError:
            return False
        return True

    async def destroy(self, dom: libvirt.virDomain, timeout_s: float = 30.0) -> None:
        name = dom.name()
        waiter = self.wait_for(name, _is_stopped)
        try:
            if not dom.isActive():
                self.drop(waiter)
                return
            dom.destroy()
        except libvirt.libvirtError as e:
            self.drop(waiter)
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return
            raise self._error(f"destroying {name}", e) from None
        await self.wait(waiter, timeout_s, f"{name} to stop")

    async def kill(self, dom: libvirt.virDomain, uuid: str,
                   timeout_s: float = 30.0) -> list[int]:
        """Pull the plug: SIGKILL the domain's QEMU at once, then let libvirt clean up.
        libvirt's destroy sends SIGTERM and waits up to 10 s before SIGKILL, and a QEMU
        whose NBD disk holds writes (rblock without its lease) spends all of that flushing
        (seen: 10.3 s). Only for a libvirtd on this host: the QEMU is found in /proc by the
        guest's UUID on its command line, in this process's network namespace (one host)."""
        pids = kill_local_qemu(uuid)
        await self.destroy(dom, timeout_s)
        return pids

    # --- events -------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        self.conn()
        q: asyncio.Queue = asyncio.Queue(EVENT_QUEUE_MAX)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, _opaque: object) -> None:
        ev = LifecycleEvent(self.node, dom.name(), EVENT_NAMES.get(event, str(event)), detail,
                            event)
        log.debug("%s: %s %s (%d)", self.node, ev.domain, ev.event, detail)
        for name, match, fut in list(self._waiters):
            if name == ev.domain and not fut.done() and match(ev):
                fut.set_result(ev)
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(ev)

    def wait_for(self, name: str, match: Callable[[LifecycleEvent], bool]) -> tuple:
        """Register interest BEFORE acting, so an event that comes quickly is not missed."""
        self.conn()
        entry = (name, match, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        return entry

    def drop(self, entry: tuple) -> None:
        if entry in self._waiters:
            self._waiters.remove(entry)

    async def wait(self, entry: tuple, timeout_s: float, what: str) -> LifecycleEvent:
        try:
            return await asyncio.wait_for(entry[2], timeout_s)
        except TimeoutError:
            raise VirtError(f"node {self.node}: timed out after {timeout_s:g} s waiting for "
                            f"{what}") from None
        finally:
            self.drop(entry)

    def _error(self, what: str, e: libvirt.libvirtError) -> VirtError:
        return VirtError(f"node {self.node}: libvirt failed {what}: {_msg(e)}")


def local_qemu_pids(uuid: str) -> list[int]:
    """QEMU processes of the domain with UUID on this host (this network namespace)."""
    mine = os.stat("/proc/self/ns/net")
    needle = b"\0-uuid\0" + uuid.encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = b"\0" + f.read()
            if needle not in cmd:
                continue
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino):
            found.append(int(entry))
    return found


def kill_local_qemu(uuid: str) -> list[int]:
    """SIGKILL the QEMU of the domain with UUID on this host; the PIDs it had."""
    pids = local_qemu_pids(uuid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _is_stopped(ev: LifecycleEvent) -> bool:
    return ev.code in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED)


def _msg(e: libvirt.libvirtError) -> str:
    return (e.get_error_message() or str(e)).strip()


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def describe(dom: libvirt.virDomain) -> dict:
    """State plus what the domain's XML says, for status output."""
    info = parse_xml(dom.XMLDesc(0))
    return {"state": NodeVirt.state(dom), "info": info}
