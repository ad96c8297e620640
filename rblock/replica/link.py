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
`peer_timeout_s` is dropped at that moment (a timer of its own, not the ping's grid), so a
silent peer is noticed in bounded time.

Before a link is authenticated, anyone who can reach the port is talking to it: only the
small control frames of set-up are accepted (PREAUTH_PAYLOAD_MAX_BYTES), and a listener
holds at most ADMISSIONS_MAX connections that have not authenticated yet, so strangers cost
a bounded amount of memory. Log lines about a link name the peer's address until the peer
has said its name.

Optional TLS (a resource with `tls = true`): the same frames, HMAC steps included, run inside
a TLS connection in which both sides present a certificate and check the other's against the
CA (`PeerTLS`). TLS keeps the data private and proves the peer holds a certificate from the
cluster's CA; the HMAC still proves it knows this resource's secret. A node's one replication
listener serves all its resources, TLS or not: `PeerListener` looks at the first byte a dialer
sends (0x16 opens a TLS handshake, our frames start with "R") and hands the socket to TLS or
to a plain link, so a TLS/plain mismatch is refused with a reason instead of garbling a
handshake. On a node where no resource has TLS on, the listener is the plain asyncio server,
and on any node the frame path has no TLS code on it at all.

Why a connection failed, for `rblock status` (beside Connecting): a link that closes before
it is up tells its owner `link_failed(link, kind, reason)`, KIND one of the FAIL_* words
(wrong secret, TLS refused, refused, refused by the peer, no answer, link lost); a REFUSE
frame carries its kind, so both ends say the same. An accepted connection that fails before
its HELLO named a resource (a TLS handshake, a TLS/plain mismatch) has no owner yet: the
listener reports it to `PeerListener.on_failure(remote_host, kind, reason)`, and the node
decides which resource it was probably for.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rblock.aio import IdlePoller, SendCoalescer, idle_poller
from rblock.arena import Arena
from rblock.replica import wire
from rblock.replica.wire import Frame, LinkError, T

log = logging.getLogger("rblock.link")

CHALLENGE_BYTES = 32
AUTH_TIMEOUT_S = 5.0  # TCP accept to authenticated, TLS handshake included
TLS_RECORD_HANDSHAKE = 0x16  # first byte of a TLS ClientHello record (RFC 8446, 5.1)
# Accepted connections not authenticated yet (first byte, TLS handshake, HELLO, AUTH), per
# listener: each holds a receive arena (256 KiB) for up to AUTH_TIMEOUT_S. Past it, new
# connections are closed at once; a refused dialer retries with its backoff.
ADMISSIONS_MAX = 16
# Payload limit of a frame before authentication: set-up frames are a HELLO (JSON, ~200 bytes),
# an AUTH (a 32-byte digest), AUTH_OK and REFUSE (a reason). Without it a stranger announcing a
# 32 MiB frame made the link reserve a 64 MiB receive arena before knowing who it was.
PREAUTH_PAYLOAD_MAX_BYTES = 64 * 1024
# Bytes the transport may hold beyond what the kernel took: past this the link is congested
# and protocol A writes wait (DRBD's on-congestion=block) instead of queueing without bound.
SEND_BUFFER_BYTES_MAX = 4 * 1024 * 1024
# A pass's frames leave in groups of this many, not all at the pass's end, and a secondary's
# write acks leave once a run holds this many seqs: the next stage (the peer applying, the
# primary completing to its client) starts while this one still works through its pass,
# instead of the three processes (client, primary, secondary) taking turns on a client's
# whole queue. fio 4k randwrite QD16, rblock-c on loopback, 3 s x 3 alternating: 36.6k IOPS
# (one group per pass) -> 47.3k (groups of 4 frames and of 4 acks); 3: 43.5k, 6: 47.8k;
# groups of 4 frames alone 45.8k, acks alone 44.3k (benchmarks/README.md, issue 13). Each
# group costs a send call; at queue depth 1 a pass holds one frame and nothing changes.
LINK_FLUSH_FRAMES = 4
ACK_RUN_FLUSH_SEQS = 4

# Why a connection attempt failed, in the words `rblock status` shows beside Connecting.
FAIL_SECRET = "wrong secret"  # the HMAC of the shared secret did not match
FAIL_TLS = "TLS refused"  # a TLS handshake failed, or one side has tls on and the other off
FAIL_REFUSED = "refused"  # this node refused the peer (the reason says why)
FAIL_PEER_REFUSED = "refused by the peer"  # the peer refused this node
FAIL_UNREACHABLE = "peer unreachable"  # no TCP connection (node.py's dialer)
FAIL_TIMEOUT = "no answer"  # connected, but the peer did not finish the set-up in time
FAIL_LOST = "link lost"  # closed before it was up, or dropped after
FAIL_DISCONNECTED = "disconnected by the peer"  # it said so (a disconnect, a shutdown)
_FAIL_KINDS = (FAIL_SECRET, FAIL_TLS, FAIL_REFUSED, FAIL_PEER_REFUSED, FAIL_UNREACHABLE,
               FAIL_TIMEOUT, FAIL_LOST, FAIL_DISCONNECTED)


class LinkRefused(LinkError):
    """A refusal with its FAIL_* kind (the route's TLS mismatch: FAIL_TLS)."""

    def __init__(self, message: str, kind: str = FAIL_REFUSED):
        super().__init__(message)
        self.kind = kind


class LinkOwner(Protocol):
    """What a link reports to (the resource)."""

    def link_up(self, link: PeerLink) -> None: ...

    def link_frame(self, link: PeerLink, frame: Frame) -> None: ...

    def link_down(self, link: PeerLink, reason: str) -> None: ...

    def link_failed(self, link: PeerLink, kind: str, reason: str) -> None:
        """The link closed before it was up (see FAIL_*)."""


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
        # owner.link_frame while UP, looked up once: every replicated write's frame goes there
        self._owner_frame: Callable[[PeerLink, Frame], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._out: SendCoalescer | None = None
        self._poller: IdlePoller | None = None  # polls our socket before the loop sleeps
        self._fd = -1
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.close_reason = ""
        self._arena = Arena()
        self._challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._peer_challenge = b""
        self._peer_verified = False
        self._we_verified = False
        self.was_up = False  # reached UP at least once (the dialer's backoff resets then)
        self._last_rx = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None  # AUTH_TIMEOUT_S, then the next PING
        self._silence_timer: asyncio.TimerHandle | None = None  # peer_timeout_s after last rx
        self._reading = True
        self._ack_runs: list[list[int]] = []  # [first seq, count] of acks not sent yet
        self.congested = False  # the transport holds over SEND_BUFFER_BYTES_MAX
        self._drain_waiters: list[asyncio.Future] = []  # bounded by the writes in flight
        self.sent_bytes = 0
        self.received_bytes = 0
        self.tls_version: str | None = None  # "TLSv1.3" on a TLS link, None on a plain one
        self.remote = "?"  # the peer's address, for log lines before it has said its name
        self.remote_host = ""  # ... and its host alone (which resource a failure was for)
        self.failure_kind = ""  # FAIL_*: why it closed before it was up, once known
        # Acceptor side, set by the listener: told of a failure before a HELLO named the
        # resource (owner still None): (remote host, FAIL_* kind, reason).
        self.unrouted_failure: Callable[[str, str, str], None] | None = None
        # Called once with this link when it is authenticated or closed, whichever is first
        # (the listener's count of connections being admitted).
        self.settled: Callable[[PeerLink], None] | None = None

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES_MAX)  # type: ignore[attr-defined]
        self._out = SendCoalescer(transport)
        self._out.prepare = self._emit_acks_if_any
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.remote = _format_peername(peername)
            self.remote_host = str(peername[0])
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
        if self.dialer:
            self._send_hello()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(AUTH_TIMEOUT_S, self._auth_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        prev = self.phase
        self.phase = Phase.CLOSED
        self._owner_frame = None
        self._settle()
        # The coalescer's `prepare` is a method of this link: a cycle that only the cyclic
        # GC would free, and with it the arena (up to 32 MiB), long after the close.
        if self._out is not None:
            self._out.prepare = None
            self._out.sent = None
            self._out.discard()
        if self._poller is not None:
            self._poller.remove(self._fd, self)
            self._poller = None
        self._ack_runs = []
        self._arena = Arena(0)  # payload views still in use keep their buffer alive
        closed_by_peer = not self.close_reason
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "peer closed")
        self.close_reason = reason
        self.transport = None
        self.congested = False
        self._wake_drain_waiters()
        if prev is Phase.UP and self.owner is not None:
            self.owner.link_down(self, reason)
        elif (prev is not Phase.CLOSED and closed_by_peer and self.dialer
                and self.tls_version is not None):
            # In TLS 1.3 the server checks the client's certificate after the client's side of
            # the handshake is done: a refused certificate shows up here, as a bare close.
            self.failure_kind = self.failure_kind or FAIL_TLS
            reason = (f"{reason}: the peer may have refused this node's certificate (it must "
                      f"be signed by the CA in the peer's tls_ca; see the peer's log)")
            log.error("link %s dial to %s (%s) not established: %s; the peer may have "
                      "refused this node's certificate (see its log): it must be signed by the "
                      "CA in the peer's tls_ca", self.resource or "?", self.peer_node or "?",
                      self.remote, self.close_reason)
        elif prev is not Phase.CLOSED:
            if self.dialer:  # it knows the peer's name and address from the config
                log.info("link %s dial to %s not established: %s", self.resource,
                         self.peer_node, reason)
            else:
                log.info("link %s accept not established: %s", self._label(), reason)
        if prev is not Phase.UP and prev is not Phase.CLOSED:
            self._report_failure(reason)
        if not self.closed.done():
            self.closed.set_result(reason)

    def _report_failure(self, reason: str) -> None:
        """Closed before it was up: tell whoever will show it (see the module docstring)."""
        kind = self.failure_kind or FAIL_LOST
        if self.owner is not None:
            report = getattr(self.owner, "link_failed", None)
            if report is not None:
                report(self, kind, reason)
        elif self.unrouted_failure is not None:
            self.unrouted_failure(self.remote_host, kind, reason)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._arena.writable()

    def buffer_updated(self, nbytes: int) -> None:
        self._arena.received(nbytes)
        self.received_bytes += nbytes
        self._last_rx = time.monotonic()
        self._process()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False
        self._wake_drain_waiters()

    async def drained(self) -> None:
        """Return once the link is not congested (or is gone)."""
        if not self.congested:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- frames in ----------------------------------------------------------------------------

    def _process(self) -> None:
        arena = self._arena
        size = 0
        buf = arena.buf
        view = memoryview(buf)
        try:
            while self._reading and self.phase is not _CLOSED:
                if arena.buf is not buf:  # a nested _process (resume) moved to a new arena
                    buf = arena.buf
                    view = memoryview(buf)
                got = wire.decode(buf, arena.start, arena.end, view)
                if got is None:
                    size = wire.frame_size(buf, arena.start, arena.end) or 0
                    if self.phase is not _UP and size > _PREAUTH_FRAME_MAX_BYTES:
                        self._preauth_too_big(size - wire.FRAME_OVERHEAD_BYTES)
                        return  # before reserve: nothing is allocated for it
                    break
                frame, arena.start = got
                if self._owner_frame is not None and frame.type not in _LINK_FRAMES:
                    self._owner_frame(self, frame)  # _dispatch's first case, one call less
                else:
                    self._dispatch(frame)
        except LinkError as e:
            if (self.phase is Phase.HELLO and self.tls_version is None
                    and arena.buf[arena.start] == TLS_RECORD_HANDSHAKE):
                reason = ("it opened a TLS handshake, but no resource on this node has "
                          "tls = true; set tls = true for the resource on both nodes, with "
                          "tls_cert, tls_key and tls_ca on each, or turn it off on the peer")
                log.error("peer link from %s refused: %s", self.remote, reason)
                self.failure_kind = FAIL_TLS
                self.close(reason, log_level=None)
                return
            self.close(f"{e}; frame dropped", log_level=logging.ERROR)
            return
        arena.reserve(size)

    def _preauth_too_big(self, payload_bytes: int) -> None:
        self.close(f"a {self.phase.value} frame announces a {payload_bytes}-byte payload, over "
                   f"the {PREAUTH_PAYLOAD_MAX_BYTES}-byte limit before authentication; "
                   f"is this a replication peer of the same version?",
                   log_level=logging.ERROR)

    def _dispatch(self, f: Frame) -> None:
        if self.phase is _UP and f.type not in _LINK_FRAMES:
            assert self.owner is not None
            self.owner.link_frame(self, f)
        elif f.type is T.PING:
            self.send([Frame(T.PONG)])
        elif f.type is T.PONG:
            pass
        elif f.type is T.REFUSE:
            body = f.json()
            kind = body.get("kind")
            self.failure_kind = (kind if kind in (FAIL_SECRET, FAIL_TLS) else
                                 FAIL_PEER_REFUSED)
            self.close(f"peer refused: {body.get('reason', '?')}", log_level=logging.ERROR)
        elif self.phase is Phase.UP:
            assert self.owner is not None
            self.owner.link_frame(self, f)
        elif len(f.payload) > PREAUTH_PAYLOAD_MAX_BYTES:
            self._preauth_too_big(len(f.payload))  # it came whole, within one receive
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
            self.refuse(str(e), getattr(e, "kind", FAIL_REFUSED))
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
                        f"does not know the shared secret; set the same secret on both nodes",
                        FAIL_SECRET)
            return
        self._peer_verified = True
        self.send([Frame(T.AUTH_OK)])
        self._maybe_up()

    def _maybe_up(self) -> None:
        if not (self._peer_verified and self._we_verified):
            return
        self.phase = Phase.UP
        self.was_up = True
        self._settle()
        assert self.owner is not None
        self._owner_frame = self.owner.link_frame
        if self._timer is not None:
            self._timer.cancel()
        self._schedule_ping()
        self._silence_timer = asyncio.get_running_loop().call_later(
            self.peer_timeout_s, self._silence_check)
        if self.tls_version is not None:
            cipher = self.transport.get_extra_info("cipher") if self.transport else None
            peercert = self.transport.get_extra_info("peercert") if self.transport else None
            log.info("link %s with %s: %s (%s), peer certificate %s", self.resource,
                     self.peer_node, self.tls_version, cipher[0] if cipher else "?",
                     _cert_name(peercert))
        poller = idle_poller()
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if (poller is not None and self.tls_version is None and sock is not None
                and self._out is not None):
            self._poller, self._fd = poller, sock.fileno()
            poller.add(self._fd, self)
            self._out.sent = poller.arm
        assert self.owner is not None
        self.owner.link_up(self)

    def pollable(self) -> bool:
        """IdlePoller may read our socket: up and reading."""
        return self._reading and self.phase is _UP and self.transport is not None

    def _owner_size(self) -> int:
        return int(getattr(self.owner, "size_bytes", -1))

    def _send_hello(self) -> None:
        self.send(wire.encode_json(T.HELLO, {
            "version": wire.PROTOCOL_VERSION, "node": self.local_node,
            "resource": self.resource, "size_bytes": self._owner_size(),
            "challenge": self._challenge.hex(),
        }))

    # --- liveness -------------------------------------------------------------------------------

    def _settle(self) -> None:
        settled, self.settled = self.settled, None
        if settled is not None:
            settled(self)

    def _auth_timeout(self) -> None:
        if self.phase is not Phase.UP:
            self.failure_kind = self.failure_kind or FAIL_TIMEOUT
            self.close(f"peer did not complete authentication in {AUTH_TIMEOUT_S:g}s")

    def _schedule_ping(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.ping_interval_s, self._tick)

    def _tick(self) -> None:
        if self.phase is not Phase.UP:
            return
        self.send([Frame(T.PING)])
        self._schedule_ping()

    def _silence_check(self) -> None:
        """Runs when the peer would have been silent for peer_timeout_s if nothing came since
        the timer was set. Receiving does not move the timer (that would cost a timer per
        receive on the write path): if something came, the check runs again at the new
        deadline, so the link is dropped exactly peer_timeout_s after the last receive, at a
        cost of about one timer per peer_timeout_s."""
        if self.phase is not Phase.UP:
            return
        if not self._reading:
            # This node stopped reading (its apply queue is full): the peer's frames wait in
            # the socket, which says nothing about the peer. resume() restarts the count.
            self._silence_timer = asyncio.get_running_loop().call_later(
                self.peer_timeout_s, self._silence_check)
            return
        silent_s = time.monotonic() - self._last_rx
        if silent_s < self.peer_timeout_s:
            self._silence_timer = asyncio.get_running_loop().call_later(
                self.peer_timeout_s - silent_s, self._silence_check)
            return
        # abort, not close: close() waits for the send buffer to drain, which a dead link
        # never does, and writes waiting for acks would hang with it.
        reason = f"peer silent for {silent_s:.2f}s (timeout {self.peer_timeout_s:g}s)"
        log.warning("link %s with %s: %s", self.resource, self.peer_node, reason)
        self.abort(reason)

    # --- frames out and closing -------------------------------------------------------------

    def send(self, bufs: list[bytes | memoryview] | list[Frame]) -> bool:
        """Queue frames (or already encoded buffers); False if the link is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        if self._ack_runs:
            self._emit_acks()  # acks queued earlier go first: frames keep their order
        out: list[bytes | memoryview] = []
        for b in bufs:
            out.extend(wire.encode(b) if isinstance(b, Frame) else [b])
        self.sent_bytes += sum(len(b) for b in out)
        assert self._out is not None
        self._out.write(out)
        return True

    def send_frame(self, t: T, flags: int, fid: int, offset: int, aux: int,
                   payload: bytes | memoryview = b"") -> bool:
        """`send` of one frame given by its fields (the write path: no Frame, no lists)."""
        if self.transport is None or self.transport.is_closing():
            return False
        if self._ack_runs:
            self._emit_acks()
        self.sent_bytes += wire.FRAME_OVERHEAD_BYTES + len(payload)
        out = self._out
        out.write(wire.encode_fields(t, flags, fid, offset, aux, payload))  # type: ignore[union-attr]
        if out.writes >= LINK_FLUSH_FRAMES:  # type: ignore[union-attr]
            out.flush()  # type: ignore[union-attr]
        return True

    def flush(self) -> None:
        """Hand what is queued to the transport now instead of at the end of the pass."""
        if self._out is not None and self.transport is not None:
            self._out.flush()

    def send_write_ack(self, seq: int) -> None:
        """Acknowledge write SEQ as applied. Acks of one loop pass leave together, as one
        WRITE_ACK frame per run of consecutive seqs (the secondary applies in order, so
        usually one run for the whole pass) at the end of the pass, before the next other
        frame (frames keep their order), or once the run holds ACK_RUN_FLUSH_SEQS seqs."""
        runs = self._ack_runs
        if runs:
            last = runs[-1]
            if last[0] + last[1] == seq:
                last[1] += 1  # the common case: the next seq of this pass's run
                if last[1] >= ACK_RUN_FLUSH_SEQS:
                    self._emit_acks()  # the primary completes these while we go on
                    self._out.flush()  # type: ignore[union-attr]
                return
        elif self.transport is None or self.transport.is_closing():
            return
        runs.append([seq, 1])
        self._out.schedule()  # type: ignore[union-attr]

    def _emit_acks_if_any(self) -> None:
        if self._ack_runs:
            self._emit_acks()

    def _emit_acks(self) -> None:
        runs, self._ack_runs = self._ack_runs, []
        if self.transport is None or self.transport.is_closing():
            return
        out: list[bytes | memoryview] = []
        for first, count in runs:
            out.extend(wire.encode_fields(T.WRITE_ACK, 0, first, 0, count))
        self.sent_bytes += wire.FRAME_OVERHEAD_BYTES * len(runs)
        self._out.write(out)  # type: ignore[union-attr]

    def pause(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._reading and self.transport is not None:
            self._reading = True
            self._last_rx = time.monotonic()  # the time paused was not the peer's silence
            self.transport.resume_reading()
            self._process()

    def refuse(self, reason: str, kind: str = FAIL_REFUSED) -> None:
        assert kind in _FAIL_KINDS, kind
        log.error("link %s refused: %s", self._label(), reason)
        self.send(wire.encode_json(T.REFUSE, {"reason": reason, "kind": kind}))
        if self.phase is not Phase.UP:
            self.failure_kind = self.failure_kind or kind
        self.close(reason, log_level=None)

    def close(self, reason: str, log_level: int | None = logging.INFO) -> None:
        if self.phase is Phase.CLOSED or self.close_reason:
            return
        self.close_reason = reason
        if log_level is not None:
            log.log(log_level, "link %s closing: %s", self._label(), reason)
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
        return self.phase is _UP and self.transport is not None

    def _label(self) -> str:
        """The link in log lines: 'r0 with beta' once the peer has said its name (authenticated
        or not: then with its address), its address until then."""
        if not self.peer_node:
            return f"{self.resource + ' ' if self.resource else ''}from {self.remote}"
        if self.phase is _UP:
            return f"{self.resource or '?'} with {self.peer_node}"
        return f"{self.resource or '?'} with {self.peer_node} ({self.remote})"


# Frames the link itself answers or acts on, in any phase.
_LINK_FRAMES = frozenset({T.PING, T.PONG, T.REFUSE})
# Looked up once (an enum member named costs a class attribute lookup): used per frame.
_UP = Phase.UP
_CLOSED = Phase.CLOSED
_PREAUTH_FRAME_MAX_BYTES = wire.FRAME_OVERHEAD_BYTES + PREAUTH_PAYLOAD_MAX_BYTES


def _format_peername(peername: tuple) -> str:
    host, port = peername[0], peername[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _cert_name(peercert: dict | None) -> str:
    """'CN=beta, issued by CN=rblock CA' from ssl's decoded certificate dict."""
    if not peercert:
        return "?"

    def name(rdns) -> str:
        return ", ".join(f"{'CN' if k == 'commonName' else k}={v}"
                         for rdn in rdns for k, v in rdn) or "?"
    return f"{name(peercert.get('subject', ()))}, issued by {name(peercert.get('issuer', ()))}"


