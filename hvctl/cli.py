"""The `hvctl` command line: guests and nodes of an rblock cluster, through libvirt.

    hvctl --config FILE guest list|status|define|undefine|start|stop|destroy|console|move ...
    hvctl --config FILE node list|status|probe ...
    hvctl --config FILE events
    hvctl --config FILE agent --node NAME
    hvctl --config FILE ha status|log|what-if ...
    hvctl --config FILE node maintenance NODE on|off
    hvctl --config FILE web [--listen HOST:PORT] | web adduser NAME | web token NAME

Exit status: 0 done, 1 refused or failed (the message says why and what to do), 2 bad
usage or a bad config file. With --json the result (or {"error": ...}) is JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from typing import Any

CONFIG_ENV = "HVCTL_CONFIG"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hvctl", description="Run KVM guests on rblock disks "
                                 "through libvirt, on any node of the cluster.")
    ap.add_argument("--config", default=os.environ.get(CONFIG_ENV), metavar="FILE",
                    help=f"the cluster's TOML file (default: ${CONFIG_ENV})")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    top = ap.add_subparsers(dest="group", required=True)

    guest = top.add_parser("guest", help="guests: list, status, start, stop, move, ...")
    gs = guest.add_subparsers(dest="command", required=True)

    def cmd(name: str, text: str, needs_name: bool = True) -> argparse.ArgumentParser:
        p = gs.add_parser(name, help=text, description=text)
        if needs_name:
            p.add_argument("name", metavar="GUEST")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    cmd("list", "every guest with its state and node", needs_name=False)
    cmd("status", "one guest: state, node, domain type, disks and their roles")
    p = cmd("define", "define the guest's domain on a node without starting it")
    p.add_argument("--on", metavar="NODE")
    cmd("undefine", "remove the guest's domain from every node (not its disks)")
    p = cmd("start", "make its resources Primary on a node and start it there")
    p.add_argument("--on", metavar="NODE", help="default: where it is defined, its `node` "
                   "setting, or the first node holding all its disks")
    p.add_argument("--force", action="store_true",
                   help="start even if some node cannot be asked whether it runs there")
    p = cmd("stop", "ACPI shutdown, destroy after a timeout, resources Secondary")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for power-off "
                   "(default: stop_timeout_s)")
    cmd("destroy", "power it off at once (like pulling the plug), resources Secondary")
    p = cmd("move", "stop it, hand its resources over, start it on NODE (cold move)")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--timeout", type=float, metavar="S")
    p.add_argument("--force", action="store_true")
    p = cmd("console", "attach to its serial console (virsh console), or print the log")
    p.add_argument("--log", action="store_true", help="print the console log and exit")

    node = top.add_parser("node", help="nodes: list, status, probe")
    ns = node.add_subparsers(dest="command", required=True)
    p = ns.add_parser("list", help="every node: libvirt, domain type, rblock roles")
    p.add_argument("--json", action="store_true")
    p = ns.add_parser("status", help="one node in detail")
    p.add_argument("name", metavar="NODE")
    p.add_argument("--json", action="store_true")
    p = ns.add_parser("probe", help="probe (again) which domain type a node can run")
    p.add_argument("name", metavar="NODE", nargs="?")
    p.add_argument("--json", action="store_true")

    p = top.add_parser("events", help="stream guest lifecycle events from every node")
    p.add_argument("--json", action="store_true")
    from hvctl.ha.cli import add_parsers
    from hvctl.web.cli import add_parsers as add_web_parsers

    add_parsers(top, ns)
    add_web_parsers(top)
    for name in ("start", "stop", "destroy", "move"):
        gs.choices[name].add_argument("--no-wait", action="store_true",
                                      help="HA guests: return once the agents have the "
                                      "request")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="hvctl: %(message)s")
    from hvctl.config import load
    from rblock.config import ConfigError

    if not args.config:
        return _fail(args, f"no cluster file; pass --config FILE or set ${CONFIG_ENV}", 2)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        return _fail(args, str(e), 2)
    if args.group == "guest" and args.command == "console":
        return _console(cfg, args)
    if args.group == "agent":
        from hvctl.ha.cli import run_agent

        return run_agent(cfg, args)
    if args.group == "web":
        from hvctl.web.cli import run as run_web

        return run_web(cfg, args)
    return asyncio.run(_run(cfg, args))


async def _run(cfg: Any, args: argparse.Namespace) -> int:
    from hvctl.controller import Controller, HvError
    from hvctl.ha import cli as ha_cli
    from hvctl.ha.ops import HaError
    from hvctl.virt import VirtError
    from rblock.config import ConfigError
    from rblock.control_client import ControlError

    try:
        if args.group == "ha":
            return await ha_cli.ha_command(cfg, args)
        if (args.group, args.command) == ("node", "maintenance"):
            return await ha_cli.maintenance(cfg, args)
        if args.group == "guest" and args.command in ("start", "stop", "destroy", "move"):
            done = await ha_cli.through_agents(cfg, args)
            if done is not None:
                return done
    except HaError as e:
        return _fail(args, str(e), 1)
    except ConfigError as e:
        return _fail(args, str(e), 2)
    ctl = Controller(cfg)
    try:
        handler = _HANDLERS[(args.group, args.command if args.group != "events" else "")]
        return await handler(ctl, args)
    except (HvError, VirtError, ControlError) as e:
        return _fail(args, str(e), 1)
    except ConfigError as e:
        return _fail(args, str(e), 2)
    finally:
        ctl.close()


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))
    print(f"hvctl: {message}", file=sys.stderr)
    return status


def _done(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"ok": True, "message": message}))
    else:
        print(message)
    return 0


# --- guest ------------------------------------------------------------------------------------

async def _guest_list(ctl: Any, args: argparse.Namespace) -> int:
    guests = await ctl.guest_list()
    if args.json:
        print(json.dumps(guests, indent=2))
        return 0
    rows = [["GUEST", "STATE", "NODE", "TYPE", "DISKS"]]
    for g in guests:
        rows.append([g["name"], g["state"], g["node"] or "-", g["domain_type"] or "-",
                     ", ".join(f"{d['resource']}({d['role'] or '?'})" for d in g["disks"])])
    print(_table(rows))
    return 0


async def _guest_status(ctl: Any, args: argparse.Namespace) -> int:
    st = await ctl.guest_status(args.name)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{st['name']}: {st['state']}" + (f" on {st['node']}" if st["node"] else "")
          + (f" ({st['domain_type']})" if st["domain_type"] else ""))
    print(f"  memory {st['memory_bytes'] >> 20} MiB, {st['vcpus']} vCPU(s); defined on: "
          f"{', '.join(st['defined_on']) or 'no node'}; console log {st['console_log']}")
    for d in st["disks"]:
        print(f"  disk {d['resource']}: {d['role'] or '?'}/{d['disk'] or '?'}"
              + (f" {d['nbd']}" if d["nbd"] else "")
              + (f"; Primary on {', '.join(d['primary_on'])}" if d["primary_on"] else ""))
    for n, why in st["unreachable"].items():
        print(f"  node {n} not reachable: {why}")
    return 0


async def _guest_action(ctl: Any, args: argparse.Namespace) -> int:
    c = args.command
    if c == "start":
        msg = await ctl.start(args.name, args.on, force=args.force)
    elif c == "stop":
        msg = await ctl.stop(args.name, args.timeout)
    elif c == "destroy":
        msg = await ctl.destroy(args.name)
    elif c == "move":
        msg = await ctl.move(args.name, args.node, args.timeout, force=args.force)
    elif c == "define":
        msg = await ctl.define(args.name, args.on)
    else:
        assert c == "undefine", c
        msg = await ctl.undefine(args.name)
    return _done(args, msg)


def _console(cfg: Any, args: argparse.Namespace) -> int:
    """Interactive: `virsh console` on the node that runs it. Otherwise the log file (which
    is on that node; here when the node is this machine)."""
    from rblock.config import ConfigError

    try:
        g = cfg.guest(args.name)
    except ConfigError as e:
        return _fail(args, str(e), 2)
    if args.log or not sys.stdin.isatty():
        try:
            text = g.console_log.read_text(errors="replace")
        except OSError as e:
            return _fail(args, f"cannot read {g.console_log}: {e.strerror}; the log is on the "
                         f"node that ran {g.name}", 1)
        if args.json:
            print(json.dumps({"name": g.name, "console_log": str(g.console_log), "text": text}))
        else:
            sys.stdout.write(text)
        return 0
    node = asyncio.run(_running_node(cfg, g.name))
    if isinstance(node, int):
        return node
    virsh = shutil.which("virsh")
    if virsh is None:
        return _fail(args, "virsh not found; install libvirt-clients, or use --log", 1)
    uri = cfg.hv_node(node)
    print(f"hvctl: {g.name} on {node}; leave the console with Ctrl+]", file=sys.stderr)
    os.execv(virsh, [virsh, "-c", uri, "console", g.name])
    return 1  # not reached


async def _running_node(cfg: Any, name: str) -> str | int:
    from hvctl.controller import Controller

    ctl = Controller(cfg)
    try:
        p = ctl.locate(cfg.guest(name))
    finally:
        ctl.close()
    if not p.active:
        print(f"hvctl: {name} is not running; 'hvctl guest console {name} --log' shows its "
              "last console output", file=sys.stderr)
        return 1
    return p.active[0]


# --- node, events -------------------------------------------------------------------------------

async def _node_list(ctl: Any, args: argparse.Namespace) -> int:
    nodes = await ctl.node_list()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = [["NODE", "LIBVIRT", "TYPE", "GUESTS", "RBLOCK"]]
    for n in nodes:
        lv = ("-" if n["libvirt"] is None else
              f"{n.get('libvirt_version')} up" if n["reachable"] else "unreachable")
        guests = ", ".join(f"{g}({s})" for g, s in n.get("guests", {}).items()) or "-"
        rb = ("unreachable" if n["rblock"] is None else
              ", ".join(f"{r}:{v['role']}/{v['disk']}" for r, v in n["rblock"].items()) or "-")
        rows.append([n["name"], lv, n.get("domain_type") or "-", guests, rb])
    print(_table(rows))
    return 0


async def _node_status(ctl: Any, args: argparse.Namespace) -> int:
    st = await ctl.node_status(args.name, probe=args.command == "probe")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for k, v in st.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


async def _node_probe(ctl: Any, args: argparse.Namespace) -> int:
    names = [args.name] if args.name else ctl.cfg.hv_nodes()
    out = []
    for n in names:
        res = await ctl.probe(n)
        out.append({"node": n, "domain_type": res.domain_type, "reason": res.reason})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for o in out:
            print(f"{o['node']}: {o['domain_type']} ({o['reason']})")
    return 0


async def _events(ctl: Any, args: argparse.Namespace) -> int:
    try:
        async for ev in ctl.events():
            if args.json:
                print(json.dumps(ev.to_json()), flush=True)
            else:
                d = ev.to_json()
                print(f"{d['node']} {d['guest']} {d['event']} ({d['detail']})", flush=True)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


_HANDLERS: dict[tuple[str, str], Callable[[Any, argparse.Namespace], Awaitable[int]]] = {
    ("guest", "list"): _guest_list,
    ("guest", "status"): _guest_status,
    **{("guest", c): _guest_action for c in ("start", "stop", "destroy", "move", "define",
                                              "undefine")},
    ("node", "list"): _node_list,
    ("node", "status"): _node_status,
    ("node", "probe"): _node_probe,
    ("events", ""): _events,
}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
