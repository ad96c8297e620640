"""The `hvctl` command line: guests and nodes of an rblock cluster, through libvirt.

    hvctl [--config FILE] guest list|status|define|undefine|start|stop|destroy|console|move ...
    hvctl [--config FILE] node list|status|probe ...
    hvctl [--config FILE] events
    hvctl [--config FILE] agent [--node NAME]
    hvctl [--config FILE] ha status|log|what-if ...
    hvctl [--config FILE] node maintenance NODE on|off
    hvctl [--config FILE] web [--listen HOST:PORT] | web adduser NAME | web token NAME
    hvctl --version

--config goes before or after the subcommand; without it the file is $HVCTL_CONFIG, else
$RBLOCK_CONFIG, else /etc/rblock/cluster.toml. A command that takes a node (`agent --node`,
`node status [NODE]`) defaults to this host's name when the cluster file has a node of that
name.

Exit status: 0 done, 1 refused or failed (the message says why and what to do; also a
command that found nothing to do: it says so), 2 bad usage or a bad config file. With --json
the result (or {"ok": false, "error": ...}) is JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rblock import __version__
from rblock.config import CONFIG_ENV as CLUSTER_CONFIG_ENV  # both tools' file: rblock owns it
from rblock.config import DEFAULT_CONFIG_PATH, ConfigSource, config_source

CONFIG_ENV = "HVCTL_CONFIG"  # hvctl's own, read before $RBLOCK_CONFIG (older setups use it)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hvctl", description="Run KVM guests on rblock disks through libvirt, on any "
        "node of the cluster, and keep HA guests running (agent) and on a web page (web).",
        epilog="Exit status: 0 done, 1 refused or failed (or nothing to do), 2 bad usage or "
        "config.")
    ap.add_argument("--version", action="version", version=f"hvctl {__version__}",
                    help="print the version and exit")
    _common(ap, top=True)
    top = ap.add_subparsers(dest="group", required=True, metavar="COMMAND")

    guest = _sub(top, "guest", "guests: list, status, define, start, stop, move, console")
    gs = guest.add_subparsers(dest="command", required=True, metavar="ACTION")

    def cmd(name: str, text: str, needs_name: bool = True) -> argparse.ArgumentParser:
        p = _sub(gs, name, text)
        if needs_name:
            p.add_argument("name", metavar="GUEST", help="the guest ([guest.NAME] in the "
                           "cluster file)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        return p

    cmd("list", "every guest with its state, node and disks", needs_name=False)
    cmd("status", "one guest: state, node, domain type, disks and their roles")
    p = cmd("define", "define the guest's domain on a node without starting it")
    p.add_argument("--on", metavar="NODE", help="default: where it is defined, its `node` "
                   "setting, or the first node holding all its disks")
    cmd("undefine", "remove the guest's domain from every node (not its disks)")
    p = cmd("start", "make its resources Primary on a node and start it there")
    p.add_argument("--on", metavar="NODE", help="default: where it is defined, its `node` "
                   "setting, or the first node holding all its disks")
    p.add_argument("--force", action="store_true",
                   help="start even if some node's libvirt cannot be asked whether the guest "
                   "runs there: you are sure it does not")
    p = cmd("stop", "ACPI shutdown, destroy after a timeout, resources Secondary")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for power-off "
                   "(default: stop_timeout_s)")
    _stop_force(p)
    p = cmd("destroy", "power it off at once (like pulling the plug), resources Secondary")
    _stop_force(p)
    p = cmd("move", "stop it, hand its resources over, start it on NODE (cold move)")
    p.add_argument("node", metavar="NODE", help="the node to run it on")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for power-off "
                   "where it runs (default: stop_timeout_s)")
    p.add_argument("--force", action="store_true",
                   help="move even if some node's libvirt cannot be asked whether the guest "
                   "runs there: you are sure it does not")
    p = cmd("console", "attach to its serial console (virsh console), or print the log")
    p.add_argument("--log", action="store_true", help="print the console log and exit")

    node = _sub(top, "node", "nodes: list, status, probe, maintenance")
    ns = node.add_subparsers(dest="command", required=True, metavar="ACTION")
    p = _sub(ns, "list", "every node: libvirt, domain type, guests, rblock roles, and why a "
             "node cannot be reached")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = _sub(ns, "status", "one node in detail: libvirt, domain type, domains, rblock")
    p.add_argument("name", metavar="NODE", nargs="?",
                   help="default: this host, if the cluster file has a node of its name")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = _sub(ns, "probe", "probe (again) which domain type (kvm or qemu) a node can run")
    p.add_argument("name", metavar="NODE", nargs="?", help="default: every node with libvirt")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = _sub(top, "events", "stream guest lifecycle events from every node (until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    from hvctl.ha.cli import add_parsers
    from hvctl.web.cli import add_parsers as add_web_parsers

    add_parsers(top, ns)
    add_web_parsers(top)
    for name in ("start", "stop", "destroy", "move"):
        gs.choices[name].add_argument("--no-wait", action="store_true",
                                      help="HA guests: return once the agents have the "
                                      "request")
    _everywhere(ap)
    return ap


def _sub(sub: Any, name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose one-line help is also its description."""
    return sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".",
                          **kw)