# --- TLS ------------------------------------------------------------------------------------------


class TLSFilesError(Exception):
    """A node's TLS files are unusable. `key` is the config key to fix (tls_cert, ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class PeerTLS:
    """The SSL contexts of one node's peer links: its certificate on both, peers checked
    against the CA on both (each node dials some peers and accepts others)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    ca: Path

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path) -> PeerTLS:
        """Build both contexts and shake hands with itself in memory, so that a certificate
        the peers would refuse (another CA, a server-only key usage, expired) stops
        `rblock up` with the reason instead of failing every connection later."""
        for k, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise TLSFilesError(k, f"cannot read {path}: {e.strerror}; fix the path or "
                                       "the file's permissions") from None
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Peers are found by address, not by name, and a node's certificate names the node:
        # what is checked is the CA's signature (and, inside, the shared secret's HMAC).
        client.check_hostname = False
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cafile=str(ca))
            except (ssl.SSLError, ValueError) as e:
                raise TLSFilesError("tls_ca", f"{ca} holds no usable CA certificate ({e}); "
                                              "give the CA's certificate in PEM") from None
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except ssl.SSLError as e:
                if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
                    raise TLSFilesError("tls_key", f"{key} is not the key of the certificate "
                                                   f"{cert}; give the key it was made with") from None
                raise TLSFilesError("tls_cert", f"cannot load {cert} with key {key} ({e}); "
                                                "give a PEM certificate and its unencrypted PEM "
                                                "key") from None
        try:
            _handshake_in_memory(server, client)
        except ssl.SSLError as e:
            raise TLSFilesError("tls_cert", f"{cert} would be refused by the peers: "
                                            f"{describe_tls_error(e, ca)}") from None
        return cls(server, client, ca)


