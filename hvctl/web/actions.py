"""What the web API reads and does: the same functions the CLI calls (hvctl/controller.py,
hvctl/ha/ops.py), with one error type that carries the HTTP status.

Guest actions on an HA guest while agents run go through the agents (a request, then the
result), as `hvctl guest start|stop|move` do; otherwise the controller acts itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hvctl.config import HvConfig
from hvctl.controller import Controller, HvError
from hvctl.ha.history import failovers
from hvctl.ha.keys import Snapshot
from hvctl.ha.model import State
from hvctl.ha.ops import HaError, HaView, settled
from hvctl.virt import VirtError
from hvctl.web.safety import guest_safety
from rblock.config import ConfigError
from rblock.control_client import ControlError, summarize_metrics

ACTIONS = ("start", "stop", "destroy", "move")
# What the Storage page offers on a resource of a node (rblock's commands of the same name);
# a split brain is resolved with "resolve" (keep one side's data), never by these alone.
RESOURCE_ACTIONS = ("verify", "invalidate", "connect", "disconnect")
OVERVIEW_LOG_LINES = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def translate(e: Exception) -> ApiError:
    """The CLI's one-line message with the right status."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ConfigError):
        text = str(e)
        return ApiError(404 if "not in" in text or "not found" in text else 400, text)
    if isinstance(e, (HvError, HaError)):
        return ApiError(409, str(e))
    if isinstance(e, (VirtError, ControlError)):
        return ApiError(502, str(e))
    return ApiError(500, f"internal error: {e!r}")


