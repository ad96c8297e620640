"""`hvctl web`: the administration page and its REST API (aiohttp), one controller behind
both (hvctl/web/actions.py), the access rules of hvctl/web/auth.py.

    GET  /login, POST /login, POST /logout        the page's session
    GET  /, /guests, /nodes, /storage, /tasks      the pages (server-rendered, then live)
    GET  /api/v1/overview                         guests, nodes and HA at once
    GET  /api/v1/guests, /api/v1/guests/{name}
    POST /api/v1/guests/{name}/{start|stop|destroy|move}   JSON body {"node": "beta"}
    GET  /api/v1/nodes, /api/v1/ha/status, /api/v1/ha/log, /api/v1/ha/failovers,
         /api/v1/storage, /api/v1/charts, /api/v1/tasks
    POST /api/v1/nodes/{name}/maintenance          JSON body {"on": true}
    POST /api/v1/resources/{name}/{verify|invalidate|connect|disconnect}  {"node": "beta"}
    POST /api/v1/resources/{name}/resolve          {"keep": "alpha"}: end a split brain
    GET  /api/v1/events                           server-sent events: the overview on change
    GET  /api/v1/guests/{name}/console[?wait=1]   websocket: the guest's serial console
    POST /api/v1/guests/{name}/vnc, GET /api/v1/vnc/{ticket}   its screen (hvctl/web/vnc.py)
    GET  /api/v1/openapi.json

Errors are JSON {"error": "<the CLI's one-line message>"} with the status: 400 bad input,
401 not logged in, 403 CSRF or role, 404 unknown guest/node/action, 409 refused, 429 too
many logins, 502 a node's libvirt or rblock out of reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from hvctl.config import HvConfig
from hvctl.web import auth, streams, vnc
from hvctl.web.actions import ACTIONS, ApiError, Backend, translate
from hvctl.web.charts import Charts
from hvctl.web.openapi import OPENAPI
from hvctl.web.sampler import Sampler
from hvctl.web.users import User, Users

log = logging.getLogger("hvctl.web")

HERE = Path(__file__).resolve().parent
TASKS_MAX = 1000
EVENTS_INTERVAL_S = 1.0  # the overview is sampled this often for the live page
EVENTS_KEEPALIVE_S = 5.0  # a comment line on an idle stream: a closed page is noticed
CHARTS_INTERVAL_S = 2.0  # each node's counters are read this often for the charts
OVERVIEW_TASKS = 50  # the newest tasks in the overview (all of them: /api/v1/tasks)
CONSOLE_WAIT_S = 120.0  # ?wait=1: how long a console waits for its guest to start
CONSOLE_WAIT_POLL_S = 0.2
PUBLIC = ("/login", "/static/")

BACKEND = web.AppKey("backend", Backend)
SAMPLER = web.AppKey("sampler", Sampler)
CHARTS = web.AppKey("charts", Charts)
USERS = web.AppKey("users", Users)
SESSIONS = web.AppKey("sessions", auth.Sessions)
LIMIT = web.AppKey("limit", auth.LoginLimit)
TASKS = web.AppKey("tasks", deque)
TASK_IDS = web.AppKey("task_ids", itertools.count)
SECURE = web.AppKey("secure", bool)
USER = web.RequestKey("user", User)
SESSION = web.RequestKey("session", object)  # auth.Session or None (a token request)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _user(request: web.Request) -> User:
    return request[USER]


@web.middleware
async def access(request: web.Request, handler: Any) -> web.StreamResponse:
    path = request.path
    api = path.startswith("/api/")
    if any(path == p or (p.endswith("/") and path.startswith(p)) for p in PUBLIC):
        return await handler(request)
    session = None
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer "):
        user = request.app[USERS].check_token(bearer[len("Bearer "):].strip())
        if user is None:
            return _json_error(401, "API token not valid; make one with 'hvctl web token "
                               "NAME'")
    else:
        session = request.app[SESSIONS].get(request.cookies.get(auth.COOKIE))
        if session is None:
            if api:
                return _json_error(401, "not logged in; POST /login or send "
                                   "'Authorization: Bearer TOKEN'")
            raise web.HTTPFound("/login")
        user = session.user
    request[USER] = user
    request[SESSION] = session
    if request.method in auth.CHANGING:
        if session is not None:
            form = None
            if request.content_type == "application/x-www-form-urlencoded":
                form = (await request.post()).get("csrf_token")
            if not auth.csrf_ok(session, request.headers.get(auth.CSRF_HEADER),
                                form if isinstance(form, str) else None):
                return _json_error(403, "CSRF token missing or wrong; reload the page")
        if not user.admin and path != "/logout":
            return _json_error(403, f"user {user.name} is a viewer and may not change "
                               "anything; ask an admin")
    try:
        return await handler(request)
    except ApiError as e:
        return _json_error(e.status, str(e))


# --- the session ----------------------------------------------------------------------------

@aiohttp_jinja2.template("login.html")
async def login_page(request: web.Request) -> dict:
    return {"error": None}


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name, password = str(form.get("user", "")), str(form.get("password", ""))
    keys = [f"ip:{request.remote}", f"user:{name}"]
    limit = request.app[LIMIT]
    if not limit.allowed(keys):
        log.warning("login of %r from %s refused: too many failures", name, request.remote)
        return aiohttp_jinja2.render_template(
            "login.html", request, {"error": "Too many failed logins; wait a minute."},
            status=429)
    users = request.app[USERS]
    user = users.verify(name, password)
    if user is not None and users.needs_code(name) and not users.check_code(
            name, str(form.get("code", ""))):
        log.warning("login of %r from %s: one-time code missing, wrong or used", name,
                    request.remote)
        user = None
    if user is None:
        limit.failed(keys)
        log.warning("login of %r from %s refused", name, request.remote)
        return aiohttp_jinja2.render_template(
            "login.html", request,
            {"error": "Wrong user name, password or one-time code."}, status=401)
    limit.succeeded(keys)
    session = request.app[SESSIONS].create(user)
    log.info("%s logged in from %s", user.name, request.remote)
    resp = web.HTTPFound("/")
    resp.set_cookie(auth.COOKIE, session.id, httponly=True, samesite="Strict",
                    secure=request.app[SECURE], max_age=int(auth.SESSION_TTL_S), path="/")
    raise resp


async def logout(request: web.Request) -> web.StreamResponse:
    s = request[SESSION]
    if s is not None:
        request.app[SESSIONS].drop(s.id)
    resp = web.HTTPFound("/login")
    resp.del_cookie(auth.COOKIE, path="/")
    raise resp


# --- the page -------------------------------------------------------------------------------

PAGES = {"/": ("dashboard.html", "Dashboard"), "/guests": ("guests.html", "Guests"),
         "/nodes": ("nodes.html", "Nodes"), "/storage": ("storage.html", "Storage"),
         "/tasks": ("tasks.html", "Tasks")}


async def page(request: web.Request) -> web.StreamResponse:
    """A page: its sections rendered from the newest sample, then kept live by app.js."""
    template, title = PAGES[request.path]
    try:
        overview = await request.app[SAMPLER].get()
    except Exception as e:  # noqa: BLE001 -- the page still opens and says what is wrong
        overview = {"error": str(translate(e))}
    s = request[SESSION]
    return aiohttp_jinja2.render_template(template, request, {
        "user": _user(request), "csrf": s.csrf if s else "", "o": overview,
        "o_json": json.dumps(overview), "pages": PAGES, "here": request.path,
        "title": title})


# --- the API --------------------------------------------------------------------------------

async def _call(coro: Any) -> Any:
    try:
        return await coro
    except Exception as e:  # noqa: BLE001 -- every error becomes its JSON answer
        raise translate(e) from None


async def api_overview(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[SAMPLER].get()))


async def api_storage(request: web.Request) -> web.Response:
    return web.json_response((await _call(request.app[SAMPLER].get()))["storage"])


async def api_charts(request: web.Request) -> web.Response:
    """The charts' points so far (the live stream then carries each new one)."""
    await _call(request.app[SAMPLER].get())
    return web.json_response(request.app[CHARTS].series())


