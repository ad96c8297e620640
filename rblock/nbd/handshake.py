"""The server side of the NBD fixed-newstyle handshake, as a sans-IO state machine.

Theory of operation
-------------------
The shell (nbd/server.py) creates a `Handshake`, sends `greeting()`, then feeds every byte it
receives to `feed()`. `feed()` returns the bytes to send back and, when the handshake leaves
the option phase, an event:

- `StartTLS`: the ACK for NBD_OPT_STARTTLS is in the returned bytes; the shell sends it, wraps
  the socket in TLS, then calls `tls_established()` and carries on feeding.
- `Negotiated`: the client chose an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME); transmission
  starts. Bytes received after the option that ended the handshake are in `Negotiated.rest`.
- `Close`: the connection must be closed after the returned bytes are sent (ABORT, an
  unknown export after EXPORT_NAME, a broken frame). `reason` is for the log.

Everything that decides what the handshake does lives in two tables: `_STATE_NEED_BYTES` (how
many bytes each state waits for) and `_OPTIONS` (each option's handler and whether it may run
before STARTTLS when TLS is required). No I/O, no clock, no await.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from rblock.nbd import proto as p

OPTION_DATA_MAX_BYTES = 64 * 1024  # larger option data is skipped and answered ERR_TOO_BIG
BASE_ALLOCATION_CONTEXT_ID = 1


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about an export."""

    name: str
    size_bytes: int
    tflags: int
    description: str = ""
    block_min_bytes: int = 1
    block_preferred_bytes: int = 4096
    block_max_bytes: int = 32 * 1024 * 1024


class ExportRefused(Exception):
    """Raised by a catalog to refuse an export, with an option error code and a message."""

    def __init__(self, message: str, reply_type: int = p.REP_ERR_UNKNOWN):
        super().__init__(message)
        self.reply_type = reply_type


class Catalog(Protocol):
    """The exports a server offers. `lookup('')` returns the default export."""

    def names(self) -> list[str]: ...

    def lookup(self, name: str) -> ExportInfo: ...


class TLSMode(enum.Enum):
    OFF = "off"  # STARTTLS is refused
    ALLOW = "allow"  # clients may upgrade or not
    REQUIRE = "require"  # every option but STARTTLS and ABORT gets ERR_TLS_REQD before TLS


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Negotiated:
    export: ExportInfo
    structured_replies: bool
    base_allocation_id: int | None  # meta context id, None when not negotiated
    tls: bool
    rest: bytes = b""


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


Event = StartTLS | Negotiated | Close


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    OPTION_SKIP = "option-skip"  # discarding option data that is too big to hold
    TLS_HANDSHAKE = "tls-handshake"  # the shell is running the TLS handshake; no NBD input
    DONE = "done"  # transmission phase, or closed


_STATE_NEED_BYTES: dict[State, Callable[[Handshake], int]] = {
    State.CLIENT_FLAGS: lambda h: p.CLIENT_FLAGS.size,
    State.OPTION_HEADER: lambda h: p.OPTION_HEADER.size,
    State.OPTION_DATA: lambda h: h._option_length,
    State.OPTION_SKIP: lambda h: min(h._option_length, OPTION_DATA_MAX_BYTES),
}


@dataclass
class _Out:
    data: list[bytes] = field(default_factory=list)
    event: Event | None = None


