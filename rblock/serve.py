"""`rblock serve`: export local images over NBD, single node, no replication.

It prints one URI per export that a client can dial (for a wildcard listen address such as
0.0.0.0, with this host's name, and a log line saying it listens on all addresses), then a
line `ready`. TLS files are checked first (rblock/tls_files.py), so a bad one is reported in
words. Errors are `ServeError`s whose `exit_code` follows rblock/cli.py's rule: 2 for a usage
mistake or unusable TLS files, 1 for a failure (an image in use, a port taken).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from rblock.aio import configure_idle_poll
from rblock.config import IDLE_POLL_US_DEFAULT
from rblock.nbd.handshake import TLSMode
from rblock.nbd.server import Export, ExportCatalog, NBDServer
from rblock.runner import run_async
from rblock.store.volume import FileVolume, create_image
from rblock.tls_files import TLSFileError
from rblock.tls_files import check as check_tls_files
from rblock.units import format_hostport

log = logging.getLogger("rblock.serve")


@dataclass(frozen=True)
class ImageSpec:
    name: str
    path: str


@dataclass(frozen=True)
class ServeOptions:
    images: list[ImageSpec]
    host: str = "127.0.0.1"
    port: int = 10809
    socket_path: str | None = None
    read_only: bool = False
    create_size_bytes: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_mode: TLSMode = TLSMode.OFF
    idle_poll_us: int = IDLE_POLL_US_DEFAULT  # rblock/aio.py IdlePoller; 0: off


EXIT_FAILED, EXIT_USAGE = 1, 2  # rblock/cli.py's exit codes
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listen addresses that mean "every address"
TLS_FLAGS = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"}


class ServeError(Exception):
    """A problem the user can fix; the message says what and how. `exit_code`: 2 for a
    usage mistake (the command line is wrong), 1 for a failure (it is right, but did not
    work here)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def image_specs(images: list[str], export_names: list[str]) -> list[ImageSpec]:
    """IMAGE arguments (PATH or NAME=PATH) plus --export names, in order, to specs."""
    names = list(export_names)
    specs = []
    for arg in images:
        name, sep, path = arg.partition("=")
        if not sep or "/" in name:  # a path may itself contain '=' after a slash
            name, path = "", arg
        if not name:
            name = names.pop(0) if names else Path(path).stem
        specs.append(ImageSpec(name, path))
    if names:
        raise ServeError(f"--export {names[0]!r} has no image to name; give one IMAGE per "
                         f"--export", EXIT_USAGE)
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ServeError(f"export name '{s.name}' is used twice; name each image with "
                             f"NAME=PATH or --export NAME", EXIT_USAGE)
        seen.add(s.name)
    return specs


def open_volume(spec: ImageSpec, opts: ServeOptions) -> FileVolume:
    path = spec.path
    if not os.path.exists(path):
        if opts.create_size_bytes is None:
            raise ServeError(f"image '{path}' does not exist; pass --create --size SIZE to "
                             f"create it", EXIT_USAGE)
        create_image(path, opts.create_size_bytes)
        log.info("created %s (%d bytes, sparse)", path, opts.create_size_bytes)
    elif opts.create_size_bytes is not None and stat.S_ISREG(os.stat(path).st_mode):
        have = os.stat(path).st_size
        if have != opts.create_size_bytes:
            raise ServeError(f"image '{path}' exists with {have} bytes, not the "
                             f"{opts.create_size_bytes} given by --size; drop --create or "
                             f"remove the file", EXIT_USAGE)
    try:
        return FileVolume(path, read_only=opts.read_only)
    except OSError as e:
        raise ServeError(f"cannot open image '{path}': {e.strerror}") from None


def tls_context(opts: ServeOptions) -> ssl.SSLContext | None:
    if opts.tls_mode is TLSMode.OFF:
        return None
    assert opts.tls_cert and opts.tls_key, "the CLI gives both or neither"
    try:
        check_tls_files(opts.tls_cert, opts.tls_key, opts.tls_ca)
    except TLSFileError as e:
        raise ServeError(f"{TLS_FLAGS[e.which]}: {e}", EXIT_USAGE) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
        if opts.tls_ca:
            ctx.load_verify_locations(opts.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED  # clients must present a cert signed by it
    except (OSError, ssl.SSLError) as e:  # checked above: a file changed since
        raise ServeError(f"cannot load the TLS certificate {opts.tls_cert} and key "
                         f"{opts.tls_key}: {e}", EXIT_USAGE) from None
    return ctx


def dial_host(host: str) -> str:
    """The host a client dials for a listen address: this machine's name for a wildcard
    (0.0.0.0 or ::), which no client can dial."""
    if host in WILDCARD_HOSTS:
        return socket.gethostname() or "127.0.0.1"
    return host


def uri_for(name: str, opts: ServeOptions, host: str, port: int) -> str:
    scheme = "nbds" if opts.tls_mode is not TLSMode.OFF else "nbd"
    if opts.socket_path:
        return f"{scheme}+unix:///{name}?socket={opts.socket_path}"
    return f"{scheme}://{format_hostport(dial_host(host), port)}/{name}"


async def serve(opts: ServeOptions) -> int:
    configure_idle_poll(opts.idle_poll_us * 1000)
    catalog = ExportCatalog()
    volumes = []
    try:
        for spec in opts.images:
            vol = open_volume(spec, opts)
            volumes.append(vol)
            catalog.add(Export(spec.name, vol))
        server = NBDServer(catalog, tls_context(opts), opts.tls_mode)
        try:
            if opts.socket_path:
                _remove_stale_socket(opts.socket_path)
                await server.listen_unix(opts.socket_path)
                host, port = "", 0
            else:
                host, port = await server.listen_tcp(opts.host, opts.port)
        except OSError as e:
            where = opts.socket_path or format_hostport(opts.host, opts.port)
            raise ServeError(f"cannot listen on {where}: {e.strerror}") from None
        if not opts.socket_path and host in WILDCARD_HOSTS:
            scheme = "nbds" if opts.tls_mode is not TLSMode.OFF else "nbd"
            local = "[::1]" if host == "::" else "127.0.0.1"
            log.info("listening on all addresses (%s): clients dial this host's name, as "
                     "printed, or any of its addresses (on this machine: %s://%s:%d/%s)",
                     format_hostport(host or "0.0.0.0", port), scheme, local, port,
                     opts.images[0].name)
        for spec in opts.images:
            print(uri_for(spec.name, opts, host, port))
        print("ready", flush=True)
        log.info("serving %d export(s): %s", len(opts.images),
                 ", ".join(f"{s.name}={s.path}" for s in opts.images))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
        await server.shutdown()
    finally:
        for vol in volumes:
            await vol.close()
        if opts.socket_path and os.path.exists(opts.socket_path) and volumes:
            os.unlink(opts.socket_path)
    log.info("stopped cleanly")
    return 0


def _remove_stale_socket(path: str) -> None:
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        os.unlink(path)


def run(opts: ServeOptions) -> int:
    try:
        return run_async(serve(opts))
    except ServeError as e:
        print(f"rblock serve: {e}", file=sys.stderr)
        return e.exit_code