async def api_failovers(request: web.Request) -> web.Response:
    return web.json_response((await _call(request.app[SAMPLER].get()))["failovers"])


async def api_guests(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[BACKEND].guests()))


async def api_guest(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[BACKEND].guest(request.match_info["name"])))


async def api_nodes(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[BACKEND].nodes()))


async def api_ha_status(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[BACKEND].ha_status()))


async def api_ha_log(request: web.Request) -> web.Response:
    return web.json_response(await _call(request.app[BACKEND].ha_log()))


async def api_tasks(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[TASKS]))


async def _task(request: web.Request, action: str, target: dict, work: Any) -> web.Response:
    """Carry out WORK (a coroutine) as a task of the task log: who, what, how it ended."""
    user = _user(request)
    task = {"id": next(request.app[TASK_IDS]), "user": user.name, "action": action, **target,
            "started": time.time(), "state": "running", "result": None}
    request.app[TASKS].append(task)
    what = " ".join(f"{k} {v}" for k, v in target.items() if v)
    log.info("%s: %s %s", user.name, action, what)
    try:
        message = await _call(work)
    except ApiError as e:
        task.update(state="failed", result=str(e), ended=time.time())
        log.warning("%s: %s %s failed: %s", user.name, action, what, e)
        raise
    task.update(state="done", result=message, ended=time.time())
    return web.json_response({"ok": True, "message": message, "task": task["id"]})


