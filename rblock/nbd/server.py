"""The asyncio shell of the NBD server: sockets, buffers, TLS, back-pressure. No protocol rules.

Receive path (no copy of payloads): each connection receives into an `Arena` via
BufferedProtocol, so the kernel copies straight into it, and a WRITE's payload goes to the
device as a memoryview of the arena (see rblock/arena.py).

Requests are started eagerly (`run_eager`; WRITEs through the device's callback interface,
`BlockDevice.start_write`): a page-cache write completes and is answered in the same loop
pass that received it. Replies produced while a received batch is processed are
sent with one `writelines` (one syscall for many replies).

Bounds: per connection at most INFLIGHT_REQUESTS_MAX requests and INFLIGHT_BYTES_MAX payload
bytes in flight; past either, the connection stops reading until replies drain. The same
happens while the transport's send buffer is over its high-water mark. Per server at most
CONNECTIONS_MAX connections (fewer if the open-file limit says so); more are closed at once.

Counters: every reply is counted in its export's `RequestStats` (rblock/nbd/stats.py, read by
/metrics); the replies of a pass are timed when the pass's replies go out (`_count_replies`,
the coalescer's `prepare`), one clock read for all of them.

Memory of a connection that has not chosen an export yet (anyone who can connect can open
many): a HANDSHAKE_BUFFER_BYTES receive buffer and the handshake's own state, for at most
HANDSHAKE_TIMEOUT_S. The receive arena (256 KiB) is allocated when transmission starts.
(Before, every connection got its arena at accept: 2000 idle connections cost 520 MB.)
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from rblock.aio import IdlePoller, SendCoalescer, idle_poller, run_eager
from rblock.arena import Arena
from rblock.nbd import proto as p
from rblock.nbd.handshake import (
    Close,
    ExportInfo,
    ExportRefused,
    Handshake,
    Negotiated,
    StartTLS,
    TLSMode,
)
from rblock.nbd.stats import OpStats, RequestStats, now_ns
from rblock.nbd.transmission import (
    BLOCK_PREFERRED_BYTES,
    PAYLOAD_MAX_BYTES,
    RequestError,
    Session,
    check_request,
    error_reply,
    nbd_errno,
    read_reply,
    transmission_flags,
)
from rblock.store.device import BlockDevice

log = logging.getLogger("rblock.nbd")

# The busy poll (rblock/aio.py IdlePoller) runs after a pass that sent at most this many
# replies: the case of a client that waits for each one (queue depth 1 or 2).
POLL_AFTER_REPLIES_MAX = 2
INFLIGHT_REQUESTS_MAX = 64
INFLIGHT_BYTES_MAX = 64 * 1024 * 1024
SPARSE_READ_MIN_BYTES = 64 * 1024  # smaller READs skip hole detection (two lseeks)
TLS_HANDSHAKE_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 30.0  # accept to export chosen; a client still in the options is dropped
# Receive buffer of the option phase: options are small (an export name, a few info requests)
# and the handshake copies what it gets (OPTION_DATA_MAX_BYTES bounds an option's data), so a
# small buffer only costs larger options a few more receives.
HANDSHAKE_BUFFER_BYTES = 4 * 1024
# Connections per server, in any phase: each holds a file descriptor and, once transmitting,
# a receive arena and up to INFLIGHT_BYTES_MAX of payloads. One more is closed at accept.
CONNECTIONS_MAX = 1000
# File descriptors kept for the rest of the process (images, metadata, peer links, control,
# logs): the connection limit is lowered to fit the open-file limit (ulimit -n) less this, so
# that accept() does not fail with EMFILE instead.
FDS_RESERVED_COUNT = 64
# Runs of replies (one command, one received batch) a pass keeps before timing them: a pass
# whose replies alternate commands (READ, WRITE, READ, ...) times them as it goes past this.
REPLY_RUNS_MAX = 64
DRAIN_TIMEOUT_S = 30.0  # how long shutdown waits for in-flight requests
CLOSE_GRACE_S = 2.0  # a closing connection whose client does not read replies is then cut


# Looked up once: these are used for every request.
_REQUEST_BYTES = p.REQUEST.size
_WRITE = p.CMD_WRITE
_READ = p.CMD_READ
_DISC = p.CMD_DISC
_FUA = p.CMD_FLAG_FUA
_NOT_FUA = ~p.CMD_FLAG_FUA
_REQUEST_MAGIC = p.REQUEST_MAGIC
_unpack_request = p.REQUEST.unpack_from
_Request = p.Request
# A connection's counters until it has chosen an export (it sends no request before that):
# one object for all of them, not one per accepted connection.
_NO_STATS = RequestStats()


@dataclass
class Export:
    name: str
    device: BlockDevice
    description: str = ""
    # What its requests did, over every connection (rblock/nbd/stats.py; read by /metrics).
    stats: RequestStats = field(default_factory=RequestStats)

    def info(self) -> ExportInfo:
        d = self.device
        return ExportInfo(
            name=self.name, size_bytes=d.size_bytes, tflags=transmission_flags(d.capabilities),
            description=self.description or d.description,
            block_min_bytes=1, block_preferred_bytes=BLOCK_PREFERRED_BYTES,
            block_max_bytes=PAYLOAD_MAX_BYTES,
        )


@dataclass
class ExportCatalog:
    """Named exports; the first one is the default (the empty name)."""

    exports: dict[str, Export] = field(default_factory=dict)
    # Called with the export name before it is served; may raise ExportRefused (a secondary
    # refusing clients, for instance).
    gate: Callable[[str], None] | None = None

    def add(self, export: Export) -> None:
        if export.name in self.exports:
            raise ValueError(f"export '{export.name}' is defined twice")
        self.exports[export.name] = export

    def names(self) -> list[str]:
        return list(self.exports)

    def get(self, name: str) -> Export:
        if name == "" and self.exports:
            name = next(iter(self.exports))
        try:
            export = self.exports[name]
        except KeyError:
            raise ExportRefused(
                f"export '{name}' not found; exports: {', '.join(self.exports) or '(none)'}"
            ) from None
        if self.gate is not None:
            self.gate(export.name)
        return export

    def lookup(self, name: str) -> ExportInfo:
        return self.get(name).info()


class NBDServer:
    """Listens, runs one Connection per client, and shuts down cleanly."""

    def __init__(self, catalog: ExportCatalog, tls_context: ssl.SSLContext | None = None,
                 tls_mode: TLSMode = TLSMode.OFF, *, connections_max: int = CONNECTIONS_MAX,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S):
        assert (tls_context is None) == (tls_mode is TLSMode.OFF)
        self.catalog = catalog
        self.tls_context = tls_context
        self.tls_mode = tls_mode
        self.handshake_timeout_s = handshake_timeout_s
        self.connections_max, self._limit_why = _connections_limit(connections_max)
        self.connections: set[Connection] = set()
        # Connections made by the factory and not lost yet. Counted in the factory, not in
        # connection_made (which runs a loop pass later), so a burst cannot overshoot the limit.
        self.connections_open = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._next_id = 0

    def _new_connection(self) -> asyncio.BaseProtocol:
        if self.connections_open >= self.connections_max:
            return _Refused(self)
        self.connections_open += 1
        self._next_id += 1
        return Connection(self, self._next_id)

    def _refused(self, peer: str) -> None:
        log.warning("conn from %s refused: %d connections are open, the most this server "
                    "takes (%s)", peer, self.connections_open, self._limit_why)

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        srv = await asyncio.get_running_loop().create_server(
            self._new_connection, host, port, reuse_address=True)
        self._servers.append(srv)
        sockname = srv.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def listen_unix(self, path: str) -> None:
        srv = await asyncio.get_running_loop().create_unix_server(self._new_connection, path)
        self._servers.append(srv)

    async def shutdown(self) -> None:
        """Stop accepting; let in-flight requests finish; close every connection."""
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.begin_shutdown()
        waits = [c.closed for c in self.connections]
        if waits:
            done, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT_S)
            for conn in list(self.connections):
                conn.abort("shutdown drain timed out")
        for srv in self._servers:
            await srv.wait_closed()


def _connections_limit(wanted: int) -> tuple[int, str]:
    """The connection limit and, for the refusal log line, where it comes from."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FDS_RESERVED_COUNT >= wanted:
        return wanted, "CONNECTIONS_MAX"
    fit = max(1, soft - FDS_RESERVED_COUNT)
    return fit, (f"the open-file limit {soft} less {FDS_RESERVED_COUNT} for the rest of the "
                 f"process; raise it with ulimit -n or LimitNOFILE= for more")


