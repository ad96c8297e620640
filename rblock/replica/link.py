"""The peer link: one TCP connection between two nodes for one resource. Moves frames only.

Connection set-up (both directions of a resource use the same steps):

    dialer                     acceptor
    HELLO(node, resource, challenge) ->
                            <- HELLO(node, resource, challenge)   (after routing it)
    AUTH(hmac(secret, acceptor's challenge)) ->
                            <- AUTH(hmac(secret, dialer's challenge))
    AUTH_OK / REFUSE  <->  AUTH_OK / REFUSE

Like DRBD's cram-hmac-alg: the secret never crosses the wire, and each side proves it knows
it by signing the other's fresh random challenge (HMAC-SHA256, bound to the signer's node
name and the resource, so a reply cannot be replayed for another node or resource). Once
both sides have sent and received AUTH_OK, the owner (the resource) gets `link_up` and every
later frame. Frames with a bad CRC or magic drop the connection before anything acts on them.

Liveness: a PING goes out every `ping_interval_s`; a link that has received nothing for
`peer_timeout_s` is dropped, so a silent peer is noticed in bounded time.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Protocol

from rblock.aio import SendCoalescer
from rblock.arena import Arena
from rblock.replica import wire
from rblock.replica.wire import Frame, LinkError, T

log = logging.getLogger("rblock.link")

CHALLENGE_BYTES = 32
AUTH_TIMEOUT_S = 5.0


class LinkOwner(Protocol):
    """What a link reports to (the resource)."""

    def link_up(self, link: PeerLink) -> None: ...

    def link_frame(self, link: PeerLink, frame: Frame) -> None: ...

    def link_down(self, link: PeerLink, reason: str) -> None: ...


class Phase(enum.Enum):
    HELLO = "hello"
    AUTH = "auth"
    UP = "up"
    CLOSED = "closed"


def auth_digest(secret: str, challenge: bytes, signer: str, resource: str) -> bytes:
    msg = challenge + b"|" + signer.encode() + b"|" + resource.encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


class PeerLink(asyncio.BufferedProtocol):
    """A framed, authenticated connection. `route(link, hello)` (acceptor side) finds the
    owner and secret for the resource named in the peer's HELLO, or raises LinkError."""

    def __init__(self, local_node: str, *, dialer: bool, ping_interval_s: float,
                 peer_timeout_s: float,
                 route: Callable[[PeerLink, dict], tuple[LinkOwner, str, str]] | None = None,
                 owner: LinkOwner | None = None, secret: str = "", resource: str = "",
                 expect_node: str = ""):
        self.local_node = local_node
        self.dialer = dialer
        self.ping_interval_s = ping_interval_s
        self.peer_timeout_s = peer_timeout_s
        self._route = route
        self.owner = owner
        self.secret = secret
        self.resource = resource
        self.peer_node = expect_node
        self.phase = Phase.HELLO
        self.transport: asyncio.Transport | None = None
        self._out: SendCoalescer | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.close_reason = ""
        self._arena = Arena()
        self._challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._peer_challenge = b""
        self._peer_verified = False
        self._we_verified = False
        self.was_up = False  # reached UP at least once (the dialer's backoff resets then)
        self._last_rx = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True
        self.sent_bytes = 0
        self.received_bytes = 0

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._out = SendCoalescer(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.dialer:
            self._send_hello()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(AUTH_TIMEOUT_S, self._auth_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        prev = self.phase
        self.phase = Phase.CLOSED
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "peer closed")
        self.close_reason = reason
        self.transport = None
        if prev is Phase.UP and self.owner is not None:
            self.owner.link_down(self, reason)
        elif prev is not Phase.CLOSED:
            log.info("link %s %s to %s not established: %s", self.resource or "?",
                     "dial" if self.dialer else "accept", self.peer_node or "?", reason)
        if not self.closed.done():
            self.closed.set_result(reason)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._arena.writable()

    def buffer_updated(self, nbytes: int) -> None:
        self._arena.received(nbytes)
        self.received_bytes += nbytes
        self._last_rx = time.monotonic()
        self._process()

    def eof_received(self) -> bool:
        return False

    # --- frames in ----------------------------------------------------------------------------

    def _process(self) -> None:
        arena = self._arena
        size = 0
        try:
            while self._reading and self.phase is not Phase.CLOSED:
                size = wire.frame_size(arena.buf, arena.start, arena.end) or 0
                got = wire.decode(arena.buf, arena.start, arena.end)
                if got is None:
                    break
                frame, nxt = got
                arena.take(nxt - arena.start)
                size = 0
                self._dispatch(frame)
        except LinkError as e:
            self.close(f"{e}; frame dropped", log_level=logging.ERROR)
            return
        arena.reserve(size)

    def _dispatch(self, f: Frame) -> None:
        if f.type is T.PING:
            self.send([Frame(T.PONG)])
        elif f.type is T.PONG:
            pass
        elif f.type is T.REFUSE:
            self.close(f"peer refused: {f.json().get('reason', '?')}", log_level=logging.ERROR)
        elif self.phase is Phase.UP:
            assert self.owner is not None
            self.owner.link_frame(self, f)
        elif f.type is T.HELLO and self.phase is Phase.HELLO:
            self._on_hello(f.json())
        elif f.type is T.AUTH and self.phase is Phase.AUTH:
            self._on_auth(bytes(f.payload))
        elif f.type is T.AUTH_OK and self.phase is Phase.AUTH:
            self._we_verified = True
            self._maybe_up()
        else:
            self.refuse(f"unexpected {f.type.name} frame during {self.phase.value}")

    def _on_hello(self, hello: dict) -> None:
        try:
            if hello.get("version") != wire.PROTOCOL_VERSION:
                raise LinkError(f"peer speaks protocol version {hello.get('version')}, "
                                f"this node {wire.PROTOCOL_VERSION}; upgrade the older node")
            peer = str(hello["node"])
            resource = str(hello["resource"])
            self._peer_challenge = bytes.fromhex(hello["challenge"])
            if not self.dialer:
                assert self._route is not None
                self.owner, self.secret, self.peer_node = self._route(self, hello)
                self.resource = resource
            elif resource != self.resource or peer != self.peer_node:
                raise LinkError(f"dialed {self.peer_node} for {self.resource}, but the peer is "
                                f"{peer} for {resource}; check the replication addresses")
            if int(hello["size_bytes"]) != self._owner_size():
                raise LinkError(f"resource {resource} is {hello['size_bytes']} bytes on {peer} "
                                f"but {self._owner_size()} here; make the sizes equal")
        except (KeyError, ValueError, TypeError) as e:
            self.refuse(f"malformed HELLO: {e}")
            return
        except LinkError as e:
            self.refuse(str(e))
            return
        if not self.dialer:
            self._send_hello()
        self.phase = Phase.AUTH
        self.send([Frame(T.AUTH, payload=auth_digest(self.secret, self._peer_challenge,
                                                       self.local_node, self.resource))])

    def _on_auth(self, digest: bytes) -> None:
        expected = auth_digest(self.secret, self._challenge, self.peer_node, self.resource)
        if not hmac.compare_digest(digest, expected):
            self.refuse(f"authentication failed for resource {self.resource}: {self.peer_node} "
                        f"does not know the shared secret; set the same secret on both nodes")
            return
        self._peer_verified = True
        self.send([Frame(T.AUTH_OK)])
        self._maybe_up()

    def _maybe_up(self) -> None:
        if not (self._peer_verified and self._we_verified):
            return
        self.phase = Phase.UP
        self.was_up = True
        if self._timer is not None:
            self._timer.cancel()
        self._schedule_ping()
        assert self.owner is not None
        self.owner.link_up(self)

    def _owner_size(self) -> int:
        return int(getattr(self.owner, "size_bytes", -1))

    def _send_hello(self) -> None:
        self.send(wire.encode_json(T.HELLO, {
            "version": wire.PROTOCOL_VERSION, "node": self.local_node,
            "resource": self.resource, "size_bytes": self._owner_size(),
            "challenge": self._challenge.hex(),
        }))

    # --- liveness -------------------------------------------------------------------------------

    def _auth_timeout(self) -> None:
        if self.phase is not Phase.UP:
            self.close("peer did not complete authentication in time")

    def _schedule_ping(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.ping_interval_s, self._tick)

    def _tick(self) -> None:
        if self.phase is not Phase.UP:
            return
        silent_s = time.monotonic() - self._last_rx
        if silent_s > self.peer_timeout_s:
            # abort, not close: close() waits for the send buffer to drain, which a dead
            # link never does, and writes waiting for acks would hang with it.
            reason = f"peer silent for {silent_s:.1f}s (timeout {self.peer_timeout_s}s)"
            log.warning("link %s with %s: %s", self.resource, self.peer_node, reason)
            self.abort(reason)
            return
        self.send([Frame(T.PING)])
        self._schedule_ping()

    # --- frames out and closing -------------------------------------------------------------

    def send(self, bufs: list[bytes | memoryview] | list[Frame]) -> bool:
        """Queue frames (or already encoded buffers); False if the link is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        out: list[bytes | memoryview] = []
        for b in bufs:
            out.extend(wire.encode(b) if isinstance(b, Frame) else [b])
        self.sent_bytes += sum(len(b) for b in out)
        assert self._out is not None
        self._out.write(out)
        return True

    def pause(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()
            self._process()

    def refuse(self, reason: str) -> None:
        log.error("link %s with %s refused: %s", self.resource or "?", self.peer_node or "?",
                  reason)
        self.send(wire.encode_json(T.REFUSE, {"reason": reason}))
        self.close(reason, log_level=None)

    def close(self, reason: str, log_level: int | None = logging.INFO) -> None:
        if self.phase is Phase.CLOSED or self.close_reason:
            return
        self.close_reason = reason
        if log_level is not None:
            log.log(log_level, "link %s with %s closing: %s", self.resource or "?",
                    self.peer_node or "?", reason)
        if self.transport is not None:
            if self._out is not None:
                self._out.flush()  # frames queued in this pass (a REFUSE, a DISCONNECT)
            self.transport.close()

    def abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    @property
    def up(self) -> bool:
        return self.phase is Phase.UP and self.transport is not None
