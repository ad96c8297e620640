"""The guest lifecycle across the cluster: where a guest runs, start, stop, move.

Theory of operation
-------------------
Truth lives on the nodes, never in hvctl: where a guest runs is asked of every node's
libvirt each time (`locate`), and which node may write a disk is rblock's role (Primary),
asked of each node's rblock control API. hvctl keeps no state of its own besides the probe
cache.

A guest runs on exactly one node, the one where all its resources are Primary:

    start G on N:  refuse if G is active anywhere (or a node cannot be asked, unless --force)
                   -> resources Secondary wherever else they are Primary (no guest there)
                   -> resources Primary on N (rblock refuses outdated data, a primary peer)
                   -> define the domain on N (NBD disks at N's export) -> start, wait for the
                      Started event -> undefine stale copies of G on other nodes.
                   Any failure undoes what this start did: the domain is undefined again,
                   resources it promoted go back to Secondary. No half-defined guests.
    stop G:        ACPI power button, wait for the Stopped event up to stop_timeout_s, then
                   destroy -> resources Secondary on that node. Not running anywhere: its
                   resources Secondary wherever still Primary (nothing to do: NothingDone).
                   A node whose libvirt cannot be asked refuses that, unless --force (the
                   user is sure the guest is down there, like Pacemaker's cleanup of a
                   resource on a lost node); even then a resource Primary on such a node is
                   left alone, and nothing changes, while an NBD client (a QEMU) holds it.
    move G to N:   stop G where it runs -> start G on N; if that fails, start it back where it
                   was. (A cold move; live migration is a later step.)

The domain stays defined, inactive, on the node where the guest last ran, so `virsh list
--all` there shows it; its XML is rebuilt from the config at every start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import libvirt

from hvctl.config import GuestConfig, HvConfig
from hvctl.domain import DomainSpec, NbdDisk, parse_xml
from hvctl.probe import Prober, ProbeResult
from hvctl.virt import EVENT_QUEUE_MAX, LifecycleEvent, NodeVirt, VirtError
from rblock.config import ConfigError
from rblock.control_client import ControlClient, ControlError

log = logging.getLogger("hvctl")

ACTIVE_STATES = ("running", "paused", "shutting-down", "crashed", "suspended", "unknown")
DEMOTE_RETRY_S = 10.0  # QEMU's NBD connections take a moment to close after it stops
DEMOTE_RETRY_INTERVAL_S = 0.2
START_TIMEOUT_S = 60.0
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class HvError(Exception):
    """A refused or failed command; the message says why and what to do."""


class NothingDone(HvError):
    """The command found nothing to do (a guest that is not running, not defined): it says so
    and exits 1, never 0 as if it had acted."""


@dataclass
class Placement:
    """Where a guest is, according to every node's libvirt."""

    guest: str
    states: dict[str, str] = field(default_factory=dict)  # node -> state (defined there)
    unreachable: dict[str, str] = field(default_factory=dict)  # node -> why
    foreign: list[str] = field(default_factory=list)  # nodes with a same-named unmanaged domain

    @property
    def active(self) -> list[str]:
        return [n for n, s in self.states.items() if s in ACTIVE_STATES]

    @property
    def defined(self) -> list[str]:
        return list(self.states)