class _Refused(asyncio.Protocol):
    """A connection over the server's limit: closed at accept, before the greeting."""

    def __init__(self, server: NBDServer):
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server._refused(_peer_name(transport))
        transport.abort()  # nothing to flush; frees the descriptor at once


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer, conn_id: int):
        self.server = server
        self.id = conn_id
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.handshake: Handshake | None = Handshake(server.catalog, server.tls_mode)
        self.session: Session | None = None
        self.device: BlockDevice | None = None
        self.export_name = ""
        self._mode = ""
        # Small until an export is chosen (see the module comment); the arena comes then.
        self._arena = Arena(HANDSHAKE_BUFFER_BYTES)
        self._inflight = 0
        self._inflight_bytes = 0
        self._reading = True
        self._paused_reasons: set[str] = set()
        self._out: SendCoalescer | None = None  # replies leave once per loop pass
        self._processing = False  # _process is on the stack (completions can run inside it)
        self._disconnecting = False  # DISC received or server shutting down
        self._close_reason = ""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task | None = None  # STARTTLS in progress
        self.requests = 0
        # The export's counters (rblock/nbd/stats.py), set when transmission starts; the
        # per-command tuple and WRITE's figures are looked up once, here.
        self._stats = _NO_STATS
        self._ops: tuple[OpStats, ...] = self._stats.ops
        self._write_op = self._ops[_WRITE]
        # Replies of this loop pass not timed yet (_count_replies times them when they go
        # out): the latest run of one command's replies to one received batch, then the
        # earlier runs as (figures, arrival, count), at most REPLY_RUNS_MAX.
        self._run_op = self._write_op
        self._run_arrived_ns = -1
        self._run_replies = 0
        self._runs: list[tuple[OpStats, int, int]] = []
        self._poller: IdlePoller | None = None  # polls our socket before the loop sleeps
        self._fd = -1

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._out = SendCoalescer(transport)
        self.server.connections.add(self)
        self.peer = _peer_name(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.handshake is not None
        transport.write(self.handshake.greeting())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout_s, self.abort,
            f"handshake not finished in {self.server.handshake_timeout_s:g}s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.done():
            return
        self.server.connections.discard(self)
        self.server.connections_open -= 1
        assert self.server.connections_open >= 0
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._count_replies()
        if self._out is not None:
            self._out.prepare = None  # a cycle (coalescer -> this method -> connection)
            self._out.sent = None
        if self._poller is not None:
            self._poller.remove(self._fd, self)
            self._poller = None
        reason = self._close_reason or (f"connection lost: {exc}" if exc else "client closed")
        where = f" export '{self.export_name}' ({self._mode})" if self.export_name else ""
        # The one log line per connection: who, what, how it ended.
        log.info("conn %d %s%s closed: %s; %d requests, %d still in flight",
                 self.id, self.peer, where, reason, self.requests, self._inflight)
        self.transport = None
        self._arena = Arena(0)  # payload views still in use keep their buffer alive
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._arena.writable()

    def buffer_updated(self, nbytes: int) -> None:
        self._arena.received(nbytes)
        if self.handshake is not None:
            self._feed_handshake()
        else:
            self._process()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._pause("send buffer full")

    def resume_writing(self) -> None:
        self._resume("send buffer full")

    # --- handshake phase --------------------------------------------------------------------

    def _feed_handshake(self) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        reply, event = hs.feed(self._arena.take_bytes())
        if reply:
            self.transport.write(reply)
        if isinstance(event, Close):
            self._close(event.reason)
        elif isinstance(event, StartTLS):
            # Kept until done (a task nobody references may be collected mid-handshake),
            # and a failure that is not a TLS error is logged, never lost.
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            self._tls_task.add_done_callback(self._tls_done)
        elif isinstance(event, Negotiated):
            self._enter_transmission(event)

    def _tls_done(self, task: asyncio.Task) -> None:
        self._tls_task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD connection from %s: TLS start failed", self.peer,
                      exc_info=task.exception())
            self.abort("TLS start failed")

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.tls_context is not None
        try:
            self.transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, self.server.tls_context, server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            self._close_reason = f"TLS handshake failed: {e}"
            transport, self.transport = self.transport, None
            if transport is not None:
                transport.abort()
            # The failed TLS layer owns the socket now and will not report its loss to us.
            self.connection_lost(None)
            return
        self._out = SendCoalescer(self.transport)  # replies now go through the TLS layer
        assert self.handshake is not None
        self.handshake.tls_established()

    def _enter_transmission(self, ev: Negotiated) -> None:
        assert self.transport is not None
        try:
            export = self.server.catalog.get(ev.export.name)
        except ExportRefused as e:  # gone between the option reply and now
            self._close(str(e))
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.handshake = None
        self.device = export.device
        self.export_name = export.name
        self._stats = export.stats
        self._ops = export.stats.ops
        self._write_op = self._run_op = self._ops[_WRITE]
        assert self._out is not None
        self._out.prepare = self._count_replies  # the pass's replies are about to go out
        self.session = Session(ev.export.size_bytes, export.device.capabilities,
                               ev.structured_replies, ev.base_allocation_id)
        self._mode = ("structured" if ev.structured_replies else "simple") + (
            ", TLS" if ev.tls else "")
        log.debug("conn %d %s export '%s' (%s)", self.id, self.peer, export.name, self._mode)
        self._arena.reset_with(ev.rest)
        poller = idle_poller()
        sock = self.transport.get_extra_info("socket")
        if poller is not None and not ev.tls and sock is not None:
            self._poller, self._fd = poller, sock.fileno()
            poller.add(self._fd, self)
            self._out.sent = self._sent
        self._process()

    def _sent(self) -> None:
        """The pass's replies went out: poll for the next request if the client seems to
        wait for each (POLL_AFTER_REPLIES_MAX). A client that keeps a queue full sends more
        while we work, its requests come in batches, and polling would only cut those batches
        into more, smaller passes: fio 4k randwrite QD16, 3 s x 2 alternating, 115k IOPS
        polling after every pass -> 136k; QD1 unchanged (20.8k -> 21.4k)."""
        if self._out.flushed_writes <= POLL_AFTER_REPLIES_MAX:  # type: ignore[union-attr]
            self._poller.arm()  # type: ignore[union-attr]

    def pollable(self) -> bool:
        """IdlePoller may read our socket: transmitting, not paused, not closing."""
        return self._reading and not self._disconnecting and self.transport is not None

    # --- transmission phase -----------------------------------------------------------------

    def _process(self) -> None:
        """Start every complete request in the arena, within the in-flight bounds. The
        common WRITE (no flags but FUA, in range, a writable export) is started here, as
        `_begin` would, without the calls to `p.parse_request`, `_begin` and
        `check_request`: fio 4k randwrite QD16 (benchmarks/README.md, issue 13)."""
        arena = self._arena
        s = self.session
        device = self.device
        assert s is not None and device is not None
        size_bytes = s.size_bytes if not s.caps.read_only else -1  # -1: no WRITE is common
        self._processing = True
        message_bytes = 0
        arrived_ns = now_ns()  # one clock read for every request of this batch
        try:
            while self._reading and not self._disconnecting:
                start = arena.start
                pending = arena.end - start
                if pending < _REQUEST_BYTES:
                    break
                magic, flags, t, handle, offset, length = _unpack_request(arena.buf, start)
                if magic != _REQUEST_MAGIC:
                    self._close(f"bad request magic 0x{magic:08x}")
                    return
                if t != _WRITE:
                    arena.start = start + _REQUEST_BYTES
                    self._begin(_Request(flags, t, handle, offset, length, arrived_ns),
                                arena.take(0))
                    continue
                if length > PAYLOAD_MAX_BYTES:
                    self._close(f"WRITE payload of {length} bytes is over the "
                                f"{PAYLOAD_MAX_BYTES}-byte maximum")
                    return
                message_bytes = _REQUEST_BYTES + length
                if message_bytes > pending:
                    break  # payload still arriving
                arena.start = start + _REQUEST_BYTES  # the header: parsed above
                req = _Request(flags, t, handle, offset, length, arrived_ns)
                payload = arena.take(length)
                message_bytes = 0
                if flags & _NOT_FUA or offset + length > size_bytes:
                    self._begin(req, payload)  # the general checks, and their errors
                    continue
                self.requests += 1
                self._inflight += 1
                self._inflight_bytes += length
                if (self._inflight >= INFLIGHT_REQUESTS_MAX
                        or self._inflight_bytes >= INFLIGHT_BYTES_MAX):
                    self._pause("in-flight limit")
                device.start_write(offset, payload, flags == _FUA, self._write_done, req)
        finally:
            self._processing = False
        arena.reserve(message_bytes)

    def _begin(self, req: p.Request, payload: memoryview) -> None:
        s = self.session
        assert s is not None and self.device is not None
        self.requests += 1
        t = req.type
        if t == _DISC:
            self._disconnecting = True
            self._close_reason = "client sent NBD_CMD_DISC"
            self._maybe_finish_disconnect()
            return
        try:
            check_request(req, s)
        except RequestError as e:
            self._send(error_reply(req.handle, e.err, str(e), s.structured_replies))
            self._stats.op(t).record(req.arrived_ns, 0, True)
            return
        cost = req.length if t == _WRITE or t == _READ else 0
        self._inflight += 1
        self._inflight_bytes += cost
        if self._inflight >= INFLIGHT_REQUESTS_MAX or self._inflight_bytes >= INFLIGHT_BYTES_MAX:
            self._pause("in-flight limit")
        if t == _WRITE:
            # The hot command: no coroutine or closure of ours (see BlockDevice.start_write).
            self.device.start_write(req.offset, payload, bool(req.flags & _FUA),
                                    self._write_done, req)
            return
        run_eager(self._execute(req, payload), lambda result, exc: self._finish(req, cost, result, exc))

    async def _execute(self, req: p.Request, payload: memoryview) -> list[bytes]:
        d = self.device
        s = self.session
        assert d is not None and s is not None
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        t = req.type
        if t == p.CMD_READ:
            return await self._read(req)
        elif t == p.CMD_FLUSH:
            await d.flush()
        elif t == p.CMD_TRIM:
            if req.length:
                await d.trim(req.offset, req.length, fua)
        elif t == p.CMD_WRITE_ZEROES:
            if req.length:
                await d.write_zeroes(req.offset, req.length, fua,
                                     may_punch=not req.flags & p.CMD_FLAG_NO_HOLE,
                                     fast_only=bool(req.flags & p.CMD_FLAG_FAST_ZERO))
        elif t == p.CMD_CACHE:
            if req.length:
                await d.cache(req.offset, req.length)
        elif t == p.CMD_BLOCK_STATUS:
            assert s.base_allocation_id is not None
            extents = await d.extents(req.offset, req.length)
            if req.flags & p.CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            return [p.chunk_block_status(req.handle, s.base_allocation_id, extents)]
        else:  # check_request lets only known commands through
            raise AssertionError(f"unhandled command {t}")
        return [p.simple_reply(req.handle)]

    async def _read(self, req: p.Request) -> list[bytes]:
        d = self.device
        s = self.session
        assert d is not None and s is not None
        pieces: list[tuple[int, bytes | int]] = []
        sparse = (s.structured_replies and not req.flags & p.CMD_FLAG_DF
                  and req.length >= SPARSE_READ_MIN_BYTES and d.capabilities.can_extents)
        if req.length == 0:
            pass
        elif sparse:
            pos = req.offset
            for length, flags in await d.extents(req.offset, req.length):
                if flags & p.STATE_ZERO:
                    pieces.append((pos, length))
                else:
                    pieces.append((pos, await d.read(pos, length)))
                pos += length
            if pos < req.offset + req.length:  # extents may stop short: read the rest
                pieces.append((pos, await d.read(pos, req.offset + req.length - pos)))
        else:
            pieces.append((req.offset, await d.read(req.offset, req.length)))
        return read_reply(req.handle, req.offset, pieces, s.structured_replies)

    def _write_done(self, req: p.Request, exc: BaseException | None) -> None:
        if exc is not None:
            self._finish(req, req.length, None, exc)
            return
        self._inflight -= 1
        self._inflight_bytes -= req.length
        assert self._inflight >= 0 and self._inflight_bytes >= 0
        w = self._write_op
        w.ok_bytes += req.length
        if self.transport is not None and self._out is not None:
            self._out.write_one(p.simple_reply(req.handle))
            # _replied, inlined (the hot command; measured in benchmarks/README.md)
            if req.arrived_ns == self._run_arrived_ns and w is self._run_op:
                self._run_replies += 1
            else:
                self._new_run(w, req.arrived_ns)
        else:
            w.record(req.arrived_ns, 0, False)
        if self._disconnecting:
            self._maybe_finish_disconnect()
        elif self._paused_reasons and (self._inflight < INFLIGHT_REQUESTS_MAX
                                       and self._inflight_bytes < INFLIGHT_BYTES_MAX):
            self._resume("in-flight limit")

    def _finish(self, req: p.Request, cost: int, result: list[bytes] | None,
                exc: BaseException | None) -> None:
        self._inflight -= 1
        self._inflight_bytes -= cost
        assert self._inflight >= 0 and self._inflight_bytes >= 0
        s = self.session
        assert s is not None
        if exc is not None:
            if not isinstance(exc, OSError):
                log.exception("conn %d: %s failed", self.id, req.name, exc_info=exc)
            else:
                log.warning("conn %d: %s at %d+%d failed: %s", self.id, req.name, req.offset,
                            req.length, exc)
            result = [error_reply(req.handle, nbd_errno(exc), f"{req.name} failed: {exc}",
                                  s.structured_replies)]
        assert result is not None
        op = self._ops[req.type]
        if exc is not None:
            op.errors += 1
        else:
            op.ok_bytes += req.length
        if self.transport is not None and self._out is not None:
            self._out.write(result)
            self._replied(op, req.arrived_ns)
        else:
            op.record(req.arrived_ns, 0, False)
        if self._disconnecting:
            self._maybe_finish_disconnect()
        elif self._paused_reasons and (self._inflight < INFLIGHT_REQUESTS_MAX
                                       and self._inflight_bytes < INFLIGHT_BYTES_MAX):
            self._resume("in-flight limit")

    def _send(self, *bufs: bytes) -> None:
        if self.transport is not None and self._out is not None:
            self._out.write(bufs)

    # --- request counters (rblock/nbd/stats.py) ----------------------------------------------

    def _replied(self, op: OpStats, arrived_ns: int) -> None:
        """Count a reply just queued; its latency is taken when the pass's replies go out."""
        if arrived_ns == self._run_arrived_ns and op is self._run_op:
            self._run_replies += 1
        else:
            self._new_run(op, arrived_ns)

    def _new_run(self, op: OpStats, arrived_ns: int) -> None:
        if self._run_replies:
            if len(self._runs) >= REPLY_RUNS_MAX:
                self._count_replies()  # timed a little early rather than kept unbounded
            else:
                self._runs.append((self._run_op, self._run_arrived_ns, self._run_replies))
        self._run_op, self._run_arrived_ns, self._run_replies = op, arrived_ns, 1

    def _count_replies(self) -> None:
        """The pass's replies go out now (SendCoalescer.prepare): one clock read times them."""
        if not self._run_replies:
            return
        now = now_ns()
        self._run_op.add(now - self._run_arrived_ns, self._run_replies)
        self._run_replies = 0
        self._run_arrived_ns = -1
        if self._runs:
            for op, arrived_ns, n in self._runs:
                op.add(now - arrived_ns, n)
            self._runs.clear()

    # --- flow control and closing -------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        self._paused_reasons.add(reason)
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _resume(self, reason: str) -> None:
        self._paused_reasons.discard(reason)
        if self._paused_reasons or self._reading or self._disconnecting:
            return
        self._reading = True
        if self.transport is not None:
            self.transport.resume_reading()
            if self.handshake is None and not self._processing:
                self._process()  # requests that arrived before the pause

    def begin_shutdown(self) -> None:
        if self.handshake is not None:
            self._close("server shutting down")
            return
        self._disconnecting = True
        self._close_reason = "server shutting down"
        if self.transport is not None:
            self.transport.pause_reading()
        self._maybe_finish_disconnect()

    def _maybe_finish_disconnect(self) -> None:
        if self._inflight == 0:
            self._close_transport()

    def _close(self, reason: str) -> None:
        self._close_reason = reason
        if reason and not reason.startswith(("client sent", "server shutting")):
            log.warning("conn %d %s: closing: %s", self.id, self.peer, reason)
        self._disconnecting = True
        self._close_transport()

    def _close_transport(self) -> None:
        """Close after the queued replies are sent; a client that never reads them is cut
        off after CLOSE_GRACE_S instead of holding the server."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._out is not None:
            self._out.flush()
        self.transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.abort, self._close_reason)

    def abort(self, reason: str) -> None:
        if self.transport is None:
            return
        self._close_reason = self._close_reason or reason
        self.transport.abort()