def _handshake_in_memory(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A full handshake between the two contexts through memory BIOs; raises ssl.SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(16):  # a TLS 1.3 handshake takes 2-3 flights; 16 is plenty
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the client is done before the server has checked its certificate; one
            # read on the client surfaces the server's alert, if any.
            try:
                client.read(1)
            except ssl.SSLWantReadError:
                pass
            return
    raise ssl.SSLError("TLS handshake with itself did not finish")


_BARE_ERRORS = {  # errors asyncio raises without a message
    ConnectionResetError: "connection reset by the peer",
    ConnectionAbortedError: "connection aborted",
    BrokenPipeError: "the peer closed the connection",
}


def describe_tls_error(e: BaseException, ca: Path) -> str:
    """A failed peer-link TLS handshake as `what; how to fix it`."""
    text = (getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
            or _BARE_ERRORS.get(type(e), type(e).__name__))
    low = str(e).lower() + " " + str(text).lower()
    if "certificate purpose" in low:  # OpenSSL 1.1 "unsupported", 3.0 "unsuitable"
        fix = ("a node's certificate must allow both TLS server and client use: make it with "
               "keyUsage = digitalSignature and extendedKeyUsage = serverAuth, clientAuth "
               "(or without these extensions), not as a CA certificate")
    elif "expired" in low or "not yet valid" in low:
        fix = "renew the certificate (and check both machines' clocks)"
    elif isinstance(e, ssl.SSLCertVerificationError) or "unknown ca" in low \
            or "certificate verify failed" in low or "bad certificate" in low:
        fix = (f"the certificate is not signed by the CA in tls_ca ({ca}); give every node a "
               "certificate signed by the same CA")
    elif "wrong version number" in low or "record layer" in low or "packet length" in low \
            or "http request" in low:
        fix = "the peer does not speak TLS here; set tls = true for the resource on both nodes"
    elif isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)) \
            or "eof" in low:
        fix = ("the peer closed the connection during the TLS handshake: it may have TLS off "
               "for this resource (set tls = true on both nodes) or have refused this node's "
               "certificate (see its log)")
    else:
        fix = "see the peer's log; both nodes need tls = true and certificates from one CA"
    return f"{text}; {fix}"


