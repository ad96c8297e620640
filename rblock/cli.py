"""The `rblock` command line.

    rblock [--config FILE] [--node NAME] COMMAND ...      (both also after COMMAND)
    rblock serve IMAGE...                                 one machine, no replication
    rblock create-md | up | status | events | config show | adjust
    rblock primary | secondary | connect | disconnect | verify | invalidate | detach |
           attach | inject-fault RES
    rblock splitbrain list|export|drop RES [ID]
    rblock --version

The cluster file is --config FILE, else $RBLOCK_CONFIG, else /etc/rblock/cluster.toml
(rblock/config.py: config_source). --node defaults to this host's name when the file has a
node of that name (config.this_node). `build_parser()` is the whole parser: the man pages
and bash completion are generated from it.

Exit codes
----------
0  done: the command did what was asked (status, events, config show: printed it).
1  refused or failed: the node refused the command (the reason is on stderr), could not be
   reached, or the work failed (a port in use, a disk in use, a disk error); and a command
   that found nothing to do: `primary` on a node that is Primary already, `connect` while
   connecting, `adjust` with nothing to apply... prints "rblock: ...; nothing done" on
   stderr and exits 1, because what was asked did not happen now (scripts that want
   "Primary, whoever did it" read `rblock status --json`).
2  usage or config: a wrong option or argument, a config file that does not load or lacks
   the node or resource named, TLS files that cannot be used.
Output cut short by its reader (`rblock status | head`) exits 0, silently; so does
Ctrl-C on `rblock events`, the usual way to end it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
import sys
import time

from rblock.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, RUNTIME_KEYS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def version() -> str:
    """The installed package's version, else the checkout's (rblock.__version__)."""
    from importlib import metadata

    try:
        return metadata.version("rblock")
    except metadata.PackageNotFoundError:
        from rblock import __version__

        return __version__


def _usage(message: str) -> int:
    print(f"rblock: {message}", file=sys.stderr)
    return EXIT_USAGE


def _fail(message: str) -> int:
    print(f"rblock: {message}", file=sys.stderr)
    return EXIT_FAILED


# --- the parser ----------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, top: bool = False, node: bool = True) -> None:
    """--config, --node and -v: on the top parser and again on each subcommand, so they go
    before or after it. Below the top their default is SUPPRESS: an absent one keeps the
    top's value."""
    default = None if top else argparse.SUPPRESS
    if node:
        p.add_argument("--config", metavar="FILE", default=default,
                       help=f"the cluster's TOML file (default: ${CONFIG_ENV}, else "
                            f"{DEFAULT_CONFIG_PATH})")
        p.add_argument("--node", metavar="NAME", default=default,
                       help="this node's name in it (default: this host's name, if the file "
                            "has a node of that name)")
    p.add_argument("-v", "--verbose", action="store_true",
                   default=False if top else argparse.SUPPRESS, help="log at debug level")