async def api_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in ACTIONS:
        raise ApiError(404, f"no action '{action}'; actions: {', '.join(ACTIONS)}")
    body: dict = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON; send {\"node\": \"NAME\"} or "
                           "nothing") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object like {"node": "beta"}')
    node = body.get("node")
    if node is not None and not isinstance(node, str):
        raise ApiError(400, '"node" must be a node name (a string)')
    return await _task(request, action, {"guest": name, "node": node},
                       request.app[BACKEND].act(name, action, node))


async def _body(request: web.Request, example: str) -> dict:
    """The request's JSON object ({} if none); ApiError 400 naming EXAMPLE otherwise."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, f"the body is not JSON; send {example}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object like {example}")
    return body


async def api_resource(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    backend = request.app[BACKEND]
    if action == "resolve":
        body = await _body(request, '{"keep": "alpha"}')
        keep = body.get("keep")
        if not isinstance(keep, str) or not keep:
            raise ApiError(400, 'resolve needs the node whose data is kept: {"keep": "alpha"}')
        return await _task(request, "resolve split brain", {"resource": name, "node": keep},
                           backend.resolve_split_brain(name, keep))
    body = await _body(request, '{"node": "beta"}')
    node = body.get("node")
    if not isinstance(node, str) or not node:
        raise ApiError(400, f'{action} needs the node to run it on: {{"node": "beta"}}')
    return await _task(request, action, {"resource": name, "node": node},
                       backend.resource_action(name, action, node))


async def api_maintenance(request: web.Request) -> web.Response:
    node = request.match_info["name"]
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise ApiError(400, 'the body is not JSON; send {"on": true} or {"on": false}') from None
    if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
        raise ApiError(400, 'send {"on": true} or {"on": false}')
    return await _task(request, f"maintenance {'on' if body['on'] else 'off'}",
                       {"node": node}, request.app[BACKEND].maintenance(node, body["on"]))


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the overview whenever it changes (one sampler for every page), a
    comment line when nothing was written for a while (so a closed page is noticed and a
    proxy keeps the stream open); it ends when the server stops."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    last, wrote = None, time.monotonic()
    sampler = request.app[SAMPLER]
    q = sampler.subscribe()
    stop = streams.stopping(request)
    halt = asyncio.ensure_future(stop.wait())
    try:
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while not stop.is_set():
                get = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({get, halt}, timeout=EVENTS_KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    o = {k: v for k, v in get.result().items() if k != "time"}
                    text = json.dumps(o, sort_keys=True)
                    if text != last:
                        await resp.write(f"event: overview\ndata: {text}\n\n".encode())
                        last, wrote = text, time.monotonic()
                else:
                    get.cancel()
                if time.monotonic() - wrote >= EVENTS_KEEPALIVE_S:
                    await resp.write(b": keepalive\n\n")
                    wrote = time.monotonic()
    finally:
        halt.cancel()
        sampler.unsubscribe(q)
    return resp


async def api_console(request: web.Request) -> web.StreamResponse:
    """The guest's serial console over a websocket (admins only: it types into the guest).
    A browser sends the session cookie with it but no CSRF header, so the Origin must be
    this server (no other site's page may open it)."""
    user = _user(request)
    if not user.admin:
        raise ApiError(403, f"user {user.name} is a viewer and may not use a console; ask "
                       "an admin")
    origin = request.headers.get("Origin")
    if origin is not None and origin.split("://", 1)[-1] != request.host:
        raise ApiError(403, f"websocket from another site ({origin}) refused")
    name = request.match_info["name"]
    wait_s = CONSOLE_WAIT_S if request.query.get("wait") == "1" else 0.0  # with Start
    try:
        console = await _call(request.app[BACKEND].console(name, wait_s, CONSOLE_WAIT_POLL_S))
    except ApiError as e:
        log.warning("%s: console of %s refused: %s", user.name, name, e)
        raise
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    log.info("%s: console of %s opened", user.name, name)

    async def pump() -> None:
        async for chunk in console:
            await ws.send_bytes(chunk)
        await ws.close()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        with streams.tracked(request, ws):
            async for msg in ws:
                if msg.type == web.WSMsgType.TEXT:
                    console.send(msg.data.encode())
                elif msg.type == web.WSMsgType.BINARY:
                    console.send(msg.data)
    finally:
        console.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("%s: console of %s closed", user.name, name)
    return ws


async def api_openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def api_unknown(request: web.Request) -> web.Response:
    raise ApiError(404, f"no API endpoint {request.method} {request.path}; see "
                   "/api/v1/openapi.json")


def make_app(cfg: HvConfig, users: Users, secure: bool = False) -> web.Application:
    app = web.Application(middlewares=[access])
    app[USERS] = users
    app[SESSIONS] = auth.Sessions()
    app[LIMIT] = auth.LoginLimit()
    app[TASKS] = deque(maxlen=TASKS_MAX)  # the newest; ids keep counting past it
    app[TASK_IDS] = itertools.count(1)
    app[SECURE] = secure
    app[CHARTS] = Charts()
    streams.setup(app)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"),
                         autoescape=jinja2.select_autoescape(["html"]))

    async def backend(app: web.Application):  # noqa: ANN202 -- aiohttp's cleanup context
        app[BACKEND] = b = Backend(cfg)

        async def sample() -> dict:
            o = await b.overview()
            o["tasks"] = list(app[TASKS])[-OVERVIEW_TASKS:]
            o["charts"] = app[CHARTS].latest()  # the page appends them to /api/v1/charts
            return o

        async def chart() -> None:  # always, so a page opened later has the minutes before
            while True:
                t = time.time()
                try:
                    for node, summary in (await b.metrics()).items():
                        app[CHARTS].add(t, node, summary)
                except Exception as e:  # noqa: BLE001 -- a bad scrape costs a point, not the charts
                    log.warning("charts: reading the nodes' counters: %s", e)
                await asyncio.sleep(max(0.0, CHARTS_INTERVAL_S - (time.time() - t)))

        app[SAMPLER] = Sampler(sample, EVENTS_INTERVAL_S, lambda e: str(translate(e)))
        charting = asyncio.get_running_loop().create_task(chart())
        yield
        charting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await charting
        await app[SAMPLER].close()
        await b.close()

    app.cleanup_ctx.append(backend)
    r = app.router
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    for path in PAGES:
        r.add_get(path, page)
    r.add_static("/static/", HERE / "static")
    r.add_get("/api/v1/overview", api_overview)
    r.add_get("/api/v1/guests", api_guests)
    r.add_get("/api/v1/guests/{name}", api_guest)
    vnc.add_routes(app, BACKEND, USER, SESSION)  # the screen; before {action}, or it matches
    r.add_post("/api/v1/guests/{name}/{action}", api_action)
    r.add_get("/api/v1/guests/{name}/console", api_console)
    r.add_get("/api/v1/nodes", api_nodes)
    r.add_post("/api/v1/nodes/{name}/maintenance", api_maintenance)
    r.add_get("/api/v1/ha/status", api_ha_status)
    r.add_get("/api/v1/ha/log", api_ha_log)
    r.add_get("/api/v1/ha/failovers", api_failovers)
    r.add_get("/api/v1/storage", api_storage)
    r.add_get("/api/v1/charts", api_charts)
    r.add_post("/api/v1/resources/{name}/{action}", api_resource)
    r.add_get("/api/v1/tasks", api_tasks)
    r.add_get("/api/v1/events", api_events)
    r.add_get("/api/v1/openapi.json", api_openapi)
    r.add_route("*", "/api/{tail:.*}", api_unknown)
    return app