class Backend:
    def __init__(self, cfg: HvConfig) -> None:
        self.cfg = cfg
        self.ctl = Controller(cfg)
        self.ha = HaView.open(cfg) if cfg.cluster.etcd is not None else None

    async def close(self) -> None:
        self.ctl.close()
        if self.ha is not None:
            await self.ha.close()

    # --- reads ------------------------------------------------------------------------------

    async def guests(self) -> list[dict]:
        return await self.ctl.guest_list()

    async def guest(self, name: str) -> dict:
        return await self.ctl.guest_status(name)

    async def nodes(self) -> list[dict]:
        return await self.ctl.node_list()

    async def ha_status(self) -> dict[str, Any]:
        if self.ha is None:
            return {"leader": None, "nodes": [], "guests": [],
                    "note": "no [cluster] etcd: HA is off"}
        try:
            return await self.ha.status()
        except HaError as e:
            return {"leader": None, "nodes": [], "guests": [], "note": str(e)}

    async def ha_log(self) -> list[dict]:
        if self.ha is None:
            return []
        return [d for _, d in await self.ha.log()]

    async def rblock_status(self) -> dict[str, dict | ControlError]:
        """node -> its rblock status, or the error asking for it: one request per node."""
        out: dict[str, dict | ControlError] = {}
        for node in self.cfg.cluster.nodes:
            try:
                out[node] = await self.ctl.control(node).status()
            except ControlError as e:
                out[node] = e
        return out

    async def metrics(self) -> dict[str, dict]:
        """node -> its counters (summarize_metrics of its /metrics), for the nodes that
        answer; the charts skip the others."""
        out: dict[str, dict] = {}
        for node in self.cfg.cluster.nodes:
            try:
                out[node] = summarize_metrics(await self.ctl.control(node).metrics())
            except ControlError:
                continue
        return out

    def storage(self, rblock: dict[str, dict | ControlError]) -> dict[str, dict[str, dict]]:
        """resource -> node -> that node's rblock status of it ({} if it cannot be asked)."""
        out: dict[str, dict[str, dict]] = {r: {} for r in self.cfg.cluster.resources}
        for node, st in rblock.items():
            have = {r["name"]: r for r in st["resources"]} if isinstance(st, dict) else {}
            for r in out:
                if node in self.cfg.cluster.resource(r).nodes:
                    out[r][node] = have.get(r, {})
        return out

    async def safe_to_stop(self, snap: Snapshot | None = None) -> dict[str, dict]:
        """node -> {"safe": bool, "text": plain words}: what would happen to its HA guests if
        it went down now (the planner's what-if)."""
        out: dict[str, dict] = {}
        if self.ha is None:
            return out
        for node in self.cfg.hv_nodes():
            try:
                w = await self.ha.what_if(node, snap)
            except (HaError, ConfigError) as e:
                out[node] = {"safe": False, "text": str(e)}
                continue
            if not w["guests"]:
                out[node] = {"safe": True, "text": "yes: no HA guest runs here"}
                continue
            stay = [g for g in w["guests"] if not g["to"]]
            parts = [f"{g['guest']} would move to {g['to']}" if g["to"] else
                     f"{g['guest']} would stop ({g['why']})" for g in w["guests"]]
            verdict = "no" if stay else "yes, with a failover"
            out[node] = {"safe": not stay, "text": f"{verdict}: " + "; ".join(parts)}
        return out

    async def maintenance(self, node: str, on: bool) -> str:
        self.cfg.hv_node(node)  # ConfigError (404) naming the nodes if unknown
        if self.ha is None:
            raise ApiError(409, "no [cluster] etcd: HA is off, and maintenance needs the agents")
        return await self.ha.maintenance(node, on)

    async def overview(self) -> dict[str, Any]:
        """Everything the page shows, from one rblock status per node and one HA snapshot."""
        rblock = await self.rblock_status()
        storage = self.storage(rblock)
        guests = await self.ctl.guest_list(rblock)
        for g in guests:
            g["safety"] = guest_safety(list(self.cfg.guest(g["name"]).disks), storage)
            g["graphics"] = getattr(self.cfg.guest(g["name"]).graphics, "type", None)
        nodes = await self.ctl.node_list(rblock)
        ha: dict[str, Any] = {"leader": None, "nodes": [], "guests": [],
                              "note": "no [cluster] etcd: HA is off"}
        ha_log: list[dict] = []
        etcd = None
        snap = None
        if self.ha is not None:
            try:
                snap = await self.ha.snapshot()
                ha = await self.ha.status(snap)
                ha_log = [d for _, d in await self.ha.log(snap=snap)]
            except HaError as e:
                ha["note"] = str(e)
            etcd = await self.ha.etcd_health()
        return {"guests": guests, "nodes": nodes, "ha": ha,
                "ha_log": ha_log[-OVERVIEW_LOG_LINES:], "failovers": failovers(ha_log),
                "etcd": etcd, "storage": storage,
                "safe_to_stop": await self.safe_to_stop(snap) if snap is not None else {},
                "time": time.time()}

    async def console(self, name: str, wait_s: float = 0.0,
                      poll_s: float = 0.2):  # noqa: ANN201 -- a hvctl.web.console.Console
        """NAME's serial console; with WAIT_S, wait that long for it to start (a console
        opened together with Start): until it runs and its console opens (a domain that
        QEMU is still bringing up has no console yet)."""
        from hvctl.web.console import Console

        g = self.cfg.guest(name)
        deadline = time.monotonic() + wait_s
        while True:
            p = self.ctl.locate(g)
            if p.active:
                try:
                    return await Console.open(self.ctl.virts[p.active[0]], name)
                except VirtError:
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                if wait_s:
                    raise ApiError(409, f"{name} did not start within {wait_s:g} s; see the "
                                   "task log")
                raise ApiError(409, f"{name} is not running; start it to use its console")
            await asyncio.sleep(poll_s)

    # --- actions ----------------------------------------------------------------------------

    async def act(self, name: str, action: str, node: str | None) -> str:
        if action not in ACTIONS:
            raise ApiError(404, f"no action '{action}'; actions: {', '.join(ACTIONS)}")
        g = self.cfg.guest(name)  # ConfigError (404) if unknown
        if action == "move" and not node:
            raise ApiError(400, 'move needs a target node: {"node": "NAME"}')
        if node is not None:
            self.cfg.hv_node(node)
        if g.ha != "disabled" and self.ha is not None:
            try:
                running = await self.ha.agents_running()
            except HaError:
                running = False
            if running:
                return await self._through_agents(name, action, node)
        if action == "start":
            return await self.ctl.start(name, node)
        if action == "stop":
            return await self.ctl.stop(name)
        if action == "destroy":
            return await self.ctl.destroy(name)
        assert node is not None
        return await self.ctl.move(name, node)

    async def resource_action(self, resource: str, action: str, node: str) -> str:
        if action not in RESOURCE_ACTIONS:
            raise ApiError(404, f"no resource action '{action}'; actions: "
                           f"{', '.join(RESOURCE_ACTIONS)}, resolve")
        self._resource_node(resource, node)
        return await self._rblock(node, resource, action)

    async def resolve_split_brain(self, resource: str, keep: str) -> str:
        """Keep KEEP's data: the other node connects discarding its changes since the split
        (rblock saves them first: `rblock splitbrain list`), then KEEP connects."""
        res = self._resource_node(resource, keep)
        victims = [n for n in res.nodes if n != keep]
        rblock = await self.rblock_status()
        split = False
        for n in res.nodes:
            st = rblock.get(n)
            if isinstance(st, ControlError):
                raise ApiError(502, f"{n}: {st}")
            r = next((x for x in (st or {}).get("resources", []) if x["name"] == resource), {})
            split = split or any(p.get("split_brain") for p in r.get("peers", []))
        if not split:
            raise ApiError(409, f"{resource} is not in split brain: nothing to resolve (to "
                           "throw a node's data away use invalidate)")
        for v in victims:
            await self._rblock(v, resource, "connect", discard_my_data=True)
        await self._rblock(keep, resource, "connect")
        return (f"{resource}: keeping {keep}'s data; {', '.join(victims)} discard their "
                f"changes since the split (saved first: 'rblock splitbrain list {resource}' "
                f"there) and resync from {keep}")

    def _resource_node(self, resource: str, node: str):  # noqa: ANN202 -- ResourceConfig
        res = self.cfg.cluster.resource(resource)  # ConfigError (404) naming them if unknown
        if node not in res.nodes:
            raise ApiError(400, f"{resource} has no disk on {node}; its nodes: "
                           f"{', '.join(res.nodes)}")
        return res

    async def _rblock(self, node: str, resource: str, action: str, **body: Any) -> str:
        try:
            return await self.ctl.control(node).action(resource, action, **body)
        except ControlError as e:
            text = str(e)
            raise ApiError(502 if text.startswith("cannot reach") else 409,
                           f"{node}: {text}") from None

    async def _through_agents(self, name: str, action: str, node: str | None) -> str:
        assert self.ha is not None
        rec = await self.ha.carry_out(name, action, node)
        if rec.state is State.STARTED:
            return f"{settled(name, rec)} ({rec.reason})"
        return settled(name, rec)
