"""The HA part of the `hvctl` command line: `agent`, `ha status|log|what-if`, `node
maintenance`, and guest start/stop/move through the agents when they run."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from hvctl.ha.ops import HaError, HaView, desired_for, settled
from hvctl.ha.planner import clock

FOLLOW_POLL_S = 0.5


def add_parsers(top: Any, node_sub: Any) -> None:
    p = top.add_parser("agent", help="run the HA agent of this host (foreground)",
                       description="Run the HA agent of this host (foreground): keep its HA "
                       "guests as the cluster's leader assigns them; self-fence when the "
                       "lease cannot be renewed. SIGTERM stops it cleanly and leaves the "
                       "guests running (frozen).")
    p.add_argument("--node", metavar="NAME", help="this host's node name (default: the host "
                   "name, if the cluster file has a node of that name)")
    ha = top.add_parser("ha", help="HA: status, decision log, what-if",
                        description="HA: the leader's view of nodes and guests, its decision "
                        "log, and what it would do if a node died.")
    hs = ha.add_subparsers(dest="command", required=True, metavar="ACTION")
    text = "the leader, every node and every HA guest, with why"
    p = hs.add_parser("status", help=text, description=text[:1].upper() + text[1:] + ".")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    text = "the leader's decisions, one line each with its reason"
    p = hs.add_parser("log", help=text, description=text[:1].upper() + text[1:] + ".")
    p.add_argument("--follow", action="store_true", help="keep printing new decisions")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    text = "what the leader would do if NODE died now"
    p = hs.add_parser("what-if", help=text, description=text[:1].upper() + text[1:] + ".")
    p.add_argument("node", metavar="NODE", help="the node to imagine dead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    text = "move HA guests away from NODE (on) and place nothing there until off"
    p = node_sub.add_parser("maintenance", help=text,
                            description=text[:1].upper() + text[1:] + ".")
    p.add_argument("name", metavar="NODE", help="the node")
    p.add_argument("mode", choices=("on", "off"), help="on: evacuate it; off: usable again "
                   "(guests do not move back by themselves)")
    p.add_argument("--no-wait", action="store_true", help="return at once, before its "
                   "guests have left")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def no_etcd(cfg: Any) -> str | None:
    """The config error of an HA command on a cluster file without [cluster] etcd."""
    if cfg.cluster.etcd is not None:
        return None
    return (f"{cfg.path}: no [cluster] etcd: HA needs the etcd cluster that arbitrates; add "
            '[cluster] etcd = ["http://HOST:2379", ...]')


def run_agent(cfg: Any, args: argparse.Namespace) -> int:
    from hvctl.ha.agent import Agent, AgentError

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in root.handlers:  # a long-running daemon: every line with its time
        h.setFormatter(logging.Formatter("%(asctime)s hvctl: %(message)s"))

    # Usage and config first (exit 2), before anything runs.
    if args.node not in cfg.cluster.nodes:
        print(f"hvctl: agent: node '{args.node}' is not in {cfg.path} (nodes: "
              f"{', '.join(cfg.cluster.nodes)}); pass --node with one of them", file=sys.stderr)
        return 2
    why = no_etcd(cfg)
    if why is not None:
        print(f"hvctl: {why}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            agent = Agent(cfg, args.node)
            await agent.run(stop)
        except AgentError as e:
            print(f"hvctl: {e}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


async def ha_command(cfg: Any, args: argparse.Namespace) -> int:
    from rblock.config import ConfigError

    why = no_etcd(cfg)
    if why is not None:
        raise ConfigError(why)
    view = HaView.open(cfg)
    try:
        if args.command == "status":
            st = await view.status()
            _print(args, st, _status_text(st))
        elif args.command == "log":
            await _log(view, args)
        else:
            w = await view.what_if(args.node)
            _print(args, w, _what_if_text(w))
        return 0
    finally:
        await view.close()


def _status_text(st: dict) -> str:
    lines = [f"leader: {st['leader'] or 'none (no agent is running)'}", "nodes:"]
    for n in st["nodes"]:
        lease = (f"lease {n['lease']} ({n['lease_left_s']} s left)" if n["lease"]
                 else "no lease")
        lines.append(f"  {n['name']:<10} {n['state']:<12} {lease}; {n['why']}")
    lines.append("guests:")
    for g in st["guests"]:
        where = f"on {g['node']}" if g["node"] else "-"
        lines.append(f"  {g['name']:<10} {g['state']:<10} {where:<12} {g['reason']}")
    for b in st["bad_keys"]:
        lines.append(f"  etcd key not understood: {b}")
    return "\n".join(lines)


def _what_if_text(w: dict) -> str:
    if w["note"]:
        return w["note"]
    if not w["guests"]:
        return f"no HA guest runs on {w['node']}: nothing would move"
    lines = [f"if {w['node']} died now:"]
    for g in w["guests"]:
        if g["to"]:
            lines.append(f"  {g['guest']}: would be recovered on {g['to']} ({g['why']})")
        else:
            lines.append(f"  {g['guest']}: would not run ({g['outcome']}: {g['why']})")
    return "\n".join(lines)


def decision_line(d: dict) -> str:
    return f"{clock(d['time'])} {d['guest']}: {d['text']}  [{d['rule']}]"


async def _log(view: HaView, args: argparse.Namespace) -> None:
    last = ""
    while True:
        for key, d in await view.log(last):
            print(json.dumps(d) if args.json else decision_line(d), flush=True)
            last = key
        if not args.follow:
            if not last and not args.json:
                print("no decisions logged yet (the leader logs one per change of a guest)")
            return
        await asyncio.sleep(FOLLOW_POLL_S)


async def maintenance(cfg: Any, args: argparse.Namespace) -> int:
    from rblock.config import ConfigError

    why = no_etcd(cfg)
    if why is not None:
        raise ConfigError(why)
    view = HaView.open(cfg)
    try:
        msg = await view.maintenance(args.name, args.mode == "on")
        if args.mode == "on" and not args.no_wait and await view.agents_running():
            stuck = await view.wait_evacuated(args.name)
            if stuck:
                print(f"hvctl: {args.name} in maintenance, but these guests cannot leave: "
                      + "; ".join(stuck), file=sys.stderr)
                return 1
            msg += "; no HA guest left on it"
        _print(args, {"ok": True, "message": msg}, msg)
        return 0
    finally:
        await view.close()


async def through_agents(cfg: Any, args: argparse.Namespace) -> int | None:
    """guest start/stop/move of an HA guest while agents run: a request, then (unless
    --no-wait) wait for the result. None: not HA-managed or no agent: the caller acts."""
    from rblock.config import ConfigError

    g = cfg.guest(args.name)
    if g.ha == "disabled" or cfg.cluster.etcd is None:
        return None
    view = HaView.open(cfg)
    try:
        try:
            if not await view.agents_running():
                return None
        except HaError:
            return None
        if getattr(args, "force", False):
            raise ConfigError(f"--force is for guests hvctl runs itself; the HA agents run "
                              f"{g.name} (ha = \"{g.ha}\"): they ask every host and wait "
                              f"for a lost one to be fenced; drop --force ('hvctl ha status' "
                              f"says why {g.name} waits)")
        c = args.command
        node = args.node if c == "move" else getattr(args, "on", None)
        if node is not None:
            cfg.hv_node(node)
        if args.no_wait:
            seq = await view.request(g.name, desired_for(c), node)
            _print(args, {"ok": True, "message": f"requested (seq {seq})"},
                   f"{g.name}: {c} requested; the agents carry it out ('hvctl ha status')")
            return 0
        started = time.monotonic()
        rec = await view.carry_out(g.name, c, node)
        msg = f"{settled(g.name, rec)} ({rec.reason}; {time.monotonic() - started:.1f} s)"
        _print(args, {"ok": True, "message": msg, "node": rec.node}, msg)
        return 0
    finally:
        await view.close()