def _stop_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="when some node's libvirt cannot be asked and the guest runs on no "
                   "node that can: you are sure it is down there. Its resources are then "
                   "made Secondary wherever rblock answers and no NBD client (a QEMU) holds "
                   "them; nothing runs elsewhere")


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--config and -v, on the top parser and (again) on every subcommand: they go before or
    after it. Below the top their default is SUPPRESS, so an absent one keeps the top's."""
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE", default=default,
                   help=f"the cluster's TOML file (default: ${CONFIG_ENV}, else "
                   f"${CLUSTER_CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})")
    p.add_argument("-v", "--verbose", action="store_true",
                   default=False if top else argparse.SUPPRESS, help="log what is done")


def _everywhere(p: argparse.ArgumentParser) -> None:
    """--config and -v on every subcommand; a subcommand without a description gets its
    one-line help as one (`hvctl X -h` says what X does)."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                if not sub.description and helps.get(name):
                    text = helps[name]
                    sub.description = text[:1].upper() + text[1:] + "."
                _common(sub)
                _everywhere(sub)


def config_path(given: str | None) -> ConfigSource:
    """The cluster file to read, and where that choice came from (for the message): as
    rblock's `config_source`, with $HVCTL_CONFIG before $RBLOCK_CONFIG."""
    if not given and os.environ.get(CONFIG_ENV):
        return ConfigSource(os.environ[CONFIG_ENV], f"${CONFIG_ENV}")
    return config_source(given)