class Handshake:
    def __init__(self, catalog: Catalog, tls_mode: TLSMode = TLSMode.OFF):
        self.catalog = catalog
        self.tls_mode = tls_mode
        self.tls_active = False
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured_replies = False
        self._meta_export: str | None = None  # export the meta contexts were set for
        self._base_allocation = False
        self._option = 0
        self._option_length = 0
        self._buf = bytearray()

    # --- the shell's entry points -----------------------------------------------------

    def greeting(self) -> bytes:
        return p.server_greeting()

    def tls_established(self) -> None:
        assert self.state is State.TLS_HANDSHAKE
        self.tls_active = True
        self.state = State.OPTION_HEADER
        # proto.md: options negotiated before STARTTLS are forgotten; the client renegotiates
        # them over TLS.
        self.structured_replies = False
        self._base_allocation = False
        self._meta_export = None

    def feed(self, data: bytes) -> tuple[bytes, Event | None]:
        """Consume DATA; return the reply bytes and the event that ends the option phase."""
        if self.state in (State.DONE, State.TLS_HANDSHAKE):
            raise AssertionError(f"handshake fed in state {self.state}")
        self._buf += data
        out = _Out()
        while out.event is None and self.state in _STATE_NEED_BYTES:
            need = _STATE_NEED_BYTES[self.state](self)
            if len(self._buf) < need:
                break
            chunk = bytes(self._buf[:need])
            del self._buf[:need]
            self._step(chunk, out)
        if isinstance(out.event, Negotiated):
            out.event = dataclasses.replace(out.event, rest=bytes(self._buf))
            self._buf.clear()
        return b"".join(out.data), out.event

    # --- states -------------------------------------------------------------------------

    def _step(self, chunk: bytes, out: _Out) -> None:
        if self.state is State.CLIENT_FLAGS:
            (flags,) = p.CLIENT_FLAGS.unpack(chunk)
            if flags & ~p.CLIENT_FLAGS_KNOWN:
                self._close(out, f"unknown client flags 0x{flags:x}")
                return
            self.no_zeroes = bool(flags & p.CLIENT_FLAG_NO_ZEROES)
            self.state = State.OPTION_HEADER
        elif self.state is State.OPTION_HEADER:
            magic, option, length = p.OPTION_HEADER.unpack(chunk)
            if magic != p.IHAVEOPT:
                self._close(out, f"bad option magic 0x{magic:x}")
                return
            self._option, self._option_length = option, length
            if length > OPTION_DATA_MAX_BYTES:
                self.state = State.OPTION_SKIP
            elif length == 0:
                self._dispatch(b"", out)
            else:
                self.state = State.OPTION_DATA
        elif self.state is State.OPTION_DATA:
            self._dispatch(chunk, out)
        elif self.state is State.OPTION_SKIP:
            self._option_length -= len(chunk)
            if self._option_length == 0:
                self.state = State.OPTION_HEADER
                if self._option == p.OPT_EXPORT_NAME:  # no way to answer EXPORT_NAME with an error
                    self._close(out, "export name longer than the option data limit")
                else:
                    self._error(out, p.REP_ERR_TOO_BIG,
                                f"option data over {OPTION_DATA_MAX_BYTES} bytes")

    def _dispatch(self, data: bytes, out: _Out) -> None:
        self.state = State.OPTION_HEADER
        handler, before_tls = _OPTIONS.get(self._option, (Handshake._opt_unknown, False))
        if self.tls_mode is TLSMode.REQUIRE and not self.tls_active and not before_tls:
            if self._option == p.OPT_EXPORT_NAME:
                self._close(out, "client chose an export without TLS; TLS is required")
            else:
                self._error(out, p.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return
        handler(self, data, out)

    # --- option handlers ----------------------------------------------------------------

    def _opt_unknown(self, data: bytes, out: _Out) -> None:
        self._error(out, p.REP_ERR_UNSUP, f"option {self._option} is not supported")

    def _opt_abort(self, data: bytes, out: _Out) -> None:
        out.data.append(p.option_reply(p.OPT_ABORT, p.REP_ACK))
        self._close(out, "client sent NBD_OPT_ABORT")

    def _opt_list(self, data: bytes, out: _Out) -> None:
        if data:
            self._error(out, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for name in self.catalog.names():
            out.data.append(p.option_reply(p.OPT_LIST, p.REP_SERVER, p.rep_server(name)))
        out.data.append(p.option_reply(p.OPT_LIST, p.REP_ACK))

    def _opt_starttls(self, data: bytes, out: _Out) -> None:
        if self.tls_mode is TLSMode.OFF:
            self._error(out, p.REP_ERR_POLICY, "TLS is not configured on this server")
        elif data:
            self._error(out, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls_active:
            self._error(out, p.REP_ERR_INVALID, "TLS is already active")
        else:
            out.data.append(p.option_reply(p.OPT_STARTTLS, p.REP_ACK))
            self.state = State.TLS_HANDSHAKE
            out.event = StartTLS()

    def _opt_structured_reply(self, data: bytes, out: _Out) -> None:
        if data:
            self._error(out, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return
        self.structured_replies = True
        out.data.append(p.option_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))

    def _opt_export_name(self, data: bytes, out: _Out) -> None:
        try:
            export = self.catalog.lookup(data.decode())
        except (ExportRefused, UnicodeDecodeError) as e:
            self._close(out, f"NBD_OPT_EXPORT_NAME refused: {e}")
            return
        out.data.append(p.export_name_reply(export.size_bytes, self._tflags(export),
                                            self.no_zeroes))
        self._negotiated(export, out)

    def _opt_info_or_go(self, data: bytes, out: _Out) -> None:
        try:
            req = p.parse_info_request(data)
        except ValueError as e:
            self._error(out, p.REP_ERR_INVALID, str(e))
            return
        try:
            export = self.catalog.lookup(req.name)
        except ExportRefused as e:
            self._error(out, e.reply_type, str(e))
            return
        opt = self._option
        reply = [p.info_export(export.size_bytes, self._tflags(export))]
        if p.INFO_NAME in req.infos:
            reply.append(p.info_name(export.name))
        if p.INFO_DESCRIPTION in req.infos and export.description:
            reply.append(p.info_description(export.description))
        # Block sizes are always sent: the constraints hold whether or not the client asked.
        reply.append(p.info_block_size(export.block_min_bytes, export.block_preferred_bytes,
                                       export.block_max_bytes))
        out.data += [p.option_reply(opt, p.REP_INFO, r) for r in reply]
        out.data.append(p.option_reply(opt, p.REP_ACK))
        if opt == p.OPT_GO:
            if self._meta_export is not None and self._meta_export != req.name:
                self._base_allocation = False  # contexts were set for another export
            self._negotiated(export, out)

    def _opt_meta_context(self, data: bytes, out: _Out) -> None:
        opt = self._option
        if opt == p.OPT_SET_META_CONTEXT and not self.structured_replies:
            self._error(out, p.REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            req = p.parse_meta_context_request(data)
            self.catalog.lookup(req.export)
        except ValueError as e:
            self._error(out, p.REP_ERR_INVALID, str(e))
            return
        except ExportRefused as e:
            self._error(out, e.reply_type, str(e))
            return
        queries = req.queries
        if opt == p.OPT_LIST_META_CONTEXT and not queries:
            queries = ("base:",)  # an empty list asks for every context the server has
        # A bare namespace ("base:") lists every context in it, but selects none: SET takes
        # full context names only.
        names = (("base:", p.META_BASE_ALLOCATION) if opt == p.OPT_LIST_META_CONTEXT
                 else (p.META_BASE_ALLOCATION,))
        selected = any(q in names for q in queries)
        if selected:
            ctx_id = BASE_ALLOCATION_CONTEXT_ID if opt == p.OPT_SET_META_CONTEXT else 0
            out.data.append(p.option_reply(
                opt, p.REP_META_CONTEXT, p.rep_meta_context(ctx_id, p.META_BASE_ALLOCATION)))
        if opt == p.OPT_SET_META_CONTEXT:
            self._base_allocation = selected
            self._meta_export = req.export
        out.data.append(p.option_reply(opt, p.REP_ACK))

    # --- helpers --------------------------------------------------------------------------

    def _tflags(self, export: ExportInfo) -> int:
        # proto.md: SEND_DF MUST NOT be set unless structured replies were negotiated.
        if self.structured_replies:
            return export.tflags
        return export.tflags & ~p.TFLAG_SEND_DF

    def _negotiated(self, export: ExportInfo, out: _Out) -> None:
        self.state = State.DONE
        out.event = Negotiated(
            export=export,
            structured_replies=self.structured_replies,
            base_allocation_id=BASE_ALLOCATION_CONTEXT_ID if self._base_allocation else None,
            tls=self.tls_active,
        )

    def _error(self, out: _Out, reply_type: int, message: str) -> None:
        out.data.append(p.option_error(self._option, reply_type, message))

    def _close(self, out: _Out, reason: str) -> None:
        self.state = State.DONE
        out.event = Close(reason)


# option -> (handler, allowed before STARTTLS when TLS is required)
_OPTIONS: dict[int, tuple[Callable[[Handshake, bytes, _Out], None], bool]] = {
    p.OPT_EXPORT_NAME: (Handshake._opt_export_name, False),
    p.OPT_ABORT: (Handshake._opt_abort, True),
    p.OPT_LIST: (Handshake._opt_list, False),
    p.OPT_STARTTLS: (Handshake._opt_starttls, True),
    p.OPT_INFO: (Handshake._opt_info_or_go, False),
    p.OPT_GO: (Handshake._opt_info_or_go, False),
    p.OPT_STRUCTURED_REPLY: (Handshake._opt_structured_reply, False),
    p.OPT_LIST_META_CONTEXT: (Handshake._opt_meta_context, False),
    p.OPT_SET_META_CONTEXT: (Handshake._opt_meta_context, False),
}

