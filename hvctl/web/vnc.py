"""The guest's screen in the page: noVNC in the browser (hvctl/web/static/vnc.js), a
websocket here, and the VNC server of the guest's QEMU on the node that runs it.

    POST /api/v1/guests/{name}/vnc    a one-time ticket: {"ticket", "url", "expires_in_s"}
    GET  /api/v1/vnc/{ticket}         websocket: the RFB bytes, both ways, to the guest's VNC

Theory of operation. QEMU's VNC server has no password (hvctl/domain.py): it listens on the
node's own address and the web server is the access control. Asking for the screen is a
change like any other (a session with the X-CSRF-Token header, or an API token; admins only,
since the screen types into the guest). A browser cannot put that header on a websocket, so
the POST hands out a ticket instead, and the websocket spends it:

- random (TICKET_BYTES from `secrets`), for one guest and the login that asked (its session,
  or its user when it came with an API token);
- used once: the first websocket that presents it burns it, whoever presents it;
- valid TICKET_TTL_S after it was issued; a used or expired one is refused with 403 (the
  message says which) until TICKET_TTL_S after its expiry, then forgotten (404, like a
  made-up one);
- at most TICKETS_MAX outstanding, so a loop of POSTs cannot grow the table without bound.

The websocket also wants its Origin to be this server (no other site's page may open it), as
the serial console does. Once open, the bytes are proxied to the port QEMU's VNC took (autoport),
read from the running domain's live XML on its node at that moment; the proxy ends when
either side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import libvirt
from aiohttp import web

from hvctl.config import WILDCARD_HOSTS
from hvctl.domain import parse_xml
from hvctl.web import streams
from hvctl.web.actions import ApiError, Backend, translate
from hvctl.web.users import User

log = logging.getLogger("hvctl.web.vnc")

TICKET_TTL_S = 30.0  # from the POST to the websocket: the page opens it at once
TICKET_BYTES = 32  # 256 random bits
TICKETS_MAX = 1000  # outstanding (unused, used or expired but not yet forgotten)
CONNECT_TIMEOUT_S = 5.0  # to the guest's VNC port on its node
RECV_CHUNK_BYTES = 65536  # one read from the VNC server, one websocket message
HEARTBEAT_S = 30.0  # websocket pings, as the serial console's


@dataclass
class Ticket:
    guest: str
    user: str
    session: str | None  # the session's id; None: the POST came with an API token
    expires_s: float  # time.monotonic()
    used: bool = False


class Tickets:
    def __init__(self) -> None:
        self.by_id: dict[str, Ticket] = {}

    def _forget_old(self, now_s: float) -> None:
        for tid in [t for t, v in self.by_id.items() if now_s >= v.expires_s + TICKET_TTL_S]:
            del self.by_id[tid]

    def issue(self, guest: str, user: str, session: str | None) -> str:
        now_s = time.monotonic()
        self._forget_old(now_s)
        if len(self.by_id) >= TICKETS_MAX:
            raise ApiError(429, f"{TICKETS_MAX} VNC tickets are outstanding; wait "
                           f"{2 * TICKET_TTL_S:g} s for them to expire")
        tid = secrets.token_urlsafe(TICKET_BYTES)
        self.by_id[tid] = Ticket(guest, user, session, now_s + TICKET_TTL_S)
        assert len(self.by_id) <= TICKETS_MAX
        return tid

    def spend(self, tid: str, user: str, session: str | None) -> Ticket:
        now_s = time.monotonic()
        self._forget_old(now_s)
        t = self.by_id.get(tid)
        again = "ask for a new one (POST /api/v1/guests/NAME/vnc; the page's Screen button)"
        if t is None:
            raise ApiError(404, f"VNC ticket not known; {again}")
        if t.used:
            raise ApiError(403, f"VNC ticket already used (each opens one screen); {again}")
        t.used = True  # burnt by the first to present it, even when refused below
        if now_s >= t.expires_s:
            raise ApiError(403, f"VNC ticket expired ({TICKET_TTL_S:g} s); {again}")
        if (t.user, t.session) != (user, session):
            raise ApiError(403, f"VNC ticket was issued to another login; {again}")
        return t


@dataclass(frozen=True)
class Keys:
    """hvctl/web/app.py's keys, handed over by add_routes (app.py imports this module)."""

    backend: web.AppKey
    user: web.RequestKey  # a User
    session: web.RequestKey  # an auth.Session, or None for an API token


TICKETS = web.AppKey("vnc_tickets", Tickets)
KEYS = web.AppKey("vnc_keys", Keys)