def _default_node(cfg: Any, args: argparse.Namespace, attr: str, flag: str) -> str | None:
    """Fill args.ATTR with this host's node name (rblock's `this_node`: the host name, or
    its part before the first dot) if not given; the usage error if the file has no such
    node."""
    from rblock.config import ConfigError, this_node

    if getattr(args, attr, None):
        return None
    try:
        setattr(args, attr, this_node(cfg.cluster))
    except ConfigError:
        return (f"no {flag} given, and this host's name '{socket.gethostname()}' is not a "
                f"node in {cfg.path} (nodes: {', '.join(cfg.cluster.nodes) or 'none'}); "
                f"pass {flag} NAME")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="hvctl: %(message)s")
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("hvctl: interrupted; what was done so far stays done ('hvctl guest list' "
              "shows it)", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `hvctl ... | head`: the reader is gone, say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(args: argparse.Namespace) -> int:
    from hvctl.config import load
    from rblock.config import ConfigError

    src = config_path(args.config)
    if src.origin != "--config" and not Path(src.path).expanduser().exists():
        return _fail(args, f"no cluster file: {src.path} ({src.origin}) does not exist; pass "
                     f"--config FILE or set ${CLUSTER_CONFIG_ENV}", EXIT_USAGE)
    try:
        cfg = load(src.path)
    except ConfigError as e:
        return _fail(args, str(e), EXIT_USAGE)
    command = getattr(args, "command", None)
    if args.group == "agent" or (args.group, command) == ("node", "status"):
        agent = args.group == "agent"
        why = _default_node(cfg, args, "node" if agent else "name", "--node" if agent else
                            "NODE")
        if why is not None:
            return _fail(args, ("agent" if agent else "node status") + f": {why}", EXIT_USAGE)
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
        return _fail(args, str(e), EXIT_FAILED)
    except ConfigError as e:
        return _fail(args, str(e), EXIT_USAGE)
    ctl = Controller(cfg)
    try:
        handler = _HANDLERS[(args.group, args.command if args.group != "events" else "")]
        return await handler(ctl, args)
    except (HvError, VirtError, ControlError) as e:
        return _fail(args, str(e), EXIT_FAILED)
    except ConfigError as e:
        return _fail(args, str(e), EXIT_USAGE)
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
    return EXIT_OK


# --- guest ------------------------------------------------------------------------------------

async def _guest_list(ctl: Any, args: argparse.Namespace) -> int:
    guests = await ctl.guest_list()
    if args.json:
        print(json.dumps(guests, indent=2))
        return EXIT_OK
    if not guests:
        print(f"no guests in {ctl.cfg.path}; describe one in a [guest.NAME] table")
        return EXIT_OK
    rows = [["GUEST", "STATE", "NODE", "TYPE", "DISKS"]]
    for g in guests:
        rows.append([g["name"], g["state"], g["node"] or "-", g["domain_type"] or "-",
                     ", ".join(f"{d['resource']}({d['role'] or '?'})" for d in g["disks"])])
    print(_table(rows))
    notes = {n: why for g in guests for n, why in g["unreachable"].items()}
    for n, why in notes.items():
        print(f"node {n}: libvirt not reachable, its guests' states are unknown: {why}")
    return EXIT_OK


async def _guest_status(ctl: Any, args: argparse.Namespace) -> int:
    st = await ctl.guest_status(args.name)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    print(f"{st['name']}: {st['state']}" + (f" on {st['node']}" if st["node"] else "")
          + (f" ({st['domain_type']})" if st["domain_type"] else ""))
    print(f"  memory {st['memory_bytes'] >> 20} MiB, {st['vcpus']} vCPU(s); defined on: "
          f"{', '.join(st['defined_on']) or 'no node'}; console log {st['console_log']}")
    for d in st["disks"]:
        role = f"{d['role']}/{d['disk']}" if d["role"] else "role unknown"
        print(f"  disk {d['resource']}: {role}"
              + (f" {d['nbd']}" if d["nbd"] else "")
              + (f"; Primary on {', '.join(d['primary_on'])}" if d["primary_on"] else "")
              + (f"; rblock not reachable on {', '.join(d['unreachable'])}"
                 if d["unreachable"] else ""))
    for n, why in st["unreachable"].items():
        print(f"  node {n} not reachable: {why}")
    return EXIT_OK


async def _guest_action(ctl: Any, args: argparse.Namespace) -> int:
    c = args.command
    if c == "start":
        msg = await ctl.start(args.name, args.on, force=args.force)
    elif c == "stop":
        msg = await ctl.stop(args.name, args.timeout, force=args.force)
    elif c == "destroy":
        msg = await ctl.destroy(args.name, force=args.force)
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
        return _fail(args, str(e), EXIT_USAGE)
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
        return EXIT_OK
    rows = [["NODE", "LIBVIRT", "TYPE", "GUESTS", "RBLOCK"]]
    notes = []
    for n in nodes:
        lv = ("-" if n["libvirt"] is None else
              f"{n.get('libvirt_version')} up" if n["reachable"] else "unreachable")
        guests = ", ".join(f"{g}({s})" for g, s in n.get("guests", {}).items()) or "-"
        rb = ("unreachable" if n["rblock"] is None else
              ", ".join(f"{r}:{v['role']}/{v['disk']}" for r, v in n["rblock"].items()) or "-")
        rows.append([n["name"], lv, n.get("domain_type") or "-", guests, rb])
        if n["libvirt"] is not None and not n["reachable"]:
            notes.append(f"{n['name']}: libvirt unreachable: {n.get('error', 'no answer')}")
        if n["rblock"] is None:
            notes.append(f"{n['name']}: rblock unreachable: {n.get('rblock_error', 'no answer')}")
    print(_table(rows))
    for line in notes:
        print(line)
    return EXIT_OK


async def _node_status(ctl: Any, args: argparse.Namespace) -> int:
    st = await ctl.node_status(args.name, probe=args.command == "probe")
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    print(node_text(st))
    return EXIT_OK


def node_text(st: dict) -> str:
    """`hvctl node status` in words: one line per part, the reason beside what is down."""
    lines = [f"node {st['name']}"]
    if st["libvirt"] is None:
        lines.append("  libvirt: none configured (hvctl runs no guests here; add libvirt = "
                     "\"qemu:///system\" to its [node] table)")
    elif not st["reachable"]:
        lines.append(f"  libvirt: {st['libvirt']}: unreachable: {st.get('error', 'no answer')}")
    else:
        lines.append(f"  libvirt: {st['libvirt']}: libvirt {st['libvirt_version']}, "
                     f"hypervisor {st['hypervisor_version']}, host {st['hostname']}")
        dtype = st.get("domain_type")
        lines.append(f"  domain type: {dtype or 'unknown'} ({st['domain_type_reason']})")
        guests = ", ".join(f"{g} {s}" for g, s in st["guests"].items())
        lines.append(f"  guests: {guests or 'none defined here'}")
        others = [d for d in st["domains"] if d not in st["guests"]]
        if others:
            lines.append(f"  other domains (not hvctl's): {', '.join(others)}")
    where = f"control {st['control']}, nbd {st['nbd']}"
    if st["rblock"] is None:
        lines.append(f"  rblock ({where}): unreachable: {st.get('rblock_error', 'no answer')}")
    else:
        res = ", ".join(f"{r} {v['role']}/{v['disk']}" for r, v in st["rblock"].items())
        lines.append(f"  rblock ({where}): {res or 'no resources'}")
    return "\n".join(lines)


async def _node_probe(ctl: Any, args: argparse.Namespace) -> int:
    names = [args.name] if args.name else ctl.cfg.hv_nodes()
    if not names:
        return _fail(args, f"no node in {ctl.cfg.path} has a libvirt URI, so there is nothing "
                     "to probe; add libvirt = \"qemu:///system\" to a [node.NAME] table",
                     EXIT_USAGE)
    out = []
    for n in names:
        res = await ctl.probe(n)
        out.append({"node": n, "domain_type": res.domain_type, "reason": res.reason})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for o in out:
            print(f"{o['node']}: {o['domain_type']} ({o['reason']})")
    return EXIT_OK


async def _events(ctl: Any, args: argparse.Namespace) -> int:
    try:
        async for ev in ctl.events():
            if args.json:
                print(json.dumps(ev.to_json()), flush=True)
            else:
                d = ev.to_json()
                detail = "" if d["detail"].isdigit() else f" ({d['detail']})"  # a bare code
                print(f"{d['node']} {d['guest']} {d['event']}{detail}", flush=True)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # Ctrl-C is how a stream ends
    return EXIT_OK


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
