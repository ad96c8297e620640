"""The control API of a node, served over HTTP (aiohttp) on a TCP port or a Unix socket:
`start_control`, its handlers, the `EventBus` behind /v1/events and `node_status`.

    GET  /v1/status                       -> {"node", "resources": [...]} (see Resource.status)
    POST /v1/resources/{name}/{action}    -> {"ok": true, "changed": bool, "message"}
                                             | 409 {"error"}
         actions: primary, secondary (body {"force": bool}), connect ({"discard_my_data"}),
                  disconnect, verify, invalidate, detach, attach,
                  inject-fault ({"reads", "writes", "flushes": bool}; all false clears)
         "changed": false when the resource already was as asked (`primary` on a Primary,
         `connect` while connecting, ...): nothing was done, and the message says so.
    GET  /v1/events[?initial=1]           -> one JSON object per line, as state changes; with
         initial=1 it starts with the current state (as `drbdsetup events2` does): one
         {"what": "exists", "resource": NAME, "status": {...}} per resource (the resource's
         /v1/status entry), then {"what": "exists", "resource": "-"}; every change after them
    POST /v1/adjust                       -> the node reads its config file again and applies
         the settings a running node can take (rblock.node.Node.adjust: {"config",
         "applied", "restart"}); 400 {"error", "config_error": true} if the file is wrong
    GET  /metrics                         -> Prometheus text format (rblock/metrics.py)

It serves any `ServedNode` (rblock.node.Node is the one the daemon runs) and does not import
rblock.node: the daemon wires it in, never the other way round. Its clients (the CLI, hvctl)
use rblock/control_client.py, which does not import this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from rblock.config import ConfigError
from rblock.metrics import node_registry, render
from rblock.replica.resource import ResourceError

if TYPE_CHECKING:
    from rblock.config import NodeConfig
    from rblock.nbd.stats import RequestStats

log = logging.getLogger("rblock.control")

EVENT_QUEUE_MAX = 1000  # per subscriber; a slow reader loses the oldest events


NODE_KEY: web.AppKey = web.AppKey("node")  # the node an app serves
REGISTRY_KEY: web.AppKey = web.AppKey("metrics registry", CollectorRegistry)  # its /metrics
ACTIONS = ("primary", "secondary", "connect", "disconnect", "verify", "invalidate", "detach",
           "attach", "inject-fault")

class ControlServerError(Exception):
    """The control API could not start; the message names the address and the reason."""


class EventBus:
    """Fan-out of state changes to every /v1/events stream, each with its bounded queue."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()

    @property
    def subscriber_count(self) -> int:
        """How many streams are open."""
        return len(self._subscribers)

    def publish(self, event: dict) -> None:
        for q in self._subscribers:
            if q.full():
                q.get_nowait()  # bounded: drop the oldest rather than grow
            q.put_nowait(event)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(EVENT_QUEUE_MAX)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def close(self) -> None:
        """End every subscriber's stream (the node is stopping)."""
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)


class ServedResource(Protocol):
    """What the control API calls on a resource (rblock.replica.resource.Resource). A refused
    command raises ResourceError, answered 409 with its message."""

    def status(self, nbd_uri: str) -> dict: ...
    async def promote(self, force: bool = False, ignore_fencing: bool = False) -> str: ...
    async def demote(self, force: bool = False) -> str: ...
    def connect(self, discard_my_data: bool = False) -> str: ...
    def disconnect(self) -> str: ...
    def start_verify(self) -> str: ...
    async def invalidate(self) -> str: ...
    def detach(self) -> str: ...
    async def attach(self) -> str: ...
    def inject_fault(self, reads: bool, writes: bool, flushes: bool) -> str: ...
    def link_bytes(self) -> tuple[int, int]: ...  # for /metrics


class ServedNode(Protocol):
    """What the control API needs of the node it serves (rblock.node.Node)."""

    @property
    def name(self) -> str: ...
    @property
    def me(self) -> NodeConfig: ...  # its `control` address is where the API listens
    @property
    def resources(self) -> Mapping[str, ServedResource]: ...
    @property
    def events(self) -> EventBus: ...
    def nbd_uri(self, export: str) -> str: ...
    def drop_nbd_clients(self, export: str) -> None: ...
    # For /metrics (rblock/metrics.py): NBD connections and request counters of an export.
    def nbd_clients(self, export: str) -> int: ...
    def request_stats(self, export: str) -> RequestStats | None: ...
    # `rblock adjust`: read the config file again, apply what can change at run time
    # (raises ConfigError if the file is wrong: nothing applied then).
    async def adjust(self) -> dict: ...


def node_status(node: ServedNode) -> dict:
    return {"node": node.name,
            "resources": [r.status(node.nbd_uri(name)) for name, r in node.resources.items()]}


async def start_control(node: ServedNode) -> web.AppRunner:
    """Listen on the node's control address; raises ControlServerError if it cannot."""
    app = web.Application()
    app[NODE_KEY] = node
    app[REGISTRY_KEY] = node_registry(node)
    app.add_routes([
        web.get("/v1/status", _status),
        web.post("/v1/resources/{name}/{action}", _action),
        web.get("/v1/events", _events),
        web.post("/v1/adjust", _adjust),
        web.get("/metrics", _metrics),
    ])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addr = node.me.control
    if addr.unix_path:
        site: web.BaseSite = web.UnixSite(runner, addr.unix_path)
    else:
        site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ControlServerError(f"cannot listen for the control API on {addr}: "
                                 f"{e.strerror}") from None
    return runner


