"""`hvctl web`: serve the page and the API; `hvctl web adduser|token`: the users file."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

LISTEN_DEFAULT = "127.0.0.1:8006"  # loopback only unless configured (Proxmox's port)


def add_parsers(top: Any) -> None:
    web = top.add_parser("web", help="the web page and REST API; its users",
                         description="Serve the administration page and /api/v1 (foreground), "
                         "or manage its users.")
    web.add_argument("--listen", default=LISTEN_DEFAULT, metavar="HOST:PORT",
                     help=f"address to serve on (default {LISTEN_DEFAULT}: this host only)")
    web.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    web.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert (PEM)")
    ws = web.add_subparsers(dest="command")
    p = ws.add_parser("adduser", help="add a user, or set its password and role")
    p.add_argument("name", metavar="NAME", help="the user's login name")
    p.add_argument("--role", choices=("admin", "viewer"), default="admin",
                   help="admin: may act; viewer: may only look (default admin)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (for scripts)")
    p = ws.add_parser("token", help="make an API token for a user (printed once)")
    p.add_argument("name", metavar="NAME", help="the user the token acts as")
    p = ws.add_parser("totp", help="turn on a user's second factor (a one-time code from an "
                                   "authenticator app at every login), or off with --off")
    p.add_argument("name", metavar="NAME", help="the user")
    p.add_argument("--off", action="store_true", help="turn it off")


def users_path(cfg: Any) -> Path:
    return Path(cfg.state_dir) / "web-users.json"


def run(cfg: Any, args: argparse.Namespace) -> int:
    from hvctl.web.users import UserError, Users

    try:
        users = Users(users_path(cfg))
        if args.command == "adduser":
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    print("hvctl: the passwords differ; nothing changed", file=sys.stderr)
                    return 1
            users.add(args.name, args.role, password)
            print(f"user {args.name} ({args.role}) saved in {users.path}")
            return 0
        if args.command == "token":
            print(users.new_token(args.name))
            return 0
        if args.command == "totp":
            from hvctl.web.totp import uri

            if args.off:
                had = users.clear_totp(args.name)
                print(f"{args.name}: one-time codes " + ("off" if had else "were not on; "
                                                         "nothing changed"))
                return 0 if had else 1
            secret = users.set_totp(args.name)
            print(f"{args.name}: one-time codes on. Add this to an authenticator app (as a "
                  f"QR code or pasted):\n  {uri(secret, args.name)}\nor type the secret: "
                  f"{secret}\nFrom now on the login asks for its code. A running "
                  "'hvctl web' reads it at its next start.")
            return 0
    except UserError as e:
        print(f"hvctl: {e}", file=sys.stderr)
        return 1
    return serve(cfg, users, args)


def serve(cfg: Any, users: Any, args: argparse.Namespace) -> int:
    from aiohttp import web

    from hvctl.web.app import make_app

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"hvctl: --listen '{args.listen}' is not HOST:PORT; write it like "
              f"{LISTEN_DEFAULT}", file=sys.stderr)
        return 2
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        print("hvctl: --tls-cert and --tls-key go together; pass both", file=sys.stderr)
        return 2
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            print(f"hvctl: cannot load the TLS certificate or key: {e}; check --tls-cert "
                  "and --tls-key", file=sys.stderr)
            return 1
    if not users.names:
        print(f"hvctl: no users yet; add one with 'hvctl --config {cfg.path} web adduser "
              "NAME'", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(logging.INFO)
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter("%(asctime)s hvctl: %(message)s"))
    app = make_app(cfg, users, secure=tls is not None)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=tls)
        await site.start()
        scheme = "https" if tls else "http"
        print(f"serving {scheme}://{args.listen}/", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(main())
    except OSError as e:
        print(f"hvctl: cannot serve on {args.listen}: {e.strerror}; choose another "
              "--listen", file=sys.stderr)
        return 1
    return 0
