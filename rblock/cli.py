"""The `rblock` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from rblock.nbd.handshake import TLSMode
from rblock.units import parse_hostport, parse_size


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


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the cluster's TOML file")
    p.add_argument("--node", required=True, metavar="NAME", help="this node's name in it")


def _cluster_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create-md", help="initialise a node's metadata for its resources")
    _node_args(p)
    p.add_argument("resources", nargs="*", metavar="RES", help="default: all of the node's")
    p.add_argument("--force", action="store_true", help="overwrite existing metadata")
    p.set_defaults(func=_cmd_create_md)
    p = sub.add_parser("up", help="run a node's daemon in the foreground")
    _node_args(p)
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("status", help="show every resource of a node")
    _node_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("events", help="stream state changes as lines")
    _node_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_events)
    for action, text in [("primary", "make the resource Primary on this node"),
                         ("secondary", "make the resource Secondary on this node"),
                         ("connect", "connect to the peer (after disconnect or split brain)"),
                         ("disconnect", "drop the peer link and stay StandAlone"),
                         ("verify", "compare checksums with the peer; mark differences"),
                         ("invalidate", "discard this node's data: resync it from the peer"),
                         ("detach", "stop using this node's disk (Diskless): I/O goes to the "
                                    "peer"),
                         ("attach", "open the disk again (after create-md on a replaced one) "
                                    "and resync it from the peer"),
                         ("inject-fault", "test aid: make this node's disk fail reads, writes "
                                          "or flushes with EIO")]:
        p = sub.add_parser(action, help=text)
        _node_args(p)
        p.add_argument("resource", metavar="RES")
        if action in ("primary", "secondary"):
            p.add_argument("--force", action="store_true",
                           help="primary: first promotion of fresh data, or of a disk that "
                                "is not UpToDate (never bypasses fencing); secondary: cut "
                                "off NBD clients")
        if action == "primary":
            p.add_argument("--ignore-fencing", action="store_true",
                           help="DANGER: promote without the primary key in etcd, for the "
                                "disaster case of an etcd lost for good; nothing then stops "
                                "a second Primary")
        if action == "connect":
            p.add_argument("--discard-my-data", action="store_true",
                           help="after a split brain: this node's changes are thrown away")
        if action == "inject-fault":
            for what in ("reads", "writes", "flushes"):
                p.add_argument(f"--{what}", action="store_true", help=f"fail {what}")
            p.add_argument("--clear", action="store_true", help="stop failing")
        p.set_defaults(func=_cmd_action, action=action)
    p = sub.add_parser("splitbrain", help="what a split-brain victim lost: list, export or "
                                          "drop the blocks it saved before its resync")
    _node_args(p)
    p.add_argument("what", choices=("list", "export", "drop"))
    p.add_argument("resource", metavar="RES")
    p.add_argument("id", nargs="?", type=int, help="the snapshot (export, drop)")
    p.add_argument("--out", metavar="FILE", help="export: the raw image to write")
    p.add_argument("--json", action="store_true", help="list: JSON")
    p.set_defaults(func=_cmd_splitbrain)


def _cmd_splitbrain(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rblock.store import victim

    cfg = _load(args)
    me = cfg.node(args.node)
    disk = me.disks.get(args.resource)
    if disk is None:
        return _usage(f"resource '{args.resource}' has no disk on {args.node}")
    disk = Path(disk)
    where = victim.snapshot_dir(disk, Path(me.metas[args.resource]))
    if args.what == "list":
        snaps = victim.list_snapshots(disk, where)
        if args.json:
            print(json.dumps(snaps, indent=2))
        elif not snaps:
            print(f"{args.resource}: no split-brain snapshots on {args.node}")
        for s in snaps:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
            state = "complete" if s.get("finished") else "resync not finished"
            print(f"{s['id']}: {when} {s['saved_bytes']} bytes saved ({state}); lost to "
                  f"{s.get('peer')}: {s.get('decision')}")
        return 0
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
        print(f"rblock: {e}", file=sys.stderr)
        return 1
    return 0


def _load(args: argparse.Namespace):
    from rblock.config import ConfigError, load

    try:
        cfg = load(args.config)
        cfg.node(args.node)
    except ConfigError as e:
        raise SystemExit(_usage(str(e))) from None
    return cfg


def _cmd_create_md(args: argparse.Namespace) -> int:
    from rblock.config import ConfigError
    from rblock.node import NodeError, create_md
    from rblock.store.metadata import MetadataError

    cfg = _load(args)
    try:
        for line in create_md(cfg, args.node, args.resources, args.force):
            print(line)
    except (NodeError, MetadataError, ConfigError) as e:
        return _usage(str(e))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from rblock.control_server import ControlServerError
    from rblock.node import Node, NodeError
    from rblock.runner import run_async

    cfg = _load(args)
    try:
        return run_async(Node(cfg, args.node).run())
    except (NodeError, ControlServerError) as e:
        return _usage(str(e))


def _client(args: argparse.Namespace):
    from rblock.control_client import ControlClient

    return ControlClient(_load(args).node(args.node).control)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from rblock.control_client import ControlError

    try:
        st = asyncio.run(_client(args).status())
    except ControlError as e:
        return _usage(str(e))
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st))
    return 0


def format_status(st: dict) -> str:
    """DRBD-like text: one block per resource, one indented block per peer."""
    lines = []
    for r in st["resources"]:
        lines.append(f"{r['name']} role:{r['role']} disk:{r['disk']} size:{_mib(r['size_bytes'])}"
                     + (f" nbd:{r['nbd']}" if r.get("nbd") else ""))
        if r["disk"] == "Diskless":
            lines.append("  no local disk: I/O goes to the peer; 'rblock attach "
                         f"{r['name']}' after replacing it (create-md)")
        if r.get("disk_faults"):
            lines.append(f"  fault injection on: the disk fails {', '.join(r['disk_faults'])}")
        fen = r.get("fencing") or {"mode": "none"}
        if fen["mode"] == "etcd":
            quorum = {True: "yes", False: "NO", None: "?"}[fen["quorum"]]
            line = (f"  fencing:etcd quorum:{quorum} lease:{'yes' if fen['lease'] else 'NO'} "
                    f"primary-key:{fen['primary_key']}")
            if fen.get("holder"):
                line += f" holder:{fen['holder']}"
            if fen.get("lease_until"):
                line += f" until:{fen['lease_until']}"
            lines.append(line)
            if fen.get("io_suspended"):
                lines.append(f"    I/O SUSPENDED for {fen['io_suspended_for_s']:.1f}s: "
                             f"{fen['io_suspended_why']} ({fen['held_writes']} writes held)")
            if fen.get("peer_outdated"):
                lines.append(f"    recorded Outdated in etcd: {', '.join(fen['peer_outdated'])}")
            if fen.get("self_outdated"):
                lines.append("    this node is recorded Outdated in etcd: it may not be "
                             "promoted until a resync from the primary")
        else:
            lines.append("  fencing:none (a partition can let both nodes write: see the "
                         "README, Fencing)")
        for p in r["peers"]:
            lines.append(f"  {p['node']} connection:{p['connection']} role:{p['role']} "
                         f"replication:{p['replication']} peer-disk:{p['disk']}")
            if p.get("split_brain"):
                lines.append("    split brain: both nodes wrote since they parted; keep one "
                             "side's data with 'connect --discard-my-data' on the other")
            elif p.get("refusal"):
                lines.append(f"    refused: {p['refusal']}")
            detail = f"    out-of-sync:{_mib(p['out_of_sync_bytes'])}"
            if p["replication"] not in ("Established", "Off"):
                eta = "?" if p["eta_s"] is None else f"{p['eta_s']:.0f}s"
                detail += (f" done:{p['sync_percent']:.1f}% "
                           f"rate:{_mib(p['sync_rate_bytes_per_s'])}/s eta:{eta}")
            detail += (f" sent:{_mib(p['sent_bytes'])} received:{_mib(p['received_bytes'])} "
                       f"pending:{p['pending_writes']} unacked:{_mib(p['unacked_bytes'])}")
            lines.append(detail)
    return "\n".join(lines)


def _mib(n: int) -> str:
    """Sizes exact when small (12KiB, not 0.0MiB): a problem is never rounded away."""
    if n < 2**20:
        return f"{n // 1024}KiB" if n % 1024 == 0 else f"{n}B"
    return f"{n / 2**20:.1f}MiB"


def _cmd_events(args: argparse.Namespace) -> int:
    import json

    from rblock.control_client import ControlError

    async def follow() -> None:
        async for ev in _client(args).events():
            if args.json:
                print(json.dumps(ev), flush=True)
            else:
                detail = f" ({ev['detail']})" if ev.get("detail") else ""
                print(f"{ev['resource']} {ev['what']} {ev['old']} -> {ev['new']}{detail}",
                      flush=True)

    try:
        asyncio.run(follow())
    except ControlError as e:
        return _usage(str(e))
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_action(args: argparse.Namespace) -> int:
    from rblock.control_client import ControlError

    body: dict = {}
    if args.action == "inject-fault":
        chosen = {w: getattr(args, w) for w in ("reads", "writes", "flushes")}
        if args.clear == any(chosen.values()):
            return _usage("inject-fault needs --clear or at least one of --reads, --writes, "
                          "--flushes")
        body.update(chosen)
    if getattr(args, "force", False):
        body["force"] = True
    if getattr(args, "discard_my_data", False):
        body["discard_my_data"] = True
    if getattr(args, "ignore_fencing", False):
        body["ignore_fencing"] = True
    try:
        msg = asyncio.run(_client(args).action(args.resource, args.action, **body))
    except ControlError as e:
        return _usage(str(e))
    print(f"{args.resource}: {msg}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rblock", description="Replicated block devices over NBD.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _cluster_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return args.func(args)
