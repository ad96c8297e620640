"""The page's long-lived connections (the live stream, consoles, screens), ended when the
server stops: aiohttp's shutdown otherwise waits its timeout (60 s) for each open page.

    with tracked(request, ws): ...      # a websocket, closed (going away) at shutdown
    ended = shutdown_event(request)     # the live stream watches it
    app.on_shutdown.append(end_all)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import WSCloseCode, web

SOCKETS = web.AppKey("open_sockets", set)
STOPPING = web.AppKey("stopping", asyncio.Event)


def setup(app: web.Application) -> None:
    app[SOCKETS] = set()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(end_all)


@contextlib.contextmanager
def tracked(request: web.Request, ws: web.WebSocketResponse) -> Iterator[None]:
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    try:
        yield
    finally:
        sockets.discard(ws)


def stopping(request: web.Request) -> asyncio.Event:
    return request.app[STOPPING]


async def end_all(app: web.Application) -> None:
    app[STOPPING].set()
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
