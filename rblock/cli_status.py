"""`rblock status` and `rblock events` as text: what a resource's state is, and why.

The text never hides a problem: sizes are exact when small (12KiB, not 0.0MiB); beside
StandAlone the reason (split brain, unrelated data, disconnected by the operator, refused),
beside Connecting how the last attempt failed (wrong secret, TLS refused, peer unreachable,
...) and for how long, each with a line that says what happened and what to do; protocol and
TLS on every resource. Event lines start with a timestamp (local time, milliseconds, UTC
offset), as `drbdsetup events2 --timestamps` prints them.

Pure functions of the control API's JSON (rblock/control_server.py), so hvctl or a test can
format a status it already has.
"""

from __future__ import annotations

import datetime

from rblock.config import EXAMPLE_SECRET

MIB = 1 << 20
GIB = 1 << 30


def format_status(st: dict, example_secret: frozenset[str] = frozenset()) -> str:
    """DRBD-like text: one block per resource, one indented block per peer. EXAMPLE_SECRET:
    the resources whose secret is the example's (the CLI knows from its config file)."""
    lines = []
    for r in st["resources"]:
        lines.append(f"{r['name']} role:{r['role']} disk:{r['disk']} size:{size(r['size_bytes'])}"
                     + (f" protocol:{r['protocol']}" if r.get("protocol") else "")
                     + (f" tls:{_tls(r)}" if "tls" in r else "")
                     + (f" nbd:{r['nbd']}" if r.get("nbd") else ""))
        if r["name"] in example_secret:
            lines.append(f"  secret:\"{EXAMPLE_SECRET}\", the example's: anyone who has read "
                         f"the README can pose as a peer; set a long random secret on both "
                         f"nodes")
        if r["disk"] == "Diskless":
            lines.append("  no local disk: I/O goes to the peer; 'rblock attach "
                         f"{r['name']}' after replacing it (create-md)")
        if r.get("disk_faults"):
            lines.append(f"  fault injection on: the disk fails {', '.join(r['disk_faults'])}")
        lines += _fencing(r)
        for p in r["peers"]:
            lines += _peer(r, p)
    return "\n".join(lines)


def size(n: int) -> str:
    """Sizes exact when small (12KiB, not 0.0MiB): a problem is never rounded away."""
    if n < MIB:
        return f"{n // 1024}KiB" if n % 1024 == 0 and n else f"{n}B"
    if n < GIB:
        return f"{n / MIB:.1f}MiB"
    return f"{n / GIB:.1f}GiB"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _tls(r: dict) -> str:
    versions = {p.get("tls_version") for p in r["peers"]} - {None}
    if versions:
        return ",".join(sorted(versions))  # TLSv1.3: the link runs in it
    return "on" if r["tls"] else "off"  # on: configured, no link up to say which version


def _fencing(r: dict) -> list[str]:
    fen = r.get("fencing") or {"mode": "none"}
    if fen["mode"] != "etcd":
        return ["  fencing:none (a partition can let both nodes write: see the README, "
                "Fencing)"]
    quorum = {True: "yes", False: "NO", None: "?"}[fen["quorum"]]
    line = (f"  fencing:etcd quorum:{quorum} lease:{'yes' if fen['lease'] else 'NO'} "
            f"primary-key:{fen['primary_key']}")
    if fen.get("holder"):
        line += f" holder:{fen['holder']}"
    if fen.get("lease_until"):
        line += f" until:{fen['lease_until']}"
    lines = [line]
    if fen.get("io_suspended"):
        lines.append(f"    I/O SUSPENDED for {fen['io_suspended_for_s']:.1f}s: "
                     f"{fen['io_suspended_why']} ({fen['held_writes']} writes held)")
    if fen.get("peer_outdated"):
        lines.append(f"    recorded Outdated in etcd: {', '.join(fen['peer_outdated'])}")
    if fen.get("self_outdated"):
        lines.append("    this node is recorded Outdated in etcd: it may not be promoted "
                     "until a resync from the primary")
    return lines