def _sub(sub: argparse._SubParsersAction, name: str, text: str, node: bool = True,
         description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand: TEXT is its line in `rblock --help` and its --help's description."""
    p = sub.add_parser(name, help=text, description=description or text[0].upper() + text[1:]
                       + ".")
    _common(p, node=node)
    return p


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    sp = _sub(sub, "serve", "export local images over NBD (one machine, no replication)",
              node=False, description="Serve raw files or block devices over NBD, on one "
              "machine, without replication. Prints one URI per export a client can dial, "
              "then 'ready'; stops cleanly on SIGTERM or SIGINT.")
    sp.add_argument("images", nargs="+", metavar="IMAGE",
                    help="raw file or block device; NAME=PATH names the export")
    sp.add_argument("--export", action="append", default=[], metavar="NAME",
                    help="export name for the next unnamed IMAGE (default: the file's stem)")
    sp.add_argument("--size", type=_size, help="size for --create, e.g. 1G")
    sp.add_argument("--create", action="store_true", help="create missing images (sparse)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:10809", metavar="HOST:PORT",
                       help="TCP address (default 127.0.0.1:10809; port 0 picks one; "
                            "0.0.0.0 listens on all addresses)")
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket instead")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    sp.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    sp.add_argument("--tls-key", metavar="FILE", help="server private key (PEM, unencrypted)")
    sp.add_argument("--tls-ca", metavar="FILE", help="CA that client certificates must chain "
                                                     "to (clients then need one)")
    sp.add_argument("--tls", choices=["require", "allow"],
                    help="with a certificate: require TLS (default) or allow plain clients")
    sp.add_argument("--idle-poll-us", type=int, default=None, metavar="US",
                    help="after a reply, wait up to US microseconds for the next request "
                         "without sleeping (0: off; default: a node's idle_poll_us default)")
    sp.set_defaults(func=_cmd_serve)


def _size(text: str) -> int:
    from rblock.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


FORCE_PRIMARY_HELP = (
    "override the disk checks, each of them: promote fresh data no node has yet (the first "
    "promotion; a full sync to the peer follows); an Inconsistent disk (a sync into it did "
    "not finish: the blocks it still lacks keep their old contents, often zeroes); an "
    "Outdated disk (it may lack the newest writes; if the peer wrote too, the next connect "
    "finds a split brain), also on a Primary whose disk was outdated. It never overrides a "
    "connected peer that is Primary, a running resync from the peer, a missing disk, or "
    "fencing (that is --ignore-fencing)")
FORCE_SECONDARY_HELP = ("cut off the NBD clients connected to this node first (their "
                        "connections drop); without it, demotion is refused while any is "
                        "connected")

ACTIONS = [
    ("primary", "make the resource Primary on this node: it serves NBD and replicates"),
    ("secondary", "make the resource Secondary on this node: it stops serving NBD"),
    ("connect", "connect to the peer again (after disconnect, or to resolve a split brain)"),
    ("disconnect", "drop the peer link and stay StandAlone until 'connect'"),
    ("verify", "compare checksums with the peer; mark the blocks that differ out of sync"),
    ("invalidate", "discard this node's data: resync all of it from the peer"),
    ("detach", "stop using this node's disk (Diskless): I/O goes to the peer"),
    ("attach", "open the disk again (after create-md on a replaced one) and resync it from "
               "the peer"),
    ("inject-fault", "test aid: make this node's disk fail reads, writes or flushes with EIO"),
]


def _cluster_parsers(sub: argparse._SubParsersAction) -> None:
    p = _sub(sub, "create-md", "initialise this node's metadata for its resources (and "
             "create missing backing files, sparse)")
    p.add_argument("resources", nargs="*", metavar="RES", help="default: all of the node's")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing metadata (forgets the dirty bitmap: the next "
                        "connect is a full sync)")
    p.set_defaults(func=_cmd_create_md)
    p = _sub(sub, "up", "run this node's daemon in the foreground (what the service runs)",
             description="Run this node's daemon in the foreground: NBD, the peer links and "
             "the control API. Prints 'ready' once it listens; stops cleanly on SIGTERM, "
             "SIGINT or SIGHUP.")
    p.set_defaults(func=_cmd_up)
    p = _sub(sub, "status", "show every resource of this node, and why it is not connected")
    p.add_argument("--json", action="store_true",
                   help="print the control API's JSON (the keys scripts rely on: README)")
    p.set_defaults(func=_cmd_status)
    p = _sub(sub, "events", "print the current state of every resource, then each change",
             description="Print the current state of every resource (one 'exists' line "
             "each, then 'exists -'), then one line per state change, each with a "
             "timestamp, until the node stops or Ctrl-C.")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (time, resource, what, old, new, detail; "
                        "the 'exists' lines carry the resource's status)")
    p.set_defaults(func=_cmd_events)
    cp = _sub(sub, "config", "show the configuration this node runs with")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = _sub(csub, "show", "print this node's effective configuration: defaults filled in, "
             "paths resolved, secrets hidden (as drbdadm dump)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_cmd_config_show)
    p = _sub(sub, "adjust", "apply changed settings of the config file to the running node "
             "and say which need a restart",
             description="Make the running node read its config file again and apply the "
             f"settings that can change at run time ({', '.join(RUNTIME_KEYS)}); every other "
             "difference is listed as needing a restart. Exit 1 if nothing was applied.")
    p.add_argument("--json", action="store_true", help="print the node's answer as JSON")
    p.set_defaults(func=_cmd_adjust)
    for action, text in ACTIONS:
        p = _sub(sub, action, text)
        p.add_argument("resource", metavar="RES", help="the resource, as named in the file")
        if action == "primary":
            p.add_argument("--force", action="store_true", help=FORCE_PRIMARY_HELP)
            p.add_argument("--ignore-fencing", action="store_true",
                           help="DANGER: promote without the primary key in etcd, for the "
                                "disaster case of an etcd lost for good; nothing then stops "
                                "a second Primary")
        if action == "secondary":
            p.add_argument("--force", action="store_true", help=FORCE_SECONDARY_HELP)
        if action == "connect":
            p.add_argument("--discard-my-data", action="store_true",
                           help="after a split brain: this node's changes are thrown away "
                                "(saved first: 'rblock splitbrain') and it resyncs from the "
                                "peer")
        if action == "inject-fault":
            for what in ("reads", "writes", "flushes"):
                p.add_argument(f"--{what}", action="store_true", help=f"fail {what} with EIO")
            p.add_argument("--clear", action="store_true", help="stop failing")
        p.set_defaults(func=_cmd_action, action=action)
    p = _sub(sub, "splitbrain", "what a split-brain victim lost: list, export or drop the "
             "blocks it saved before its resync")
    p.add_argument("what", choices=("list", "export", "drop"),
                   help="list the snapshots, export one as a raw image, or delete one")
    p.add_argument("resource", metavar="RES", help="the resource")
    p.add_argument("id", nargs="?", type=int, help="the snapshot (export, drop)")
    p.add_argument("--out", metavar="FILE", help="export: the raw image to write")
    p.add_argument("--json", action="store_true", help="list: JSON")
    p.set_defaults(func=_cmd_splitbrain)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rblock", description="Replicated block devices over NBD (DRBD-like).",
        epilog="Exit status: 0 done; 1 refused or failed, or nothing to do; 2 usage or "
               "config.")
    ap.add_argument("--version", action="version", version=f"rblock {version()}",
                    help="print the version and exit")
    _common(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _cluster_parsers(sub)
    return ap


# --- config and node ----------------------------------------------------------------------------


def _load(args: argparse.Namespace):
    """The cluster config, and args.node set to this node; usage errors exit 2."""
    from rblock.config import ConfigError, config_source, load_from, this_node

    try:
        cfg = load_from(config_source(args.config))
        args.node = this_node(cfg, args.node)
    except ConfigError as e:
        raise SystemExit(_usage(str(e))) from None
    return cfg


def _resource(cfg, args: argparse.Namespace) -> None:
    """RES names a resource with a disk on this node, or it is a usage error (exit 2)."""
    from rblock.config import ConfigError

    try:
        r = cfg.resource(args.resource)
    except ConfigError as e:
        raise SystemExit(_usage(str(e))) from None
    if args.node not in r.nodes:
        raise SystemExit(_usage(f"resource {r.name} has no disk on {args.node} (its nodes: "
                                f"{', '.join(r.nodes)}); run it there, or pass --node"))


def _client(cfg, node: str):
    from rblock.control_client import ControlClient

    return ControlClient(cfg.node(node).control)


def _warn(cfg, node: str) -> None:
    from rblock.config import config_warnings

    for w in config_warnings(cfg, node):
        print(f"rblock: warning: {w}", file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from rblock.nbd.handshake import TLSMode
    from rblock.serve import ServeError, ServeOptions, image_specs, run
    from rblock.units import parse_hostport

    if args.create and args.size is None:
        return _usage("--create needs --size SIZE")
    if args.size is not None and not args.create:
        return _usage("--size is only used with --create")
    if bool(args.tls_cert) != bool(args.tls_key):
        return _usage("TLS needs both --tls-cert and --tls-key")
    if (args.tls or args.tls_ca) and not args.tls_cert:
        return _usage("--tls and --tls-ca need --tls-cert and --tls-key")
    from rblock.config import IDLE_POLL_US_DEFAULT, IDLE_POLL_US_MAX

    poll_us = IDLE_POLL_US_DEFAULT if args.idle_poll_us is None else args.idle_poll_us
    if not 0 <= poll_us <= IDLE_POLL_US_MAX:
        return _usage(f"--idle-poll-us {poll_us}: give 0 (off) to {IDLE_POLL_US_MAX}")
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
        tls_key=args.tls_key, tls_ca=args.tls_ca, tls_mode=tls_mode, idle_poll_us=poll_us,
    ))


def _cmd_create_md(args: argparse.Namespace) -> int:
    from rblock.config import ConfigError
    from rblock.node import NodeError, create_md
    from rblock.store.metadata import MetadataError

    cfg = _load(args)
    _warn(cfg, args.node)
    try:
        for line in create_md(cfg, args.node, args.resources, args.force):
            print(line)
    except ConfigError as e:
        return _usage(str(e))
    except NodeError as e:
        print(f"rblock: {e}", file=sys.stderr)
        return e.exit_code
    except MetadataError as e:
        return _fail(str(e))
    return EXIT_OK


def _cmd_up(args: argparse.Namespace) -> int:
    from rblock.control_server import ControlServerError
    from rblock.node import Node, NodeError
    from rblock.runner import run_async

    cfg = _load(args)
    try:
        return run_async(Node(cfg, args.node).run())
    except NodeError as e:
        print(f"rblock: {e}", file=sys.stderr)
        return e.exit_code
    except ControlServerError as e:
        return _fail(str(e))


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from rblock.cli_status import format_status
    from rblock.config import EXAMPLE_SECRET
    from rblock.control_client import ControlError

    cfg = _load(args)
    try:
        st = asyncio.run(_client(cfg, args.node).status())
    except ControlError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        example = frozenset(r.name for r in cfg.resources_of(args.node)
                            if r.secret == EXAMPLE_SECRET)
        print(format_status(st, example))
    return EXIT_OK


def format_status(st: dict) -> str:
    """rblock.cli_status.format_status (kept here for the callers that import it from here)."""
    from rblock.cli_status import format_status as fmt

    return fmt(st)


def _cmd_events(args: argparse.Namespace) -> int:
    import json

    from rblock.cli_status import format_event
    from rblock.control_client import ControlError

    cfg = _load(args)
    client = _client(cfg, args.node)

    async def follow() -> None:
        async for ev in client.events(initial=True):
            print(json.dumps(ev) if args.json else format_event(ev), flush=True)

    async def until_reader_gone() -> None:
        """Follow, and stop when stdout's reader goes away (`rblock events | head`): with
        no event coming, no write would notice it."""
        task = asyncio.ensure_future(follow())
        fd = sys.stdout.fileno()
        watched = _is_pipe(fd)
        gone: list[bool] = []

        def reader_gone() -> None:
            gone.append(True)
            task.cancel()

        if watched:
            # The write end of a pipe reports an error (EPOLLERR) once the read end closed.
            asyncio.get_running_loop().add_reader(fd, reader_gone)
        try:
            await task
        except asyncio.CancelledError:
            if gone:
                raise BrokenPipeError from None
            raise
        finally:
            if watched:
                asyncio.get_running_loop().remove_reader(fd)

    try:
        asyncio.run(until_reader_gone())
    except ControlError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _cmd_config_show(args: argparse.Namespace) -> int:
    from rblock.cli_config import show

    cfg = _load(args)
    if not args.json:
        _warn(cfg, args.node)
    print(show(cfg, args.node, args.json))
    return EXIT_OK


def _cmd_adjust(args: argparse.Namespace) -> int:
    from rblock.cli_config import run_adjust
    from rblock.control_client import ControlError

    cfg = _load(args)
    try:
        result = asyncio.run(_client(cfg, args.node).adjust())
    except ControlError as e:
        print(f"rblock: {e}", file=sys.stderr)
        return EXIT_USAGE if e.config_error else EXIT_FAILED
    return run_adjust(result, args.json, str(cfg.path))


def _cmd_action(args: argparse.Namespace) -> int:
    from rblock.control_client import ControlError

    body: dict = {}
    if args.action == "inject-fault":
        chosen = {w: getattr(args, w) for w in ("reads", "writes", "flushes")}
        if args.clear == any(chosen.values()):
            return _usage("inject-fault needs --clear or at least one of --reads, --writes, "
                          "--flushes")
        body.update(chosen)
    cfg = _load(args)
    _resource(cfg, args)
    if getattr(args, "force", False):
        body["force"] = True
    if getattr(args, "discard_my_data", False):
        body["discard_my_data"] = True
    if getattr(args, "ignore_fencing", False):
        body["ignore_fencing"] = True
    try:
        changed, msg = asyncio.run(_client(cfg, args.node).run(args.resource, args.action,
                                                               **body))
    except ControlError as e:
        return _fail(str(e))
    if not changed:
        return _fail(f"{msg}; nothing done")
    print(f"{args.resource}: {msg}")
    return EXIT_OK


def _cmd_splitbrain(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rblock.store import victim

    cfg = _load(args)
    _resource(cfg, args)
    me = cfg.node(args.node)
    disk = Path(me.disks[args.resource])
    where = victim.snapshot_dir(disk, Path(me.metas[args.resource]))
    if args.what == "list":
        snaps = victim.list_snapshots(disk, where)
        if args.json:
            print(json.dumps(snaps, indent=2))
        elif not snaps:
            print(f"{args.resource}: no split-brain snapshots on {args.node}")
        for s in snaps if not args.json else []:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
            state = "complete" if s.get("finished") else "resync not finished"
            print(f"{s['id']}: {when} {s['saved_bytes']} bytes saved ({state}); lost to "
                  f"{s.get('peer')}: {s.get('decision')}")
        return EXIT_OK
    if args.id is None:
        return _usage(f"splitbrain {args.what} needs the snapshot's id ('rblock splitbrain "
                      f"list {args.resource}' shows them)")
    try:
        if args.what == "export":
            if not args.out:
                return _usage("splitbrain export needs --out FILE (a raw image)")
            n = victim.export(disk, args.id, Path(args.out), where)
            print(f"{args.resource}: snapshot {args.id} exported to {args.out} ({n} bytes): "
                  f"the victim's disk as it was before the resync")
        else:
            victim.drop(disk, args.id, where)
            print(f"{args.resource}: snapshot {args.id} deleted")
    except FileNotFoundError as e:
        return _fail(str(e))
    return EXIT_OK


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is caught (not at exit)
        return code
    except BrokenPipeError:
        # `rblock status | head`: the reader has what it wanted. Later writes (and the
        # flush at exit) go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
