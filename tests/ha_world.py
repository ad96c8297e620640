"""A simulated HA cluster for the planner (hvctl/ha/planner.py) and the agents' local rules
(hvctl/ha/local.py): the same pure cores the real agents run, against simulated etcd
leases, libvirt and rblock, one tick (one second) at a time, seeded and deterministic.

What is simulated, per node: power, its agent (up/down, its lease), a network cut (from etcd
and from the other node), its rblock node (a lease, each resource's role and disk state) and
its libvirt (the guests running there). etcd holds the agents' leases and reports, the
leader key, the records, the rblock primary keys (bound to the rblock leases) and the
Outdated marks. rblock's rules, simplified: promotion needs the primary key (absent or ours)
and an UpToDate disk not marked Outdated, and no connected peer that is Primary; a Primary
that runs a guest while its peer is away marks the peer Outdated (it needs its key); peers
that are connected again resync (Outdated cleared) in one tick.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from hvctl.ha.local import Do, local_plan
from hvctl.ha.model import (
    GuestSpec,
    HaMode,
    NodeReport,
    Observed,
    Record,
    Request,
    ResourceObs,
    State,
)
from hvctl.ha.planner import plan

TTL_TICKS = 5  # lease_ttl_s = 5
MARGIN_TICKS = 2  # an agent self-fences when its lease was not renewed for TTL - MARGIN
NODES = ("alpha", "beta")
GUESTS = {"vm1": ("r0",), "vm2": ("r1",)}


@dataclass
class SimNode:
    name: str
    power: bool = True
    agent: bool = True
    cut: bool = False
    agent_renewed: int = 0  # tick of the agent's last keepalive that etcd saw
    agent_lease: bool = True  # etcd's view
    rblock_renewed: int = 0
    rblock_lease: bool = True
    roles: dict[str, str] = field(default_factory=lambda: {"r0": "Secondary",
                                                           "r1": "Secondary"})
    disks: dict[str, str] = field(default_factory=lambda: {"r0": "UpToDate",
                                                           "r1": "UpToDate"})
    running: set[str] = field(default_factory=set)
    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, tuple[int, str]] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)  # the agent's last read


class World:
    def __init__(self, seed: int, max_restart: int = 2, max_relocate: int = 1):
        self.rng = random.Random(seed)
        self.tick = 0
        self.nodes = {n: SimNode(n) for n in NODES}
        self.specs = {g: GuestSpec(g, d, HaMode.STARTED, NODES, prefer=("alpha",),
                                   max_restart=max_restart, max_relocate=max_relocate)
                      for g, d in GUESTS.items()}
        self.requests: dict[str, Request] = {}
        self.records: dict[str, Record] = {}
        self.reports: dict[str, NodeReport] = {}
        self.primary: dict[str, str] = {}
        self.outdated: dict[str, set[str]] = {"r0": set(), "r1": set()}
        self.frozen: set[str] = set()
        self.maintenance: set[str] = set()
        self.leader: str | None = None
        self.lost_since: dict[str, float] = {}
        self.decisions: list = []
        self.starts: dict[str, int] = {g: 0 for g in GUESTS}
        self.violations: list[str] = []
        self.broken: set[tuple[str, str]] = set()  # (node, guest) whose start fails

    # --- reachability -------------------------------------------------------------------------

    def reaches_etcd(self, n: SimNode) -> bool:
        return n.power and not n.cut

    def connected(self, a: SimNode, b: SimNode) -> bool:
        return a.power and b.power and not a.cut and not b.cut

    def peer(self, n: SimNode) -> SimNode:
        return next(o for o in self.nodes.values() if o is not n)

    # --- rblock -------------------------------------------------------------------------------

    def promote(self, n: SimNode, r: str) -> str:
        if not n.rblock_lease or not self.reaches_etcd(n):
            return "no etcd lease"
        holder = self.primary.get(r)
        if holder not in (None, n.name):
            return f"primary key held by {holder}"
        if n.name in self.outdated[r] or n.disks[r] != "UpToDate":
            return "outdated"
        p = self.peer(n)
        if self.connected(n, p) and p.roles[r] == "Primary":
            return "peer is Primary"
        self.primary[r] = n.name
        n.roles[r] = "Primary"
        return ""

    def demote(self, n: SimNode, r: str) -> None:
        n.roles[r] = "Secondary"
        if self.primary.get(r) == n.name and self.reaches_etcd(n):
            del self.primary[r]

    def writable(self, n: SimNode, r: str) -> bool:
        if not n.power or n.roles[r] != "Primary":
            return False
        p = self.peer(n)
        if self.connected(n, p) and p.roles[r] != "Primary":
            return True  # replicated: both copies get the write (two Primaries: refused)
        return self.primary.get(r) == n.name and n.rblock_lease and self.reaches_etcd(n)

    # --- one tick -----------------------------------------------------------------------------

    def step(self) -> None:
        self.tick += 1
        t = self.tick
        for n in self.nodes.values():
            if self.reaches_etcd(n):
                n.rblock_renewed = t
                if n.agent:
                    n.agent_renewed = t
            if n.rblock_lease and t - n.rblock_renewed >= TTL_TICKS:
                n.rblock_lease = False
                self.primary = {r: h for r, h in self.primary.items() if h != n.name}
            elif not n.rblock_lease and self.reaches_etcd(n):
                n.rblock_lease = True
            if n.agent_lease and t - n.agent_renewed >= TTL_TICKS:
                n.agent_lease = False
                self.reports.pop(n.name, None)
                if self.leader == n.name:
                    self.leader = None
            elif not n.agent_lease and n.agent and self.reaches_etcd(n):
                n.agent_lease = True
        self.rblock_links()
        for n in self.nodes.values():
            if n.agent and n.power:
                self.run_agent(n)
        self.elect()
        if self.leader is not None:
            self.run_leader()
        self.check()

    def rblock_links(self) -> None:
        a, b = self.nodes["alpha"], self.nodes["beta"]
        for r in ("r0", "r1"):
            for n in (a, b):
                p = self.peer(n)
                if n.power and n.roles[r] == "Primary" and not self.connected(n, p) and \
                        self.writable(n, r) and any(r in GUESTS[g] for g in n.running):
                    self.outdated[r].add(p.name)  # writes the peer misses
                    if p.power:
                        p.disks[r] = "Outdated"
            if self.connected(a, b):
                prim = [n for n in (a, b) if n.roles[r] == "Primary"]
                if len(prim) == 2:
                    # rblock refuses to connect two Primaries: they stay apart until one is
                    # demoted (a copy left by a dead agent, destroyed as a stray when its
                    # agent is back; it could not write: no key)
                    continue
                for n in (a, b):
                    if n.disks[r] != "UpToDate" and (prim and n not in prim or
                                                     not prim and
                                                     self.peer(n).disks[r] == "UpToDate"):
                        n.disks[r] = "UpToDate"
                if prim and self.reaches_etcd(prim[0]):
                    self.outdated[r].discard(self.peer(prim[0]).name)
                elif not prim and all(n.disks[r] == "UpToDate" for n in (a, b)):
                    self.outdated[r].clear()

    def run_agent(self, n: SimNode) -> None:
        t = self.tick
        reach = self.reaches_etcd(n)
        fence_due = t - n.agent_renewed >= TTL_TICKS - MARGIN_TICKS
        lease_valid = n.agent_lease and reach and not fence_due
        if reach:
            n.records = dict(self.records)
        acts = local_plan(n.name, n.records, frozenset(n.running), n.done,
                          {g: s for g, (s, _) in n.failed.items()}, frozenset(),
                          lease_valid, fence_due, float(t), GUESTS,
                          frozenset(r for r, role in n.roles.items() if role == "Primary"))
        for a in acts:
            g, disks = a.guest, GUESTS.get(a.guest, ())
            if a.do is Do.START:
                why = "libvirt: broken" if (n.name, g) in self.broken else ""
                for r in disks if not why else ():
                    why = self.promote(n, r)
                    if why:
                        break
                if why:
                    for r in disks:
                        if n.roles[r] == "Primary":
                            self.demote(n, r)
                    n.failed[g] = (a.seq, why)
                else:
                    n.running.add(g)
                    self.starts[g] += 1
                    n.done[g] = a.seq
            elif a.do is Do.RELEASE:
                self.demote(n, a.guest)
            elif a.do in (Do.STOP, Do.DESTROY):
                n.running.discard(g)
                for r in disks:
                    self.demote(n, r)
                if a.seq:
                    n.done[g] = a.seq
            else:
                n.done[g] = a.seq
        if reach and n.agent_lease:
            self.reports[n.name] = NodeReport(
                n.name, {g: "running" for g in n.running},
                {r: ResourceObs(n.roles[r], n.disks[r]) for r in n.roles},
                dict(n.done), dict(n.failed))

    def elect(self) -> None:
        if self.leader is None:
            for name, n in self.nodes.items():
                if n.agent and n.agent_lease and self.reaches_etcd(n):
                    self.leader = name
                    break
        elif not self.reaches_etcd(self.nodes[self.leader]):
            pass  # a cut leader keeps the key until its lease runs out, but cannot write

    def run_leader(self) -> None:
        if not self.reaches_etcd(self.nodes[self.leader]):
            return
        for name in self.nodes:
            if name not in self.reports:
                self.lost_since.setdefault(name, float(self.tick))
            else:
                self.lost_since.pop(name, None)
        obs = Observed(float(self.tick), dict(self.reports), frozenset(self.frozen),
                       frozenset(self.maintenance), dict(self.primary),
                       {r: frozenset(s) for r, s in self.outdated.items()},
                       dict(self.lost_since))
        p = plan(obs, self.specs, self.requests, self.records)
        self.records = p.records
        self.decisions += p.decisions

    def check(self) -> None:
        for g, disks in GUESTS.items():
            leased = [n.name for n in self.nodes.values()
                      if g in n.running and n.power and n.agent_lease]
            if len(leased) > 1:
                self.violations.append(f"tick {self.tick}: {g} runs on {leased}, each with "
                                       "a lease")
            writers = [n.name for n in self.nodes.values()
                       if g in n.running and all(self.writable(n, r) for r in disks)]
            if len(writers) > 1:
                self.violations.append(f"tick {self.tick}: {g} writable on {writers}")

    # --- faults -------------------------------------------------------------------------------

    def power_off(self, name: str) -> None:
        n = self.nodes[name]
        n.power = False
        n.running.clear()
        n.roles = {r: "Secondary" for r in n.roles}
        n.done.clear()
        n.failed.clear()

    def power_on(self, name: str) -> None:
        self.nodes[name].power = True

    def agent_kill(self, name: str) -> None:
        n = self.nodes[name]
        n.agent = False
        n.done.clear()
        n.failed.clear()

    def agent_stop(self, name: str) -> None:
        """A clean stop: frozen, lease revoked at once."""
        n = self.nodes[name]
        if not self.reaches_etcd(n):
            return self.agent_kill(name)
        self.frozen.add(name)
        n.agent = False
        n.agent_lease = False
        self.reports.pop(name, None)
        if self.leader == name:
            self.leader = None
        n.done.clear()
        n.failed.clear()

    def agent_start(self, name: str) -> None:
        n = self.nodes[name]
        n.agent = True
        if self.reaches_etcd(n):
            self.frozen.discard(name)

    def random_fault(self) -> str:
        name = self.rng.choice(NODES)
        n = self.nodes[name]
        choice = self.rng.randrange(10)
        if choice == 0:
            self.power_off(name) if n.power else self.power_on(name)
            return f"power {'off' if not n.power else 'on'} {name}"
        if choice == 1:
            n.cut = not n.cut
            return f"{'cut' if n.cut else 'heal'} {name}"
        if choice == 2:
            self.agent_kill(name) if n.agent else self.agent_start(name)
            return f"agent {'killed' if not n.agent else 'started'} on {name}"
        if choice == 3:
            self.agent_stop(name) if n.agent else self.agent_start(name)
            return f"agent {'stopped' if not n.agent else 'started'} on {name}"
        if choice == 4:
            self.maintenance ^= {name}
            return f"maintenance {'on' if name in self.maintenance else 'off'} {name}"
        if choice == 5:
            g = self.rng.choice(sorted(GUESTS))
            seq = self.requests.get(g, Request(HaMode.STARTED)).seq + 1
            state = self.rng.choice([HaMode.STARTED, HaMode.STOPPED])
            node = self.rng.choice([None, *NODES]) if state is HaMode.STARTED else None
            self.requests[g] = Request(state, node, seq)
            return f"request {g} {state.value} {node}"
        return "nothing"

    def heal_all(self) -> None:
        """Failures stop: power on, links up, agents up, no maintenance, guests wanted."""
        for name, n in self.nodes.items():
            n.power = True
            n.cut = False
            if not n.agent:
                self.agent_start(name)
        self.maintenance.clear()
        for g in GUESTS:
            req = self.requests.get(g, Request(HaMode.STARTED))
            rec = self.records.get(g)
            if req.state is not HaMode.STARTED or (rec is not None and
                                                   rec.state is State.ERROR):
                # an operator's `hvctl guest start` (ERROR waits for one)
                self.requests[g] = replace(req, state=HaMode.STARTED, node=None,
                                           seq=req.seq + 1)

    def running_on(self, g: str) -> list[str]:
        return [n.name for n in self.nodes.values() if g in n.running]