async def _status(request: web.Request) -> web.Response:
    return web.json_response(node_status(request.app[NODE_KEY]))


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render(request.app[REGISTRY_KEY], request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _adjust(request: web.Request) -> web.Response:
    node: ServedNode = request.app[NODE_KEY]
    try:
        result = await node.adjust()
    except ConfigError as e:
        return web.json_response({"error": f"{e}; nothing was changed", "config_error": True},
                                 status=400)
    return web.json_response(result)


def _unchanged(node: ServedNode, name: str, action: str, body: dict[str, Any]) -> str | None:
    """Why ACTION would do nothing to the resource as it is, or None if it would do
    something (primary and secondary: the core says so itself, see _action)."""
    st = node.resources[name].status(node.nbd_uri(name))
    conn = st["peers"][0]["connection"] if st["peers"] else None
    peer = st["peers"][0]["node"] if st["peers"] else "?"
    if action == "connect" and conn == "Connected":
        return f"{name} on {node.name} is already Connected to {peer}"
    if action == "connect" and conn == "Connecting" and not body.get("discard_my_data"):
        return (f"{name} on {node.name} is already Connecting to {peer} (it is not "
                f"StandAlone)")
    if action == "disconnect" and conn == "StandAlone":
        return f"{name} on {node.name} is already StandAlone"
    if action == "inject-fault":
        asked = [w for w in ("reads", "writes", "flushes") if body.get(w)]
        if asked == (st.get("disk_faults") or []):
            return (f"the disk of {name} on {node.name} already fails {', '.join(asked)}"
                    if asked else f"no faults are injected on {name} on {node.name}")
    return None


async def _action(request: web.Request) -> web.Response:
    node: ServedNode = request.app[NODE_KEY]
    name, action = request.match_info["name"], request.match_info["action"]
    r = node.resources.get(name)
    if r is None:
        return web.json_response({"error": f"resource '{name}' not on node {node.name}; "
                                           f"resources: {', '.join(node.resources)}"}, status=404)
    body: dict[str, Any] = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "request body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "request body is not a JSON object"}, status=400)
    force = bool(body.get("force"))
    if action in ACTIONS and (why := _unchanged(node, name, action, body)) is not None:
        return web.json_response({"ok": True, "changed": False, "message": why})
    try:
        if action == "primary":
            msg = await r.promote(force, bool(body.get("ignore_fencing")))
        elif action == "secondary":
            if force:
                node.drop_nbd_clients(name)
            msg = await r.demote(force)
        elif action == "connect":
            msg = r.connect(bool(body.get("discard_my_data")))
        elif action == "disconnect":
            msg = r.disconnect()
        elif action == "verify":
            msg = r.start_verify()
        elif action == "invalidate":
            await r.invalidate()
            msg = "invalidated: resyncing from the peer"
        elif action == "detach":
            msg = r.detach()
        elif action == "attach":
            msg = await r.attach()
        elif action == "inject-fault":
            flags = {k: body.get(k, False) for k in ("reads", "writes", "flushes")}
            if not all(isinstance(v, bool) for v in flags.values()):
                return web.json_response({"error": "inject-fault takes booleans reads, "
                                                   "writes and flushes"}, status=400)
            msg = r.inject_fault(**flags)
        else:
            return web.json_response({"error": f"unknown action '{action}'; actions: "
                                               f"{', '.join(ACTIONS)}"}, status=404)
    except ResourceError as e:
        return web.json_response({"error": str(e)}, status=409)
    if action in ("primary", "secondary") and msg.startswith("already "):
        # The core's answer when the role already is the one asked for.
        return web.json_response({"ok": True, "changed": False,
                                  "message": f"{name} is {msg} on {node.name}"})
    return web.json_response({"ok": True, "changed": True, "message": msg})


async def _events(request: web.Request) -> web.StreamResponse:
    node: ServedNode = request.app[NODE_KEY]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    q = node.events.subscribe()  # before the headers go out: a client that has them is in
    # The current state, taken right after subscribing with no await between: every change
    # after it is in the queue, none before it.
    initial = []
    if request.query.get("initial") not in (None, "", "0"):
        now = time.time()
        initial = [{"time": now, "resource": name, "what": "exists", "old": "", "new": "",
                    "detail": "", "status": r.status(node.nbd_uri(name))}
                   for name, r in node.resources.items()]
        initial.append({"time": now, "resource": "-", "what": "exists", "old": "", "new": "",
                        "detail": "the current state is above; changes follow"})
    try:
        await resp.prepare(request)
        if initial:
            await resp.write(b"".join(json.dumps(ev).encode() + b"\n" for ev in initial))
        while (ev := await q.get()) is not None:
            await resp.write(json.dumps(ev).encode() + b"\n")
        await resp.write_eof()
    except ConnectionError as e:
        # The reader went away (`rblock events` killed, a socket closed). aiohttp does not
        # cancel a handler whose client left (handler_cancellation stays off: an action cut
        # off halfway would be worse), so a write is where we learn it; the stream ends here.
        log.debug("events stream to %s ended: the reader went away (%s)",
                  request.remote or "unix socket", e)
    finally:
        node.events.unsubscribe(q)
    return resp
