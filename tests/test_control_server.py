"""The control API's server side (rblock/control_server.py).

/v1/events readers that vanish: the daemon ends their stream quietly (no traceback in its
log, at most a debug line), drops their queue, and keeps serving everyone else. In process
(a stand-in node on a Unix socket) for the queue's removal; against a real `rblock up`
(tests/cluster.py) for the log and the node's health afterwards.

A control address already taken: `rblock up` says which and exits 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from rblock.config import Address
from rblock.control_server import EventBus, start_control

EVENTS_GET = b"GET /v1/events HTTP/1.1\r\nHost: rblock\r\n\r\n"
EVENTS_MAX = 50  # a vanished reader must be noticed well within this many events
NOTICE_TIMEOUT_S = 0.2  # per event, for the handler to find the reader gone
READ_TIMEOUT_S = 10.0


class StandInNode:
    """The little of a node the control API needs, for its /v1/events stream."""

    def __init__(self, sock_path: Path):
        self.name = "alpha"
        self.me = SimpleNamespace(control=Address("", 0, unix_path=str(sock_path)))
        self.resources: dict = {}
        self.events = EventBus()
        self.unsubscribed = asyncio.Event()
        unsubscribe = self.events.unsubscribe

        def noted(q: asyncio.Queue) -> None:
            unsubscribe(q)
            self.unsubscribed.set()

        self.events.unsubscribe = noted  # type: ignore[method-assign]

    def nbd_uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:10809/{export}"

    def drop_nbd_clients(self, export: str) -> None:
        pass


async def _vanished_reader(sock_path: Path, then: str) -> int:
    """Open /v1/events, read the headers, drop the connection, then publish events (or end
    every stream, as a stopping node does); returns the subscribers left."""
    node = StandInNode(sock_path)
    runner = await start_control(node)
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        writer.write(EVENTS_GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert node.events.subscriber_count == 1
        writer.transport.abort()
        if then == "close":
            node.events.close()
            await asyncio.wait_for(node.unsubscribed.wait(), READ_TIMEOUT_S)
        for i in range(EVENTS_MAX):
            if node.unsubscribed.is_set():
                break
            node.events.publish({"resource": "r0", "what": "connection", "old": "Connected",
                                 "new": "StandAlone", "n": i})
            try:
                await asyncio.wait_for(node.unsubscribed.wait(), NOTICE_TIMEOUT_S)
            except TimeoutError:
                continue
        return node.events.subscriber_count
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("then", ["publish", "close"])
def test_vanished_reader_is_unsubscribed_quietly(tmp_path, caplog, then):
    caplog.set_level(logging.DEBUG)
    left = asyncio.run(_vanished_reader(tmp_path / "control.sock", then))
    assert left == 0, f"the vanished reader's queue is still subscribed after {EVENTS_MAX} events"
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info]
    assert not loud, [(r.name, r.getMessage()) for r in loud]


# --- a real node ---------------------------------------------------------------------------


def _open_events(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
    s.sendall(EVENTS_GET)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, f"control API closed /v1/events before its headers: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def _events_read(f, n: int) -> list[dict]:
    """N events from a chunked /v1/events body (chunk-size lines are skipped)."""
    evs = []
    while len(evs) < n:
        line = f.readline()
        assert line, f"stream ended after {evs}"
        if line.startswith(b"{"):
            evs.append(json.loads(line))
    return evs


def test_vanished_event_readers_leave_no_traceback(cluster):
    c = cluster(size="16M")
    c.create_md("alpha")
    c.up("alpha")
    port = c.ports["alpha"]["control"]

    reset = _open_events(port)  # goes away with a TCP reset
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    closed = _open_events(port)  # goes away with an orderly close, unread
    live = _open_events(port)  # stays, and sees every event
    reset.close()
    closed.close()

    for _ in range(2):
        c.rblock("alpha", "disconnect", "r0")
        c.rblock("alpha", "connect", "r0")
    with live, live.makefile("rb") as f:
        evs = _events_read(f, 4)
    assert [(e["what"], e["new"]) for e in evs] == [("connection", "StandAlone"),
                                                    ("connection", "Connecting")] * 2, evs

    assert c.status("alpha")["node"] == "alpha"
    assert c.stop("alpha") == 0
    log = c.log("alpha")
    assert "stopped cleanly" in log, log
    assert "Traceback" not in log, log
    assert "Error handling request" not in log, log


def test_control_address_taken(cluster):
    c = cluster(size="16M")
    c.create_md("alpha")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", c.ports["alpha"]["control"]))
        taken.listen()
        res = c.rblock("alpha", "up", check=False, timeout_s=30)
    assert res.returncode == 1, (res.returncode, res.stderr)  # failed here (cli.py)
    port = c.ports["alpha"]["control"]
    last = res.stderr.splitlines()[-1]
    assert last.startswith(f"rblock: cannot listen for the control API on 127.0.0.1:{port}: "), \
        res.stderr
    assert "address already in use" in last.lower(), res.stderr


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_TIMEOUT_S)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_bad_action_requests_get_the_right_status_and_change_nothing(cluster):
    """Malformed or refused commands: 400, 404 and 409 with a message; the node carries on
    and its disk is untouched."""
    c = cluster(size="16M")
    c.create_md("alpha")
    c.up("alpha")
    port = c.ports["alpha"]["control"]
    status, body = _post(port, "/v1/resources/r0/inject-fault", b'{"reads": "yes"}')
    assert status == 400 and "booleans" in body["error"], body
    status, body = _post(port, "/v1/resources/r0/inject-fault", b"not json")
    assert status == 400 and "not JSON" in body["error"], body
    status, body = _post(port, "/v1/resources/r0/explode", b"{}")
    assert status == 404 and "inject-fault" in body["error"] and "attach" in body["error"], body
    status, body = _post(port, "/v1/resources/r9/attach", b"{}")
    assert status == 404 and "r9" in body["error"] and "r0" in body["error"], body
    status, body = _post(port, "/v1/resources/r0/attach", b"{}")
    assert status == 409 and "already has a disk" in body["error"], body
    res = c.rblock("alpha", "inject-fault", "r0", check=False)
    assert res.returncode == 2 and "--clear" in res.stderr, res.stderr
    st = c.res("alpha")
    assert st["disk"] == "Inconsistent" and st["disk_faults"] is None, st
    # the CLI's own round trip of the same command
    out = c.rblock("alpha", "inject-fault", "r0", "--reads", "--flushes").stdout
    assert "fails reads, flushes" in out, out
    assert c.res("alpha")["disk_faults"] == ["reads", "flushes"]
    assert "fault injection on: the disk fails reads, flushes" in \
        c.rblock("alpha", "status").stdout
    c.rblock("alpha", "inject-fault", "r0", "--clear")
    assert c.res("alpha")["disk_faults"] is None
    assert c.stop("alpha") == 0
    assert "Traceback" not in c.log("alpha")
