"""HA's keys in etcd, and their JSON. Pure: builds and reads values, no I/O.

Under the cluster's `etcd_prefix` (default /rblock), beside rblock's fencing keys
(`{prefix}/{resource}/primary`, `.../outdated/{node}`: rblock/replica/fence_txn.py):

    _ha/nodes/{node}        NodeReport of that node's agent; bound to the agent's lease
    _ha/leader              the leader agent's node name; bound to its lease
    _ha/records/{guest}     Record: the leader's state of the guest and its assignment
    _ha/requests/{guest}    Request: `hvctl guest start|stop|move`, seq growing
    _ha/frozen/{node}       the agent stopped cleanly ({"time": t})
    _ha/maintenance/{node}  `hvctl node maintenance NODE on` ({"time": t})
    _ha/log/{time_ns}-{n}   one Decision per key (the leader keeps the last LOG_KEEP)

Resource names start with a letter or digit (rblock/config.py), so `_ha` never collides
with one. One range read of `{prefix}/` is a consistent snapshot of all of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from hvctl.ha.model import (
    Decision,
    HaMode,
    NodeReport,
    Observed,
    Record,
    Request,
    ResourceObs,
    State,
    Want,
)
from rblock.etcd import KV

LOG_KEEP = 500  # decisions kept in etcd


@dataclass(frozen=True)
class HaKeys:
    prefix: str

    @property
    def base(self) -> str:
        return self.prefix.rstrip("/") + "/"

    @property
    def ha(self) -> str:
        return self.base + "_ha/"

    def node(self, node: str) -> str:
        return f"{self.ha}nodes/{node}"

    @property
    def leader(self) -> str:
        return self.ha + "leader"

    def record(self, guest: str) -> str:
        return f"{self.ha}records/{guest}"

    def request(self, guest: str) -> str:
        return f"{self.ha}requests/{guest}"

    def frozen(self, node: str) -> str:
        return f"{self.ha}frozen/{node}"

    def maintenance(self, node: str) -> str:
        return f"{self.ha}maintenance/{node}"

    @property
    def log_dir(self) -> str:
        return self.ha + "log/"

    def log(self, time_s: float, i: int) -> str:
        return f"{self.log_dir}{int(time_s * 1e9):020d}-{i:04d}"


# --- JSON ------------------------------------------------------------------------------------

def dump_report(r: NodeReport, time_s: float) -> str:
    return json.dumps({"guests": dict(r.guests),
                       "resources": {k: asdict(v) for k, v in r.resources.items()},
                       "done": dict(r.done),
                       "failed": {g: list(f) for g, f in r.failed.items()},
                       "time": round(time_s, 3)})


def load_report(node: str, text: str) -> NodeReport:
    d = json.loads(text)
    return NodeReport(node, dict(d.get("guests", {})),
                      {k: ResourceObs(v["role"], v["disk"])
                       for k, v in d.get("resources", {}).items()},
                      {g: int(s) for g, s in d.get("done", {}).items()},
                      {g: (int(f[0]), str(f[1])) for g, f in d.get("failed", {}).items()})


def dump_record(r: Record) -> str:
    d = asdict(r)
    d["state"] = r.state.value
    d["want"] = r.want.value
    return json.dumps(d)


def load_record(text: str) -> Record:
    d = json.loads(text)
    d["state"] = State(d["state"])
    d["want"] = Want(d["want"])
    return Record(**d)


def dump_request(r: Request) -> str:
    return json.dumps({"state": r.state.value, "node": r.node, "seq": r.seq})


def load_request(text: str) -> Request:
    d = json.loads(text)
    return Request(HaMode(d["state"]), d.get("node"), int(d["seq"]))


def dump_decision(d: Decision) -> str:
    return json.dumps({"guest": d.guest, "rule": d.rule, "before": d.before.value,
                       "after": d.after.value, "node": d.node, "text": d.text,
                       "time": round(d.time, 3)})


def load_decision(text: str) -> Decision:
    d = json.loads(text)
    return Decision(d["guest"], d["rule"], State(d["before"]), State(d["after"]), d["node"],
                    d["text"], float(d["time"]))


# --- one snapshot -----------------------------------------------------------------------------

@dataclass
class Snapshot:
    """Everything under the prefix, parsed. `report_leases`: node -> its agent's lease."""

    reports: dict[str, NodeReport] = field(default_factory=dict)
    report_leases: dict[str, int] = field(default_factory=dict)
    report_times: dict[str, float] = field(default_factory=dict)
    leader: str | None = None
    leader_lease: int = 0
    records: dict[str, Record] = field(default_factory=dict)
    requests: dict[str, Request] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    maintenance: set[str] = field(default_factory=set)
    primary: dict[str, str] = field(default_factory=dict)
    outdated: dict[str, set[str]] = field(default_factory=dict)
    log: list[tuple[str, Decision]] = field(default_factory=list)  # (key, decision), oldest first
    bad: list[str] = field(default_factory=list)  # keys that did not parse

    def observed(self, now: float, lost_since: dict[str, float]) -> Observed:
        return Observed(now, dict(self.reports), frozenset(self.frozen),
                        frozenset(self.maintenance), dict(self.primary),
                        {r: frozenset(s) for r, s in self.outdated.items()}, dict(lost_since))


def parse(keys: HaKeys, kvs: list[KV]) -> Snapshot:
    s = Snapshot()
    for kv in kvs:
        if not kv.key.startswith(keys.base):
            continue
        rest = kv.key[len(keys.base):]
        try:
            _parse_one(s, rest, kv)
        except (ValueError, KeyError, TypeError) as e:
            s.bad.append(f"{kv.key}: {e}")
    s.log.sort(key=lambda x: x[0])
    return s


def _parse_one(s: Snapshot, rest: str, kv: KV) -> None:
    parts = rest.split("/")
    if parts[0] != "_ha":
        if len(parts) == 2 and parts[1] == "primary":
            s.primary[parts[0]] = kv.value
        elif len(parts) == 3 and parts[1] == "outdated":
            s.outdated.setdefault(parts[0], set()).add(parts[2])
        return
    kind, name = (parts[1], "/".join(parts[2:])) if len(parts) > 1 else ("", "")
    if kind == "nodes":
        s.reports[name] = load_report(name, kv.value)
        s.report_leases[name] = kv.lease
        s.report_times[name] = float(json.loads(kv.value).get("time", 0))
    elif kind == "leader":
        s.leader, s.leader_lease = kv.value, kv.lease
    elif kind == "records":
        s.records[name] = load_record(kv.value)
    elif kind == "requests":
        s.requests[name] = load_request(kv.value)
    elif kind == "frozen":
        s.frozen.add(name)
    elif kind == "maintenance":
        s.maintenance.add(name)
    elif kind == "log":
        s.log.append((kv.key, load_decision(kv.value)))
