"""The OpenAPI document of /api/v1 (served at /api/v1/openapi.json)."""

from __future__ import annotations

_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_OBJ = {"content": {"application/json": {"schema": {"type": "object"}}}}
_LIST = {"content": {"application/json": {"schema": {"type": "array",
                                                      "items": {"type": "object"}}}}}


def _get(summary: str, body: dict, params: list | None = None) -> dict:
    op = {"summary": summary, "responses": {"200": {"description": "ok", **body},
                                            "401": _ERR, "502": _ERR}}
    if params:
        op["parameters"] = params
    return {"get": op}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ACTION = {"name": "action", "in": "path", "required": True,
           "schema": {"type": "string", "enum": ["start", "stop", "destroy", "move"]}}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "hvctl", "version": "1",
             "description": "The cluster's guests, nodes and HA. Auth: the session cookie "
                            "of /login (then X-CSRF-Token on changes) or "
                            "'Authorization: Bearer hvk_...'."},
    "components": {"securitySchemes": {
        "token": {"type": "http", "scheme": "bearer"},
        "session": {"type": "apiKey", "in": "cookie", "name": "hvctl_session"}}},
    "security": [{"token": []}, {"session": []}],
    "paths": {
        "/api/v1/overview": _get("guests, nodes and HA at once", _OBJ),
        "/api/v1/guests": _get("every guest with its state, node and disks", _LIST),
        "/api/v1/guests/{name}": _get("one guest", _OBJ, [_NAME]),
        "/api/v1/guests/{name}/{action}": {"post": {
            "summary": "start, stop, destroy or move a guest (HA guests: through the agents)",
            "parameters": [_NAME, _ACTION],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"node": {"type": "string"}}}}}},
            "responses": {"200": {"description": "done", **_OBJ}, "400": _ERR, "401": _ERR,
                          "403": _ERR, "404": _ERR, "409": _ERR, "502": _ERR}}},
        "/api/v1/guests/{name}/vnc": {"post": {
            "summary": "a one-time ticket for the guest's screen (admins; the guest needs "
                       "graphics = \"vnc\" and must run): used once, within 30 s, by this "
                       "login, at the websocket of its url",
            "parameters": [_NAME],
            "responses": {"200": {"description": "the ticket", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "ticket": {"type": "string"}, "url": {"type": "string"},
                    "expires_in_s": {"type": "number"}}}}}},
                "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR, "429": _ERR,
                "502": _ERR}}},
        "/api/v1/vnc/{ticket}": {"get": {
            "summary": "websocket: the guest's VNC (RFB) bytes both ways, for noVNC; spends "
                       "the ticket; the Origin must be this server",
            "parameters": [{"name": "ticket", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"101": {"description": "websocket"}, "400": _ERR, "401": _ERR,
                          "403": _ERR, "404": _ERR, "409": _ERR, "502": _ERR}}},
        "/api/v1/nodes": _get("every node: libvirt, guests, rblock roles", _LIST),
        "/api/v1/nodes/{name}/maintenance": {"post": {
            "summary": "maintenance on (its HA guests move away) or off",
            "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"on": {"type": "boolean"}},
                "required": ["on"]}}}},
            "responses": {"200": {"description": "done", **_OBJ}, "400": _ERR, "401": _ERR,
                          "403": _ERR, "404": _ERR, "409": _ERR}}},
        "/api/v1/storage": _get("resource -> node -> that node's rblock status", _OBJ),
        "/api/v1/charts": _get("per RESOURCE@NODE over the last minutes: t, write_iops, "
                               "write_latency_ms, sync_bytes_per_s", _OBJ),
        "/api/v1/resources/{name}/{action}": {"post": {
            "summary": "verify, invalidate, connect or disconnect a resource on one node; "
                       "resolve ends a split brain by keeping one node's data",
            "parameters": [_NAME, {"name": "action", "in": "path", "required": True,
                                   "schema": {"type": "string", "enum": [
                                       "verify", "invalidate", "connect", "disconnect",
                                       "resolve"]}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "node": {"type": "string", "description": "where to run it"},
                    "keep": {"type": "string", "description": "resolve: whose data"}}}}}},
            "responses": {"200": {"description": "done", **_OBJ}, "400": _ERR, "401": _ERR,
                          "403": _ERR, "404": _ERR, "409": _ERR, "502": _ERR}}},
        "/api/v1/ha/status": _get("the HA leader, nodes and guests", _OBJ),
        "/api/v1/ha/failovers": _get("the failover history: when, which host, why, how "
                                     "long", _LIST),
        "/api/v1/ha/log": _get("the HA decision log", _LIST),
        "/api/v1/tasks": _get("every action taken through the API, who and how it ended",
                              _LIST),
        "/api/v1/events": {"get": {"summary": "server-sent events: the overview on change",
                                   "responses": {"200": {"description": "text/event-stream"}}}},
    },
}
