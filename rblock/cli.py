"""The `rblock` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from rblock.nbd.handshake import TLSMode
from rblock.units import parse_hostport, parse_size


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run the daemon coroutine on uvloop (a dependency; falls back to asyncio if absent)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("serve", help="export local images over NBD (single node)",
                        description="Serve raw files or block devices over NBD.")
    sp.add_argument("images", nargs="+", metavar="IMAGE",
                    help="raw file or block device; NAME=PATH names the export")
    sp.add_argument("--export", action="append", default=[], metavar="NAME",
                    help="export name for the next unnamed IMAGE (default: the file's stem)")
    sp.add_argument("--size", type=parse_size, help="size for --create, e.g. 1G")
    sp.add_argument("--create", action="store_true", help="create missing images (sparse)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:10809", metavar="HOST:PORT",
                       help="TCP address (default 127.0.0.1:10809; port 0 picks one)")
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket instead")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    sp.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    sp.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    sp.add_argument("--tls-ca", metavar="FILE", help="CA that client certificates must chain to")
    sp.add_argument("--tls", choices=["require", "allow"],
                    help="with a certificate: require TLS (default) or allow plain clients")
    sp.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from rblock.serve import ServeError, ServeOptions, image_specs, run

    if args.create and args.size is None:
        return _usage("--create needs --size SIZE")
    if args.size is not None and not args.create:
        return _usage("--size is only used with --create")
    if bool(args.tls_cert) != bool(args.tls_key):
        return _usage("TLS needs both --tls-cert and --tls-key")
    if (args.tls or args.tls_ca) and not args.tls_cert:
        return _usage("--tls and --tls-ca need --tls-cert and --tls-key")
    tls_mode = TLSMode.OFF
    if args.tls_cert:
        tls_mode = TLSMode(args.tls or "require")
    try:
        specs = image_specs(args.images, args.export)
        host, port = parse_hostport(args.listen, 10809)
    except (ServeError, ValueError) as e:
        return _usage(str(e))
    return run(ServeOptions(
        images=specs, host=host, port=port, socket_path=args.socket, read_only=args.read_only,
        create_size_bytes=args.size if args.create else None, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_ca=args.tls_ca, tls_mode=tls_mode,
    ))


def _usage(message: str) -> int:
    print(f"rblock: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rblock", description="Replicated block devices over NBD.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return args.func(args)