def _vnc_address(backend: Backend, name: str) -> tuple[str, str, int]:
    """(node, host, port) of the running guest's VNC server, from its live domain XML."""
    node = "?"
    try:
        g = backend.cfg.guest(name)
        if g.graphics is None:
            raise ApiError(409, f"guest {name} has no graphics; set graphics = \"vnc\" in "
                           f"[guest.{name}] of {g.source}, then stop and start it")
        p = backend.ctl.locate(g)
        if not p.active:
            raise ApiError(409, f"{name} is not running; start it to see its screen")
        node = p.active[0]
        dom = backend.ctl.virts[node].lookup(name)
        info = parse_xml(dom.XMLDesc(0)) if dom is not None else None
    except libvirt.libvirtError as e:
        raise ApiError(502, f"node {node}: cannot read {name}'s display: "
                       f"{e.get_error_message()}") from None
    except Exception as e:  # noqa: BLE001 -- every error becomes its JSON answer
        raise translate(e) from None
    vnc = next((x for x in info.graphics if x["type"] == "vnc"), None) if info else None
    if vnc is None or vnc["port"] <= 0:
        raise ApiError(409, f"{name} runs on {node} without a VNC display (started before "
                       "graphics was set?); stop and start it")
    host = vnc["listen"]
    if not host or host in WILDCARD_HOSTS:
        host = g.graphics.address(node)
    return node, host, vnc["port"]


def _user(request: web.Request) -> User:
    return request[request.app[KEYS].user]


def _admin(request: web.Request) -> None:
    user = _user(request)
    if not user.admin:
        raise ApiError(403, f"user {user.name} is a viewer and may not use a guest's screen; "
                       "ask an admin")


def _session_id(request: web.Request) -> str | None:
    s = request[request.app[KEYS].session]
    return s.id if s is not None else None


async def api_vnc_ticket(request: web.Request) -> web.Response:
    """A ticket for the websocket (the access middleware checked the login and the CSRF
    header already)."""
    _admin(request)
    name = request.match_info["name"]
    backend = request.app[request.app[KEYS].backend]
    _vnc_address(backend, name)  # refuse now what the websocket would refuse
    user = _user(request).name
    tid = request.app[TICKETS].issue(name, user, _session_id(request))
    log.info("%s: VNC ticket for %s", user, name)
    return web.json_response({"ticket": tid, "url": f"/api/v1/vnc/{tid}",
                              "expires_in_s": TICKET_TTL_S})


async def api_vnc_socket(request: web.Request) -> web.StreamResponse:
    _admin(request)
    origin = request.headers.get("Origin")
    if origin is not None and origin.split("://", 1)[-1] != request.host:
        raise ApiError(403, f"websocket from another site ({origin}) refused")
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, protocols=("binary",))
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "this is a websocket: open it with new WebSocket(url) (the "
                       "ticket is still good)")
    user = _user(request).name
    ticket = request.app[TICKETS].spend(request.match_info["ticket"], user,
                                        _session_id(request))
    name = ticket.guest
    node, host, port = _vnc_address(request.app[request.app[KEYS].backend], name)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise ApiError(502, f"node {node}: cannot reach {name}'s VNC at {host}:{port}: "
                       f"{e or 'timed out'}; is that address reachable from here?") from None
    try:
        await ws.prepare(request)
    except BaseException:
        writer.close()
        raise
    log.info("%s: screen of %s opened (%s, VNC %s:%d)", user, name, node, host, port)

    async def from_guest() -> None:
        try:
            while chunk := await reader.read(RECV_CHUNK_BYTES):
                await ws.send_bytes(chunk)
        except (ConnectionError, RuntimeError) as e:  # the VNC server or the browser left
            log.info("%s: screen of %s: %s", user, name, e)
        await ws.close()

    task = asyncio.get_running_loop().create_task(from_guest())
    try:
        with streams.tracked(request, ws):
            async for msg in ws:
                if msg.type == web.WSMsgType.BINARY:
                    writer.write(msg.data)
                    await writer.drain()
                elif msg.type == web.WSMsgType.TEXT:
                    writer.write(msg.data.encode())
                    await writer.drain()
    except ConnectionError as e:
        log.info("%s: screen of %s: VNC connection lost: %s", user, name, e)
    finally:
        writer.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # anything but its cancel is raised here, so aiohttp logs it
        log.info("%s: screen of %s closed", user, name)
    return ws


def add_routes(app: web.Application, backend: web.AppKey, user: web.RequestKey,
               session: web.RequestKey) -> None:
    """Before the guest actions' POST /api/v1/guests/{name}/{action}, which would match."""
    app[KEYS] = Keys(backend, user, session)
    app[TICKETS] = Tickets()
    app.router.add_post("/api/v1/guests/{name}/vnc", api_vnc_ticket)
    app.router.add_get("/api/v1/vnc/{ticket}", api_vnc_socket)