class Controller:
    def __init__(self, cfg: HvConfig):
        self.cfg = cfg
        self.virts = {n: NodeVirt(n, cfg.hv_node(n), str(cfg.path)) for n in cfg.hv_nodes()}
        self.prober = Prober(cfg.state_dir, cfg.probe_kernel)

    def close(self) -> None:
        for v in self.virts.values():
            v.close()

    # --- lookups ------------------------------------------------------------------------------

    def virt(self, node: str) -> NodeVirt:
        self.cfg.cluster.node(node)  # ConfigError listing the nodes if unknown
        if node not in self.virts:
            self.cfg.hv_node(node)  # ConfigError: no libvirt URI, with the fix
        return self.virts[node]

    def control(self, node: str) -> ControlClient:
        return ControlClient(self.cfg.cluster.node(node).control)

    def locate(self, g: GuestConfig) -> Placement:
        p = Placement(g.name)
        for node, virt in self.virts.items():
            try:
                dom = virt.lookup(g.name)
                if dom is None:
                    continue
                if not parse_xml(dom.XMLDesc(0)).managed:
                    p.foreign.append(node)
                    continue
                p.states[node] = virt.state(dom)
            except (VirtError, libvirt.libvirtError) as e:
                p.unreachable[node] = str(e)
        return p

    async def roles(self, resource: str,
                    rblock: dict[str, dict | ControlError] | None = None) -> dict[str, dict]:
        """node -> that node's status of RESOURCE ({} if its rblock cannot be reached);
        RBLOCK: node -> its status (or the error asking), if the caller has them already."""
        out: dict[str, dict] = {}
        for node in self.cfg.cluster.resource(resource).nodes:
            if rblock is not None and node in rblock:
                st = rblock[node]
            else:
                try:
                    st = await self.control(node).status()
                except ControlError as e:
                    st = e
            if isinstance(st, ControlError):
                out[node] = {}
                continue
            out[node] = next((r for r in st["resources"] if r["name"] == resource), {})
        return out

    async def _role_here(self, node: str, resource: str) -> dict:
        try:
            st = await self.control(node).status()
        except ControlError as e:
            raise HvError(f"cannot reach rblock on {node}: {e}") from None
        return next((r for r in st["resources"] if r["name"] == resource), {})

    def nbd_disks(self, g: GuestConfig, node: str) -> tuple[NbdDisk, ...]:
        addr = self.cfg.cluster.node(node).nbd
        host = WILDCARD_HOSTS.get(addr.host, addr.host)  # the guest runs on that node
        return tuple(NbdDisk(r, host, addr.port) for r in g.disks)

    async def domain_type(self, g: GuestConfig, node: str, fresh: bool = False) -> ProbeResult:
        if g.domain_type != "auto":
            return ProbeResult(g.domain_type, "set in the config")
        return await self.prober.domain_type(self.virt(node), fresh=fresh)

    async def probe(self, node: str) -> ProbeResult:
        """Probe NODE's domain type afresh (and cache it)."""
        return await self.prober.domain_type(self.virt(node), fresh=True)

    def pick_node(self, g: GuestConfig, on: str | None, p: Placement | None = None) -> str:
        if on is not None:
            self.virt(on)
            missing = [r for r in g.disks if r not in self.cfg.cluster.node(on).disks]
            if missing:
                raise HvError(f"node {on} has no disk for {', '.join(missing)} of guest "
                              f"{g.name}; run it on one of: {', '.join(self.cfg.nodes_for(g))}")
            return on
        if p is not None and p.defined:
            return p.defined[0]
        if g.node is not None:
            return g.node
        candidates = self.cfg.nodes_for(g)
        if not candidates:
            raise HvError(f"no node with a libvirt URI holds every disk of {g.name} "
                          f"({', '.join(g.disks)}); add libvirt = \"qemu:///system\" to those "
                          f"nodes in {self.cfg.path}")
        return candidates[0]

    # --- start --------------------------------------------------------------------------------

    async def start(self, name: str, on: str | None = None, force: bool = False) -> str:
        g = self.cfg.guest(name)
        p = self.locate(g)
        if p.active:
            raise HvError(f"guest {name} already runs on {', '.join(p.active)}; stop it first "
                          f"or move it ('hvctl guest move {name} NODE')")
        node = self.pick_node(g, on, p)
        self._refuse_unsure(p, force, f"start {name}")
        if node in p.foreign:
            raise HvError(f"node {node} has a domain named {name} that hvctl does not manage; "
                          f"rename or undefine it there first")
        await self._start_on(g, node, p)
        return f"{name} started on {node}"

    def _refuse_unsure(self, p: Placement, force: bool, what: str) -> None:
        if p.unreachable and not force:
            nodes = ", ".join(p.unreachable)
            why = "; ".join(p.unreachable.values())
            they = "it" if len(p.unreachable) == 1 else "they"
            raise HvError(f"cannot {what}: cannot ask {nodes} whether {p.guest} runs there "
                          f"({why}); bring {they} back, or pass --force if you are sure "
                          f"{p.guest} is not running on {nodes}")

    async def start_here(self, g: GuestConfig, node: str) -> None:
        """The HA agent's start on its own node: promote there only (the planner made sure
        no other node runs it; rblock refuses if another is still Primary), then define and
        start. Never touches another node, which may be cut off."""
        await self._start_on(g, node, Placement(g.name), local_only=True)

    async def stop_here(self, g: GuestConfig, node: str, hard: bool) -> str:
        """The HA agent's stop on its own node (ACPI first unless HARD: then its QEMU is
        SIGKILLed, hvctl/virt.py says why), disks Secondary."""
        return await self._power_off(g, node, None, hard, kill=hard)

    async def release_here(self, node: str, resource: str) -> None:
        """The HA agent: RESOURCE Secondary on its own node."""
        await self._demote(node, resource)

    async def _start_on(self, g: GuestConfig, node: str, p: Placement,
                        local_only: bool = False) -> None:
        virt = self.virt(node)
        try:
            virt.conn()  # a clear error now, before any resource changes role
        except VirtError as e:
            raise HvError(f"cannot start {g.name} on {node}: {e}") from None
        promoted = await self._take_resources(g, node, local_only)
        dom = None
        try:
            dtype = await self.domain_type(g, node)
            spec = DomainSpec(g, node, dtype.domain_type, self.nbd_disks(g, node))
            g.console_log.parent.mkdir(parents=True, exist_ok=True)
            dom, spec = virt.define(spec)
            log.info("%s: defined on %s (%s, %s disks; %s)", g.name, node, spec.domain_type,
                     spec.disk_form, dtype.reason)
            await virt.start(dom, START_TIMEOUT_S)
        except BaseException as e:
            if dom is not None:
                try:
                    await virt.destroy(dom)
                    virt.undefine(dom)
                except VirtError as e2:
                    log.error("%s: could not undo the definition on %s: %s", g.name, node, e2)
            await self._release(g, node, promoted)
            if isinstance(e, (VirtError, ConfigError)):
                raise HvError(f"cannot start {g.name} on {node}: {e}") from None
            raise
        self._undefine_elsewhere(g.name, node, p)

    def _undefine_elsewhere(self, name: str, node: str, p: Placement) -> None:
        """A guest is defined only where it runs or last ran: the copies on other nodes are
        stale (their XML points at those nodes' exports)."""
        for other in p.defined:
            if other == node:
                continue
            try:
                stale = self.virts[other].lookup(name)
                if stale is not None and self.virts[other].state(stale) == "stopped":
                    self.virts[other].undefine(stale)
            except VirtError as e:
                log.warning("%s: a stale definition stays on %s: %s", name, other, e)

    async def _take_resources(self, g: GuestConfig, node: str,
                              local_only: bool = False) -> list[str]:
        """Every resource of G Primary on NODE; returns those this call promoted.
        LOCAL_ONLY: ask no other node (demote none)."""
        promoted: list[str] = []
        try:
            for r in g.disks:
                roles = ({node: await self._role_here(node, r)} if local_only
                         else await self.roles(r))
                if roles.get(node, {}).get("role") == "Primary":
                    continue
                for other, st in roles.items():
                    if other != node and st.get("role") == "Primary":
                        await self._demote(other, r)  # no guest of ours runs there: checked
                try:
                    msg = await self.control(node).action(r, "primary")
                except ControlError as e:
                    raise HvError(f"cannot start {g.name} on {node}: resource {r}: {e}") \
                        from None
                log.info("%s: %s on %s: %s", g.name, r, node, msg)
                promoted.append(r)
        except BaseException:
            await self._release(g, node, promoted)
            raise
        return promoted

    async def _release(self, g: GuestConfig, node: str, resources: list[str]) -> list[str]:
        """Resources back to Secondary on NODE; returns what could not be demoted."""
        failed = []
        for r in resources:
            try:
                await self._demote(node, r)
            except HvError as e:
                log.error("%s: %s", g.name, e)
                failed.append(f"{r}: {e}")
        return failed

    async def _demote(self, node: str, resource: str) -> None:
        deadline = asyncio.get_running_loop().time() + DEMOTE_RETRY_S
        while True:
            try:
                await self.control(node).action(resource, "secondary")
                return
            except ControlError as e:
                # A stopped QEMU's NBD connection may still be closing: rblock counts it.
                if "NBD client" not in str(e) or asyncio.get_running_loop().time() > deadline:
                    raise HvError(f"cannot make {resource} secondary on {node}: {e}") from None
            await asyncio.sleep(DEMOTE_RETRY_INTERVAL_S)

    # --- stop, destroy --------------------------------------------------------------------------

    async def stop(self, name: str, timeout_s: float | None = None, hard: bool = False,
                   force: bool = False) -> str:
        """Stop NAME where it runs. Where it runs on no node that answers: its disks Secondary
        wherever they are still Primary. If some node's libvirt cannot be asked, that needs
        FORCE (the user is sure it is down there), and even then a disk is left alone on such
        a node while an NBD client (a QEMU) holds it there."""
        g = self.cfg.guest(name)
        p = self.locate(g)
        verb = "destroy" if hard else "stop"
        if len(p.active) > 1:
            raise HvError(f"guest {name} is active on {', '.join(p.active)} at once; destroy it "
                          f"on all but one node with virsh and check its disks")
        if p.active:
            node = p.active[0]
            how = await self._power_off(g, node, timeout_s, hard)
            return f"{name} {how} on {node}; {', '.join(g.disks)} Secondary"
        if p.unreachable and not force:
            nodes = ", ".join(p.unreachable)
            why = "; ".join(p.unreachable.values())
            raise HvError(f"cannot {verb} {name}: it runs on no node that answers, and "
                          f"{nodes} cannot be asked ({why}); bring {nodes} back, or pass "
                          f"--force if you are sure {name} is not running there (its disks "
                          f"are then made Secondary wherever no QEMU holds them)")
        done, notes = await self._release_where_primary(g, set(p.unreachable))
        where = (f"; it is defined, stopped, on {', '.join(p.defined)}" if p.defined else
                 "; it is not defined on any node")
        if p.unreachable:
            where += f" (not asked: {', '.join(p.unreachable)}, which you said is down)"
        tail = "".join(f"; {n}" for n in notes)
        if not done:
            raise NothingDone(f"{name} is not running{where}; nothing to {verb}{tail}")
        return f"{name} is not running{where}; {', '.join(done)}{tail}"

    async def _power_off(self, g: GuestConfig, node: str, timeout_s: float | None,
                         hard: bool, kill: bool = False) -> str:
        """Stop G on NODE (ACPI first unless HARD), then its resources Secondary there.
        Returns how it went, for the user."""
        virt = self.virt(node)
        dom = virt.lookup(g.name)
        how = "destroyed"
        if dom is not None:
            if not hard:
                wait_s = g.stop_timeout_s if timeout_s is None else timeout_s
                if await virt.shutdown(dom, wait_s):
                    how = "shut down (ACPI)"
                else:
                    how = f"did not power off within {wait_s:g} s; destroyed"
                    log.warning("%s on %s %s", g.name, node, how)
            if kill:
                await virt.kill(dom, g.uuid)
                how = "killed"
            else:
                await virt.destroy(dom)
        failed = await self._release(g, node, list(g.disks))
        if failed:
            raise HvError(f"{g.name} stopped on {node}, but " + "; ".join(failed))
        return how

    async def _release_where_primary(self, g: GuestConfig,
                                     unsure: set[str] = frozenset()) -> tuple[list[str],
                                                                                list[str]]:
        """A guest that is not running holds no resource Primary (it may have powered off by
        itself): hand them back. On an UNSURE node (its libvirt could not say whether the
        guest runs there) a resource with NBD clients is left Primary, and that refuses the
        whole call before anything changes: a QEMU may still be writing through it.
        Returns (what was done, notes on what could not be asked)."""
        todo: list[tuple[str, str]] = []
        notes: list[str] = []
        for r in g.disks:
            for node, st in (await self.roles(r)).items():
                if not st:
                    notes.append(f"rblock on {node} does not answer: {r} there is untouched")
                elif st.get("role") == "Primary":
                    todo.append((node, r))
        for node, r in todo:
            if node in unsure and (clients := await self._nbd_clients(node, r)):
                raise HvError(f"not forgetting {g.name} on {node}: {r} is Primary there with "
                              f"{clients} NBD client(s) attached, so {g.name} may still run on "
                              f"{node}; stop it there, or bring {node}'s libvirtd back and "
                              f"run 'hvctl guest stop {g.name}' again; nothing was changed")
        done = []
        for node, r in todo:
            await self._demote(node, r)
            done.append(f"{r} made Secondary on {node}")
        return done, notes

    async def _nbd_clients(self, node: str, resource: str) -> int:
        """NBD connections open to RESOURCE's export on NODE (its /metrics); an error counts
        as one, so an unsure answer never reads as 'no client'."""
        from rblock.control_client import summarize_metrics

        try:
            text = await self.control(node).metrics()
        except ControlError as e:
            log.warning("%s: cannot count NBD clients of %s: %s", node, resource, e)
            return 1
        figures = summarize_metrics(text)["resources"].get(resource, {})
        return int(figures.get("nbd_clients", 1))

    # --- move ---------------------------------------------------------------------------------

    async def move(self, name: str, to: str, timeout_s: float | None = None,
                   force: bool = False) -> str:
        g = self.cfg.guest(name)
        self.pick_node(g, to)  # validates the node for this guest
        p = self.locate(g)
        self._refuse_unsure(p, force, f"move {name}")
        if to in p.foreign:
            raise HvError(f"node {to} has a domain named {name} that hvctl does not manage; "
                          f"rename or undefine it there first")
        if p.active == [to]:
            raise HvError(f"guest {name} already runs on {to}")
        if not p.active:
            await self.define(name, to)
            return f"{name} was not running; now defined on {to} (start it with " \
                   f"'hvctl guest start {name}')"
        if len(p.active) > 1:
            raise HvError(f"guest {name} is active on {', '.join(p.active)} at once; destroy it "
                          f"on all but one node with virsh and check its disks")
        src = p.active[0]
        how = await self._power_off(g, src, timeout_s, hard=False)
        try:
            await self._start_on(g, to, self.locate(g))
        except HvError as e:
            try:
                await self._start_on(g, src, self.locate(g))
            except HvError as e2:
                raise HvError(f"{e}; starting it back on {src} failed too: {e2}") from None
            raise HvError(f"{e}; {name} runs on {src} again") from None
        return f"{name} moved from {src} to {to} ({how} on {src})"

    # --- define, undefine -----------------------------------------------------------------------

    async def define(self, name: str, on: str | None = None) -> str:
        g = self.cfg.guest(name)
        p = self.locate(g)
        node = self.pick_node(g, on, p)
        if p.active and p.active != [node]:
            raise HvError(f"guest {name} runs on {', '.join(p.active)}; move it instead")
        if node in p.foreign:
            raise HvError(f"node {node} has a domain named {name} that hvctl does not manage; "
                          f"rename or undefine it there first")
        dtype = await self.domain_type(g, node)
        _, spec = self.virt(node).define(DomainSpec(g, node, dtype.domain_type,
                                                    self.nbd_disks(g, node)))
        self._undefine_elsewhere(name, node, p)
        return f"{name} defined on {node} ({spec.domain_type}, {spec.disk_form} NBD disks)"

    async def undefine(self, name: str) -> str:
        g = self.cfg.guest(name)
        p = self.locate(g)
        if p.active:
            raise HvError(f"guest {name} runs on {', '.join(p.active)}; stop it first")
        note = f" ({', '.join(p.unreachable)} not reachable)" if p.unreachable else ""
        if not p.defined:
            raise NothingDone(f"{name} is not defined on any node{note}; nothing to undefine")
        for node in p.defined:
            dom = self.virts[node].lookup(name)
            if dom is not None:
                self.virts[node].undefine(dom)
        return f"{name} undefined on {', '.join(p.defined)}{note}"

    async def destroy(self, name: str, force: bool = False) -> str:
        return await self.stop(name, hard=True, force=force)

    # --- status ---------------------------------------------------------------------------------

    async def guest_status(self, name: str,
                           rblock: dict[str, dict | ControlError] | None = None) -> dict:
        g = self.cfg.guest(name)
        p = self.locate(g)
        if len(p.active) > 1:
            state, node = "conflict", None
        elif p.active:
            node = p.active[0]
            state = p.states[node]
        elif p.defined:
            node, state = None, "stopped"
        elif p.unreachable:
            node, state = None, "unknown"
        else:
            node, state = None, "undefined"
        where = node or (p.defined[0] if p.defined else None)
        info = None
        if where is not None:
            dom = self.virts[where].lookup(name)
            info = parse_xml(dom.XMLDesc(0)) if dom is not None else None
        disks = []
        for r in g.disks:
            roles = await self.roles(r, rblock)
            st = roles.get(where, {}) if where else {}
            uri = info.disk_uris.get(r) if info is not None else None
            disks.append({"resource": r, "nbd": uri, "role": st.get("role"),
                          "disk": st.get("disk"),
                          "primary_on": [n for n, s in roles.items() if s.get("role") ==
                                         "Primary"],
                          "unreachable": [n for n, s in roles.items() if not s]})
        return {"name": name, "state": state, "node": node,
                "domain_type": info.domain_type if info else None,
                "defined_on": p.defined, "memory_bytes": g.memory_bytes, "vcpus": g.vcpus,
                "console_log": str(g.console_log),
                "disk_form": ("passthrough" if info and info.disks and
                              info.disks[0]["form"] == "passthrough" else
                              "native" if info else None),
                "disks": disks, "unreachable": p.unreachable,
                "conflict_nodes": p.active if state == "conflict" else []}

    async def guest_list(self, rblock: dict[str, dict | ControlError] | None = None) -> list[dict]:
        return [await self.guest_status(n, rblock) for n in self.cfg.guests]

    async def node_status(self, name: str, probe: bool = False,
                          rblock: dict | ControlError | None = None) -> dict:
        """NAME's libvirt and rblock; RBLOCK: its rblock status (or the error asking for it)
        if the caller has it already."""
        node = self.cfg.cluster.node(name)
        out: dict = {"name": name, "libvirt": node.libvirt, "control": str(node.control),
                     "nbd": str(node.nbd), "reachable": False}
        if node.libvirt is not None:
            virt = self.virts[name]
            try:
                out.update(virt.info())
                out["reachable"] = True
                out["domains"] = virt.names()
                res = (await self.prober.domain_type(virt, fresh=True) if probe
                       else self.prober.cached(virt))
                out["domain_type"] = res.domain_type if res else None
                out["domain_type_reason"] = res.reason if res else "not probed yet"
                out["guests"] = {g: virt.state(d) for g in self.cfg.guests
                                 if (d := virt.lookup(g)) is not None}
            except VirtError as e:
                out["error"] = str(e)
        try:
            st = rblock if rblock is not None else await self.control(name).status()
            if isinstance(st, ControlError):
                raise st
            out["rblock"] = {r["name"]: {"role": r["role"], "disk": r["disk"]}
                             for r in st["resources"]}
        except ControlError as e:
            out["rblock"] = None
            out["rblock_error"] = str(e)
        return out

    async def node_list(self, rblock: dict[str, dict | ControlError] | None = None) -> list[dict]:
        return [await self.node_status(n, rblock=(rblock or {}).get(n))
                for n in self.cfg.cluster.nodes]

    async def events(self) -> AsyncIterator[LifecycleEvent]:
        queues = {}
        for n, v in self.virts.items():
            try:
                queues[n] = v.subscribe()
            except VirtError as e:
                if len(self.virts) == 1:
                    raise
                log.warning("%s; events from the other nodes follow", e)
        if not queues:
            raise HvError("no node's libvirt can be reached; nothing to follow")
        merged: asyncio.Queue = asyncio.Queue(EVENT_QUEUE_MAX)  # full: the pumps wait

        async def pump(q: asyncio.Queue) -> None:
            while True:
                await merged.put(await q.get())

        tasks = [asyncio.get_running_loop().create_task(pump(q)) for q in queues.values()]
        try:
            while True:
                yield await merged.get()
        finally:
            for t in tasks:
                t.cancel()
            for n, q in queues.items():
                self.virts[n].unsubscribe(q)