def _peer(r: dict, p: dict) -> list[str]:
    short, why = connection_reason(r["name"], p)
    conn = p["connection"] + (f" ({short})" if short else "")
    lines = [f"  {p['node']} connection:{conn} role:{p['role']} replication:{p['replication']} "
             f"peer-disk:{p['disk']}"]
    lines += [f"    {w}" for w in why]
    detail = f"    out-of-sync:{size(p['out_of_sync_bytes'])}"
    if p["replication"] not in ("Established", "Off"):
        eta = "?" if p.get("eta_s") is None else f"{p['eta_s']:.0f}s"
        detail += (f" done:{p['sync_percent']:.1f}% "
                   f"rate:{size(p['sync_rate_bytes_per_s'])}/s eta:{eta}")
    detail += (f" sent:{size(p.get('sent_bytes', 0))} "
               f"received:{size(p.get('received_bytes', 0))} "
               f"pending:{p.get('pending_writes', 0)} unacked:{size(p.get('unacked_bytes', 0))}")
    lines.append(detail)
    return lines


def connection_reason(resource: str, p: dict) -> tuple[str, list[str]]:
    """Why the peer is not Connected: a few words for beside the state ("split brain",
    "wrong secret, for 42s") and the lines that say what happened and what to do."""
    conn = p["connection"]
    refusal = p.get("refusal") or ""
    if conn == "StandAlone":
        fix = (f"keep one node's data: 'rblock connect {resource} --discard-my-data' on the "
               f"node whose changes are to be thrown away (they are saved first: 'rblock "
               f"splitbrain list {resource}' there), then 'rblock connect {resource}' on the "
               f"other")
        if p.get("split_brain"):
            return "split brain", [f"{refusal or 'split brain: both nodes wrote since they parted'}"
                                   f"; {fix}"]
        if refusal.startswith("unrelated data"):
            return "unrelated data", [f"{refusal}; {fix}"]
        if refusal.startswith("'rblock disconnect'"):
            return "disconnected by the operator", [
                f"{refusal}; 'rblock connect {resource}' connects again"]
        if refusal:
            return "refused", [f"refused: {refusal}"]
        return "", []
    if conn != "Connecting":
        return "", []
    since = p.get("connection_for_s")
    for_ = f"for {duration(since)}" if since is not None else ""
    f = p.get("connect_failure")
    waits = p.get("dialer") == p["node"]  # the peer dials this node: it can only wait
    lines = []
    if f is not None:
        short = f["kind"]
        if f["attempts"] > 1:
            when = (f"since {duration(f['first_ago_s'])} ago ({f['attempts']} attempts, the "
                    f"last {duration(f['last_ago_s'])} ago)")
        else:
            when = f"{duration(f['last_ago_s'])} ago"
        lines.append(f"{f['kind']} {when}: {f['message']}")
    elif refusal:
        short = "refused"
        lines.append(f"refused: {refusal}")
    else:
        short = f"waiting for {p['node']}" if waits else ""
    if waits and (f is None or f["kind"] in ("link lost", "disconnected by the peer")):
        lines.append(f"{p['node']} dials this node, and has not connected since: is 'rblock "
                     f"up' running there, and can it reach this node's replication address?")
    return ", ".join(w for w in (short, for_) if w), lines


# --- events ------------------------------------------------------------------------------------


def timestamp(t: float) -> str:
    """2026-12-03T07:12:40.123+01:00: local time, to the millisecond, with its offset."""
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def format_event(ev: dict) -> str:
    """One line per event, timestamp first. The current state that `rblock events` starts
    with: one `exists` line per resource, then `exists -` (as `drbdsetup events2`)."""
    ts = timestamp(ev["time"])
    if ev["what"] == "exists":
        if ev["resource"] == "-":
            return f"{ts} exists -"
        return f"{ts} {ev['resource']} exists {state_words(ev['status'])}"
    words = [ts, ev["resource"], ev["what"]]
    if ev.get("old"):
        words.append(f"{ev['old']} -> {ev['new']}")
    elif ev.get("new"):
        words.append(ev["new"])
    if ev.get("detail"):
        words.append(f"({ev['detail']})")
    return " ".join(words)


def state_words(r: dict) -> str:
    """A resource's state on one line: role, disk, and per peer its connection (with the
    reason it is not connected), role, replication, disk and out-of-sync."""
    words = [f"role:{r['role']}", f"disk:{r['disk']}"]
    if r.get("protocol"):
        words.append(f"protocol:{r['protocol']}")
    for p in r["peers"]:
        short, _ = connection_reason(r["name"], p)
        words += [f"{p['node']}", f"connection:{p['connection']}"
                  + (f"({short})" if short else ""),
                  f"peer-role:{p['role']}", f"replication:{p['replication']}",
                  f"peer-disk:{p['disk']}", f"out-of-sync:{size(p['out_of_sync_bytes'])}"]
    return " ".join(words)
