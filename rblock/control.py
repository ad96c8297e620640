"""The control API of a node: HTTP (aiohttp) on a TCP port or a Unix socket.

    GET  /v1/status                       -> {"node", "resources": [...]} (see Resource.status)
    POST /v1/resources/{name}/{action}    -> {"ok": true, "message"} | 409 {"error"}
         actions: primary, secondary (body {"force": bool}), connect ({"discard_my_data"}),
                  disconnect, verify, invalidate
    GET  /v1/events                       -> one JSON object per line, as state changes

The CLI (`rblock status|primary|...`) and hvctl are its clients (`ControlClient`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from rblock.config import Address
from rblock.replica.resource import ResourceError

if TYPE_CHECKING:
    from rblock.node import Node

EVENT_QUEUE_MAX = 1000  # per subscriber; a slow reader loses the oldest events
CLIENT_TIMEOUT_S = 30.0


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()

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


def node_status(node: Node) -> dict:
    return {"node": node.name,
            "resources": [r.status(node.nbd_uri(name)) for name, r in node.resources.items()]}


async def start_control(node: Node) -> web.AppRunner:
    app = web.Application()
    app["node"] = node
    app.add_routes([
        web.get("/v1/status", _status),
        web.post("/v1/resources/{name}/{action}", _action),
        web.get("/v1/events", _events),
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
        from rblock.node import NodeError
        raise NodeError(f"cannot listen for the control API on {addr}: {e.strerror}") from None
    return runner


async def _status(request: web.Request) -> web.Response:
    return web.json_response(node_status(request.app["node"]))


async def _action(request: web.Request) -> web.Response:
    node: Node = request.app["node"]
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
    force = bool(body.get("force"))
    try:
        if action == "primary":
            msg = await r.promote(force)
        elif action == "secondary":
            if force:
                node.drop_nbd_clients(name)
            msg = await r.demote(force)
        elif action == "connect":
            r.connect(bool(body.get("discard_my_data")))
            msg = "connecting"
        elif action == "disconnect":
            r.disconnect()
            msg = "disconnected (StandAlone)"
        elif action == "verify":
            r.start_verify()
            msg = "verify started"
        elif action == "invalidate":
            await r.invalidate()
            msg = "invalidated: resyncing from the peer"
        else:
            return web.json_response({"error": f"unknown action '{action}'; actions: primary, "
                                               f"secondary, connect, disconnect, verify, "
                                               f"invalidate"}, status=404)
    except ResourceError as e:
        return web.json_response({"error": str(e)}, status=409)
    return web.json_response({"ok": True, "message": msg})


async def _events(request: web.Request) -> web.StreamResponse:
    node: Node = request.app["node"]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    q = node.events.subscribe()
    try:
        while (ev := await q.get()) is not None:
            await resp.write(json.dumps(ev).encode() + b"\n")
    finally:
        node.events.unsubscribe(q)
    await resp.write_eof()
    return resp


def in_sync(resource: dict) -> bool:
    """A resource of `rblock status --json` is in sync: its disk and every peer's UpToDate,
    replication Established, nothing out of sync (what scripts wait for after a resync)."""
    return resource["disk"] == "UpToDate" and all(
        p["disk"] == "UpToDate" and p["replication"] == "Established"
        and not p["out_of_sync_bytes"] for p in resource["peers"])


class ControlError(Exception):
    """The node refused a command or could not be reached; the message says which."""


class ControlClient:
    def __init__(self, addr: Address):
        self.addr = addr
        if addr.unix_path:
            self._base = "http://rblock"
        else:
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            self._base = f"http://{host}:{addr.port}"

    def _session(self, timeout_s: float | None = CLIENT_TIMEOUT_S) -> aiohttp.ClientSession:
        connector = (aiohttp.UnixConnector(path=self.addr.unix_path) if self.addr.unix_path
                     else aiohttp.TCPConnector())
        return aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def status(self) -> dict:
        try:
            async with self._session() as s, s.get(self._base + "/v1/status") as resp:
                return await resp.json()
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}; "
                               f"is 'rblock up' running there?") from None

    async def action(self, resource: str, action: str, **body: Any) -> str:
        url = f"{self._base}/v1/resources/{resource}/{action}"
        try:
            async with self._session() as s, s.post(url, json=body) as resp:
                data = await resp.json()
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}; "
                               f"is 'rblock up' running there?") from None
        if "error" in data:
            raise ControlError(data["error"])
        return data["message"]

    async def events(self) -> AsyncIterator[dict]:
        try:
            async with self._session(None) as s, s.get(self._base + "/v1/events") as resp:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}") \
                from None