class PeerListener:
    """A node's replication listener. `new_link()` makes the acceptor's PeerLink.

    Admission: a connection counts against ADMISSIONS_MAX from its accept until its link is
    authenticated or closed (`PeerLink.settled`), on the plain path and the TLS path alike;
    past the limit, new connections are closed at once with a log line naming the address.
    The count is taken when the connection is accepted (in the protocol factory, or the TLS
    accept loop), so a burst of connects cannot overshoot it."""

    def __init__(self, new_link: Callable[[], PeerLink], tls: PeerTLS | None):
        self.new_link = new_link
        self.tls = tls
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._admissions: set[asyncio.Task] = set()
        self._unsettled: set[PeerLink] = set()  # accepted, not authenticated yet
        # Told of connections that failed before a HELLO named their resource: (remote
        # host, FAIL_* kind, reason); the node shows them on the resource they were for.
        self.on_failure: Callable[[str, str, str], None] | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        if self.tls is None:
            # No TLS on this node: the plain server (the frame path has no TLS code on it).
            self._server = await loop.create_server(self._plain_protocol, host, port,
                                                    reuse_address=True)
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = loop.create_task(self._accept_loop(sock))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
        for t in list(self._admissions):
            t.cancel()
        if self._sock is not None:
            self._sock.close()

    def _admitted_link(self) -> PeerLink:
        link = self.new_link()
        self._unsettled.add(link)
        link.settled = self._unsettled.discard
        link.unrouted_failure = self._failed
        return link

    def _failed(self, remote_host: str, kind: str, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(remote_host, kind, reason)

    def _full(self) -> bool:
        return len(self._unsettled) >= ADMISSIONS_MAX

    def _refusal(self, remote: str) -> None:
        log.warning("peer link from %s dropped: %d connections are already being admitted "
                    "(ADMISSIONS_MAX); the dialer retries", remote, len(self._unsettled))

    def _plain_protocol(self) -> asyncio.BaseProtocol:
        if self._full():
            return _Dropped(self._refusal)
        return self._admitted_link()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, addr = await loop.sock_accept(lsock)
            remote = _format_peername(addr)
            if self._full():
                self._refusal(remote)
                sock.close()
                continue
            task = loop.create_task(self._admit(sock, remote, self._admitted_link()))
            self._admissions.add(task)
            task.add_done_callback(self._admissions.discard)

    async def _admit(self, sock: socket.socket, remote: str, link: PeerLink) -> None:
        """Hand SOCK to LINK, through TLS if it opens a TLS handshake. Until the transport
        has called LINK's connection_made, this function settles LINK itself on failure."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            try:
                first = await asyncio.wait_for(_peek_byte(sock), AUTH_TIMEOUT_S)
            except (TimeoutError, OSError) as e:
                sock.close()
                if isinstance(e, TimeoutError):
                    log.warning("peer link from %s dropped: nothing received in %.0fs", remote,
                                AUTH_TIMEOUT_S)
                return
            if not first:
                sock.close()
                return  # closed before saying anything (a port probe)
            # From here the socket belongs to the transport, which closes it on any failure.
            if first[0] != TLS_RECORD_HANDSHAKE:
                # A plain dialer: its HELLO names the resource, and the route refuses it (with
                # a REFUSE frame the dialer logs) if that resource wants TLS.
                try:
                    await loop.connect_accepted_socket(lambda: link, sock)
                except OSError as e:
                    log.error("peer link from %s failed: %s", remote, e)
                return
            try:
                await loop.connect_accepted_socket(lambda: link, sock, ssl=self.tls.server,
                                                   ssl_handshake_timeout=AUTH_TIMEOUT_S)
            except (ssl.SSLError, OSError) as e:  # TimeoutError included: a stalled handshake
                why = describe_tls_error(e, self.tls.ca)
                log.error("peer link from %s refused: TLS handshake failed: %s", remote, why)
                self._failed(_host_of(remote), FAIL_TLS,
                             f"a TLS handshake from {remote} failed: {why}")
        finally:
            if link.transport is None and link.phase is not Phase.CLOSED:
                self._unsettled.discard(link)  # never connected: it will not settle itself
                link.settled = None


class _Dropped(asyncio.Protocol):
    """The protocol of a connection the plain listener does not admit: closed at once."""

    def __init__(self, report: Callable[[str], None]):
        self._report = report

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self._report(_format_peername(peername) if isinstance(peername, tuple) else "?")
        transport.abort()  # nothing to flush; a reset also frees the port at once


async def _peek_byte(sock: socket.socket) -> bytes:
    """The connection's first byte, left in the socket for whoever reads it next."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        while True:
            try:
                return sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                await ready
                ready = loop.create_future()
                loop.remove_reader(fd)
                loop.add_reader(fd, lambda f=ready: f.done() or f.set_result(None))
    finally:
        loop.remove_reader(fd)


def _host_of(remote: str) -> str:
    """"127.0.0.1" of "127.0.0.1:50242", "::1" of "[::1]:50242" (_format_peername's)."""
    return remote.rsplit(":", 1)[0].strip("[]")
