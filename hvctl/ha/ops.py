"""HA seen from a command (CLI today, the web API later): read the cluster's HA state from
etcd, ask the planner what-if, write requests and maintenance marks, wait for results.

Nothing here runs guests: the agents do (hvctl/ha/agent.py). A request is one etcd key per
guest with a growing `seq`; the leader takes it and the record says when it is carried out.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from hvctl.config import HvConfig
from hvctl.ha import keys as K
from hvctl.ha.agent import AgentError, etcd_client, guest_spec, ha_guests
from hvctl.ha.model import HaMode, Record, Request, State
from hvctl.ha.planner import what_if
from rblock.etcd import Etcd, EtcdError, EtcdUnavailable

WAIT_TIMEOUT_S = 180.0
WAIT_POLL_S = 0.2
FINAL = (State.STARTED, State.STOPPED, State.ERROR)


def desired_for(action: str) -> HaMode:
    """The desired state a guest action asks the agents for."""
    return HaMode.STOPPED if action in ("stop", "destroy") else HaMode.STARTED


def settled(guest: str, rec: Record) -> str:
    """What a carried-out request did, for the user: "vm1 started on beta", "vm1 stopped"."""
    return f"{guest} started on {rec.node}" if rec.state is State.STARTED else f"{guest} stopped"


class HaError(Exception):
    """Refused or failed; the message says why and what to do."""


@dataclass
class HaView:
    cfg: HvConfig
    etcd: Etcd
    keys: K.HaKeys

    @classmethod
    def open(cls, cfg: HvConfig) -> HaView:
        try:
            etcd = etcd_client(cfg)
        except AgentError as e:
            raise HaError(str(e)) from None
        assert cfg.cluster.etcd is not None
        return cls(cfg, etcd, K.HaKeys(cfg.cluster.etcd.prefix))

    async def close(self) -> None:
        await self.etcd.close()

    async def _write(self, key: str, value: str | None) -> None:
        """Put VALUE at KEY (delete it if None); HaError naming the fix if etcd is away."""
        try:
            if value is None:
                await self.etcd.delete(key)
            else:
                await self.etcd.put(key, value)
        except (EtcdUnavailable, EtcdError) as e:
            raise HaError(f"cannot write to etcd: {e}; is etcd up (see [cluster] etcd in "
                          f"{self.cfg.path})?") from None

    async def snapshot(self) -> K.Snapshot:
        try:
            return K.parse(self.keys, await self.etcd.get(self.keys.base, prefix=True))
        except (EtcdUnavailable, EtcdError) as e:
            raise HaError(f"cannot read the HA state: {e}; is etcd up (see [cluster] etcd in "
                          f"{self.cfg.path})?") from None

    # --- reading ----------------------------------------------------------------------------

    def node_state(self, snap: K.Snapshot, node: str) -> tuple[str, str]:
        """(online|maintenance|frozen|lost|fenced, why)."""
        if node in snap.reports:
            if node in snap.maintenance:
                return "maintenance", "agent online; nothing is placed here"
            return "online", "agent online"
        if node in snap.frozen:
            return "frozen", "agent stopped cleanly; its guests are left as they are"
        held = sorted(r for r, n in snap.primary.items() if n == node)
        if held:
            return "lost", (f"no agent lease; rblock still holds {', '.join(held)} there "
                            "under a live lease")
        return "fenced", "no agent lease, and no rblock primary key held there"

    async def status(self, snap: K.Snapshot | None = None) -> dict[str, Any]:
        """Nodes and guests as the agents see them (from SNAP, or a new snapshot)."""
        snap = snap if snap is not None else await self.snapshot()
        nodes = []
        for n in self.cfg.hv_nodes():
            state, why = self.node_state(snap, n)
            lease = snap.report_leases.get(n)
            left = None
            if lease:
                try:
                    left = await self.etcd.lease_ttl(lease)
                except (EtcdUnavailable, EtcdError):
                    left = None
            nodes.append({"name": n, "state": state, "why": why,
                          "lease": f"{lease:x}" if lease else None, "lease_left_s": left,
                          "reported_at": snap.report_times.get(n)})
        guests = []
        for name, g in ha_guests(self.cfg).items():
            rec = snap.records.get(name)
            rep = snap.reports.get(rec.node) if rec and rec.node else None
            guests.append({"name": name, "ha": g.ha,
                           "state": rec.state.value if rec else "unknown",
                           "node": rec.node if rec else None,
                           "want": rec.want.value if rec else None,
                           "libvirt": rep.guests.get(name) if rep else None,
                           "restarts": rec.restarts if rec else 0,
                           "relocations": rec.relocations if rec else 0,
                           "since": rec.since if rec else None,
                           "reason": rec.reason if rec else "no record yet (is an agent "
                           "running?)"})
        return {"leader": snap.leader, "nodes": nodes, "guests": guests,
                "bad_keys": snap.bad}

    async def etcd_health(self) -> dict[str, Any]:
        """The arbiter: {"quorum": bool, "members": [{"name", "endpoint", "ok", "leader",
        "error"}], "text"}; a member is ok when it answers and knows a Raft leader."""
        ends = await self.etcd.endpoint_status()
        try:
            members = await self.etcd.members()
        except (EtcdUnavailable, EtcdError):
            members = []
        by_url = {u.rstrip("/"): m for m in members for u in m.get("clientURLs", [])}
        leader = next((e["leader"] for e in ends if e["ok"]), "")
        out = []
        for e in ends:
            m = by_url.get(e["endpoint"].rstrip("/"), {})
            out.append({"name": m.get("name") or e["endpoint"], "endpoint": e["endpoint"],
                        "ok": e["ok"], "leader": bool(m) and str(m.get("ID")) == leader,
                        "error": e["error"]})
        up = sum(1 for e in out if e["ok"])
        total = max(len(members), len(out))
        quorum = up > total // 2
        text = (f"quorum: {up} of {total} etcd members up" if quorum else
                f"NO QUORUM: {up} of {total} etcd members up; fencing and failover wait "
                "until a majority is back")
        return {"quorum": quorum, "members": out, "text": text}

    async def log(self, after: str = "",
                  snap: K.Snapshot | None = None) -> list[tuple[str, dict]]:
        snap = snap if snap is not None else await self.snapshot()
        return [(k, {"guest": d.guest, "rule": d.rule, "before": d.before.value,
                     "after": d.after.value, "node": d.node, "text": d.text, "time": d.time})
                for k, d in snap.log if k > after]

    async def what_if(self, node: str, snap: K.Snapshot | None = None) -> dict[str, Any]:
        self.cfg.hv_node(node)  # ConfigError naming the fix if unknown
        snap = snap if snap is not None else await self.snapshot()
        specs = {n: guest_spec(self.cfg, g) for n, g in ha_guests(self.cfg).items()}
        records = {g: r for g, r in snap.records.items() if g in specs}
        now = time.time()
        lost = {n: now for n in self.cfg.hv_nodes() if n not in snap.reports}
        p = what_if(node, snap.observed(now, lost), specs, snap.requests, records)
        out = []
        for g, rec in sorted(records.items()):
            if rec.node != node or rec.state in (State.STOPPED, State.ERROR):
                continue
            new = p.records.get(g, rec)
            moves = new.node if new.node != node and new.state is State.STARTING else None
            out.append({"guest": g, "state": rec.state.value, "to": moves,
                        "outcome": new.state.value, "why": new.reason})
        return {"node": node, "leader": snap.leader, "guests": out,
                "note": None if snap.leader else "no agent is running: nothing would move"}

    # --- acting -----------------------------------------------------------------------------

    async def agents_running(self) -> bool:
        return (await self.snapshot()).leader is not None

    async def request(self, guest: str, state: HaMode, node: str | None) -> int:
        snap = await self.snapshot()
        old = snap.requests.get(guest)
        rec = snap.records.get(guest)
        seq = max(old.seq if old else 0, rec.request_seq if rec else 0) + 1
        await self._write(self.keys.request(guest), K.dump_request(Request(state, node, seq)))
        return seq

    async def carry_out(self, guest: str, action: str, node: str | None) -> Record:
        """ACTION (start, stop, destroy, move) of GUEST through the agents: the request,
        then its settled record; HaError with the record's reason if it did not happen."""
        state = desired_for(action)
        seq = await self.request(guest, state, node)
        ok, rec = await self.wait(guest, seq, state, node)
        if not ok:
            raise HaError(f"{guest}: {rec.state.value}" + (f" on {rec.node}" if rec.node else "")
                          + f": {rec.reason}")
        return rec

    async def wait(self, guest: str, seq: int, state: HaMode, node: str | None,
                   timeout_s: float = WAIT_TIMEOUT_S) -> tuple[bool, Record]:
        """Until the leader took request SEQ and the guest settled: (as asked?, record)."""
        deadline = time.monotonic() + timeout_s
        rec = None
        while time.monotonic() < deadline:
            rec = (await self.snapshot()).records.get(guest)
            if rec is not None and rec.request_seq >= seq and rec.state in FINAL:
                want = State.STARTED if state is HaMode.STARTED else State.STOPPED
                return (rec.state is want and (node is None or rec.node == node)), rec
            await asyncio.sleep(WAIT_POLL_S)
        where = f" (now {rec.state.value}: {rec.reason})" if rec else ""
        raise HaError(f"{guest}: not settled after {timeout_s:g} s{where}; follow it with "
                      "'hvctl ha log --follow'")

    async def maintenance(self, node: str, on: bool) -> str:
        self.cfg.hv_node(node)
        key = self.keys.maintenance(node)
        if on:
            await self._write(key, json.dumps({"time": round(time.time(), 3)}))
            return (f"{node} in maintenance: its HA guests move away, nothing is placed "
                    "there; its agent may be stopped once 'hvctl ha status' shows no guest "
                    "on it")
        await self._write(key, None)
        return f"{node} out of maintenance (guests do not move back by themselves)"

    async def wait_evacuated(self, node: str, timeout_s: float = WAIT_TIMEOUT_S) -> list[str]:
        """Until no HA guest runs or is to run on NODE; the guests that could not leave
        (their reason says why) if it does not happen within TIMEOUT_S."""
        deadline = time.monotonic() + timeout_s
        stuck: list[str] = []
        while time.monotonic() < deadline:
            snap = await self.snapshot()
            stuck = [f"{g}: {r.reason}" for g, r in snap.records.items()
                     if r.node == node and r.state not in (State.STOPPED, State.ERROR)]
            moving = [g for g, r in snap.records.items()
                      if r.state in (State.RELOCATE, State.STARTING)]
            if not stuck and not moving:
                return []
            if stuck and all("no node can take it" in s for s in stuck):
                return stuck
            await asyncio.sleep(WAIT_POLL_S)
        return stuck
