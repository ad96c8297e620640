"""`hvctl agent`: one per host. Gathers observations, runs the pure cores, carries out actions.

Theory of operation
-------------------
Every ROUND_INTERVAL_S, and at once when an action of this node ends, one round:

1. Look at this node: the libvirt state of every HA guest, every rblock resource's role and
   disk (its control API). If libvirt cannot be asked (libvirtd restarting), the round stops
   here: a report saying "not running" would make the leader restart a guest that runs.
2. Read everything under the prefix in one range read (a consistent snapshot): reports,
   records, requests, maintenance, frozen marks, rblock's primary and Outdated keys.
3. Publish the report `_ha/nodes/{node}`, bound to this agent's lease (rblock/lease.py),
   if it changed (or is missing).
4. If no leader key exists, take it (put-if-absent, bound to our lease). The leader runs
   `plan` (hvctl/ha/planner.py) and writes the changed records and the decisions in one
   transaction that holds only while the leader key is still ours under our lease: a
   deposed leader's late write does nothing.
5. `local_plan` (hvctl/ha/local.py) on the records: start, stop, destroy, release a disk
   or acknowledge, each a tracked task; its end is reported in the next round. The leader
   also keeps etcd's Raft leadership on the witness (`_witness_leads`).

Self-fencing: the lease (renewed every `keepalive_interval_s`, TTL/5) is given up
`fence_margin_s` before it can run out in etcd (1 s with the default TTL of 5 s) if it was
not renewed; the agent then SIGKILLs the QEMU of every HA guest on this host at once, found
in /proc (no round, no etcd, no libvirtd needed), and lets libvirt clean up. The lease runs
out at the earliest TTL after the last renewal was *sent*, so the guest is gone before
another node can see the lease gone. Where a watchdog exists (hvctl/ha/watchdog.py), it is
petted while the lease is valid or no HA guest runs here: a hung agent resets the host.

A clean stop (SIGTERM) leaves the guests running: it writes `_ha/frozen/{node}` and revokes
the lease, so the leader freezes this node's guests instead of recovering them. Starting
again removes the mark, and the guests running here are adopted (no restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import libvirt

from hvctl.config import GuestConfig, HvConfig
from hvctl.controller import Controller, HvError
from hvctl.domain import parse_xml
from hvctl.ha import keys as K
from hvctl.ha.local import Action, Do, local_plan
from hvctl.ha.model import GuestSpec, HaMode, NodeReport, Record, ResourceObs
from hvctl.ha.planner import plan
from hvctl.ha.watchdog import PET_INTERVAL_S, Watchdog, device_for
from hvctl.virt import VirtError, kill_local_qemu
from rblock.config import ConfigError
from rblock.control_client import ControlError
from rblock.etcd import (
    Etcd,
    EtcdError,
    EtcdUnavailable,
    cmp_absent,
    cmp_lease,
    cmp_value,
    op_delete,
    op_put,
)
from rblock.lease import LeaseKeeper

log = logging.getLogger("hvctl.agent")

ROUND_INTERVAL_S = 0.25  # a round reads etcd once; it writes only what changed
ETCD_CALL_TIMEOUT_S = 1.0
ACTION_TIMEOUT_S = 180.0  # a start or an ACPI stop that takes longer is a failure
STOP_ACTIONS_WAIT_S = 5.0  # a clean stop lets running actions end this long
WITNESS_CHECK_S = 10.0  # how often the leader makes sure a witness leads etcd's Raft


def fence_margin_s(ttl_s: int) -> float:
    """How long before the lease can run out the guests are killed: time for the SIGKILL
    and libvirt's clean-up (0.1-0.2 s seen) with room to spare; the other side needs more
    than that after the lease is gone (a leader round, a promotion, a domain start)."""
    return max(1.0, 0.2 * ttl_s)


def keepalive_interval_s(ttl_s: int) -> float:
    """Renewals every fifth of the TTL: an etcd leader election (1-2 s with the default
    election timeout) fits between the last renewal and the self-fence."""
    return ttl_s / 5


class AgentError(Exception):
    """The agent cannot start; the message names the thing and the fix."""


def guest_spec(cfg: HvConfig, g: GuestConfig) -> GuestSpec:
    return GuestSpec(g.name, g.disks, HaMode(g.ha), tuple(cfg.nodes_for(g)), g.prefer,
                     g.max_restart, g.max_relocate)


def ha_guests(cfg: HvConfig) -> dict[str, GuestConfig]:
    return {n: g for n, g in cfg.guests.items() if g.ha != "disabled"}


def etcd_client(cfg: HvConfig) -> Etcd:
    e = cfg.cluster.etcd
    if e is None:
        raise AgentError(f"{cfg.path}: no [cluster] etcd: HA needs the etcd cluster that "
                         'arbitrates; add [cluster] etcd = ["http://HOST:2379", ...]')
    return Etcd(list(e.endpoints), ca=str(e.ca) if e.ca else None,
                cert=str(e.cert) if e.cert else None, key=str(e.key) if e.key else None,
                timeout_s=min(ETCD_CALL_TIMEOUT_S, e.lease_ttl_s / 4))


class Agent:
    def __init__(self, cfg: HvConfig, node: str) -> None:
        if node not in cfg.cluster.nodes:
            raise AgentError(f"node '{node}' is not in {cfg.path} (nodes: "
                             f"{', '.join(cfg.cluster.nodes)}); pass --node with one of them")
        try:
            cfg.hv_node(node)
        except ConfigError as e:
            raise AgentError(str(e)) from None
        self.cfg = cfg
        self.node = node
        self.etcd = etcd_client(cfg)
        assert cfg.cluster.etcd is not None
        self.ttl_s = cfg.cluster.etcd.lease_ttl_s
        self.keys = K.HaKeys(cfg.cluster.etcd.prefix)
        self.guests = ha_guests(cfg)
        self.specs = {n: guest_spec(cfg, g) for n, g in self.guests.items()}
        self.ctl = Controller(cfg)
        self.virt = self.ctl.virt(node)
        self.keeper: LeaseKeeper | None = None
        self.done: dict[str, int] = {}
        self.failed: dict[str, tuple[int, str]] = {}
        self.records: dict[str, Record] = {}
        self.active: frozenset[str] = frozenset()
        self.lost_since: dict[str, float] = {}
        self.leader = False
        self._tasks: dict[str, asyncio.Task] = {}
        self._fence_task: asyncio.Task | None = None
        self._raft_task: asyncio.Task | None = None
        self._raft_checked = 0.0
        self._published: tuple[int, NodeReport] | None = None
        self.watchdog: Watchdog | None = None
        self._pet_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._said: dict[str, str] = {}  # what was logged last per topic (no repeats)

    # --- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """The lease first: etcd unreachable at start is an error, not a silent wait."""
        self.keeper = LeaseKeeper(self.etcd, self.ttl_s, self._on_lease,
                                  margin_s=fence_margin_s(self.ttl_s), what="agent lease",
                                  interval_s=keepalive_interval_s(self.ttl_s))
        await self.keeper.start()
        if not self.keeper.lease:
            await self.keeper.close(revoke=False)
            await self.etcd.close()
            eps = ", ".join(self.etcd.endpoints)
            raise AgentError(f"etcd unreachable at {eps} ({self.keeper.last_error}); start "
                             f"etcd or fix [cluster] etcd in {self.cfg.path}")
        path = device_for(self.cfg.watchdog)
        if path is not None:
            try:
                self.watchdog = Watchdog(path, int(self.ttl_s - fence_margin_s(self.ttl_s)))
            except OSError as e:
                await self.keeper.close(revoke=True)
                await self.etcd.close()
                raise AgentError(f"cannot open the watchdog {path}: {e.strerror}; fix its "
                                 "permissions or set [hvctl] watchdog = \"off\"") from None
            self._pet_task = asyncio.get_running_loop().create_task(self._pet())
        log.info("%s: agent up, lease %x (TTL %d s, self-fence %.1f s before it runs out); "
                 "HA guests: %s", self.node, self.keeper.lease, self.ttl_s,
                 fence_margin_s(self.ttl_s), ", ".join(self.guests) or "none")

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            while not stop.is_set():
                try:
                    await self.round()
                except (EtcdUnavailable, EtcdError) as e:
                    self._say("etcd", f"etcd: {e}", logging.WARNING)
                except Exception:  # noqa: BLE001 -- a bug in one round must not stop HA
                    log.exception("%s: round failed", self.node)
                self._wake.clear()
                stopping = asyncio.ensure_future(stop.wait())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({stopping, woken}, timeout=ROUND_INTERVAL_S,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    woken.cancel()
        finally:
            await self.close()

    async def close(self) -> None:
        """A clean stop: guests left running, this node frozen, the lease revoked."""
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_ACTIONS_WAIT_S)
            for t in pending:
                t.cancel()
        if self._pet_task is not None:
            self._pet_task.cancel()
        if self.watchdog is not None:
            self.watchdog.close()
        if self.keeper is not None:
            if self.keeper.lease_valid():
                try:
                    await self.etcd.put(self.keys.frozen(self.node),
                                        json.dumps({"time": round(time.time(), 3)}))
                except (EtcdUnavailable, EtcdError) as e:
                    log.warning("%s: could not mark the node frozen (%s): its guests will "
                                "be seen as lost", self.node, e)
            await self.keeper.close(revoke=True)
        await self.etcd.close()
        self.ctl.close()
        log.info("%s: agent stopped; guests left running", self.node)

    def _say(self, topic: str, text: str, level: int = logging.INFO) -> None:
        if self._said.get(topic) != text:
            self._said[topic] = text
            log.log(level, "%s: %s", self.node, text)

    async def _pet(self) -> None:
        """The watchdog is petted while the lease is valid or no HA guest is active here."""
        assert self.watchdog is not None and self.keeper is not None
        while True:
            if self.keeper.lease_valid() or not self.active:
                self.watchdog.pet()
            await asyncio.sleep(PET_INTERVAL_S)

    # --- self-fencing -------------------------------------------------------------------------

    def _on_lease(self, valid: bool) -> None:
        if valid:
            log.info("%s: agent lease valid", self.node)
            return
        log.error("%s: agent lease not renewed in time: self-fencing (destroying the HA "
                  "guests here)", self.node)
        if self._fence_task is None or self._fence_task.done():
            self._fence_task = asyncio.get_running_loop().create_task(self._self_fence())
            self._fence_task.add_done_callback(self._fence_ended)

    async def _self_fence(self) -> None:
        """SIGKILL first, straight from /proc (libvirtd may be the thing that hangs), then
        let libvirt clean up."""
        for name, g in sorted(self.guests.items()):
            pids = kill_local_qemu(g.uuid)
            if pids:
                log.error("%s: %s killed (self-fence; QEMU %s SIGKILLed)", self.node, name,
                          ", ".join(map(str, pids)))
            try:
                dom = self.virt.lookup(name)
                if dom is not None and self.virt.state(dom) != "stopped":
                    await self.virt.destroy(dom)  # its QEMU is gone: only the clean-up
            except VirtError as e:
                log.error("%s: libvirt could not clean up %s after the self-fence: %s",
                          self.node, name, e)
        self.active = frozenset()
        self._wake.set()

    def _fence_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: self-fence failed", self.node, exc_info=task.exception())

    # --- one round ----------------------------------------------------------------------------

    async def round(self) -> None:
        keeper = self.keeper
        assert keeper is not None
        seen = self._look()
        if seen is None:
            return
        guests, self.active = seen
        resources = await self._resources()
        report = NodeReport(self.node, guests, resources, dict(self.done), dict(self.failed))
        lease = keeper.lease
        if not keeper.lease_valid() or not lease:
            self._say("lease", "no valid lease: waiting (nothing is started or stopped)")
            return
        self._say("lease", "lease valid")
        snap = K.parse(self.keys, await self.etcd.get(self.keys.base, prefix=True))
        if self._published != (lease, report) or self.node not in snap.reports:
            # Written when it changes only: the key lives as long as the lease does.
            await self.etcd.put(self.keys.node(self.node),
                                K.dump_report(report, time.time()), lease)
            self._published = (lease, report)
            snap.reports[self.node] = report
            snap.report_leases[self.node] = lease
        if self.node in snap.frozen:
            await self.etcd.delete(self.keys.frozen(self.node))
            snap.frozen.discard(self.node)
        for b in snap.bad:
            self._say(f"bad:{b}", f"etcd key not understood: {b}", logging.WARNING)
        await self._lead(snap, lease)
        self.records = {g: r for g, r in snap.records.items() if g in self.guests}
        if not keeper.lease_valid():
            return
        busy = frozenset(g for g, t in self._tasks.items() if not t.done())
        acts = local_plan(self.node, self.records, self.active, self.done,
                          {g: s for g, (s, _) in self.failed.items()}, busy,
                          keeper.lease_valid(), False, time.time(),
                          {n: g.disks for n, g in self.guests.items()},
                          frozenset(r for r, o in resources.items() if o.role == "Primary"))
        for a in acts:
            self._begin(a)

    def _look(self) -> tuple[dict[str, str], frozenset[str]] | None:
        guests: dict[str, str] = {}
        try:
            for name in self.guests:
                dom = self.virt.lookup(name)
                if dom is None:
                    continue
                if not parse_xml(dom.XMLDesc(0)).managed:
                    self._say(f"foreign:{name}", f"a domain named {name} that hvctl does not "
                              "manage is here; HA ignores it", logging.WARNING)
                    continue
                guests[name] = self.virt.state(dom)
        except (VirtError, libvirt.libvirtError) as e:  # libvirtd restarting
            self._say("libvirt", f"cannot ask libvirt ({e}); nothing is reported or done "
                      "until it answers", logging.WARNING)
            return None
        self._say("libvirt", "libvirt answers")
        active = frozenset(g for g, s in guests.items() if s not in ("stopped", "undefined"))
        return guests, active

    async def _resources(self) -> dict[str, ResourceObs]:
        try:
            st = await self.ctl.control(self.node).status()
        except ControlError as e:
            self._say("rblock", f"rblock not reachable: {e}", logging.WARNING)
            return {}
        self._say("rblock", "rblock answers")
        return {r["name"]: ResourceObs(r["role"], r["disk"]) for r in st["resources"]}

    # --- leading ------------------------------------------------------------------------------

    async def _lead(self, snap: K.Snapshot, lease: int) -> None:
        lk = self.keys.leader
        if snap.leader is None:
            r = await self.etcd.txn([cmp_absent(lk)], [op_put(lk, self.node, lease)], [])
            if not r.succeeded:
                return
            snap.leader, snap.leader_lease = self.node, lease
        was = self.leader
        self.leader = snap.leader == self.node and snap.leader_lease == lease
        if self.leader != was:
            log.info("%s: %s", self.node, "leader now" if self.leader else
                     f"not the leader ({snap.leader} is)")
        if not self.leader:
            return
        now = time.time()
        if now - self._raft_checked >= WITNESS_CHECK_S and (
                self._raft_task is None or self._raft_task.done()):
            self._raft_checked = now
            self._raft_task = asyncio.get_running_loop().create_task(self._witness_leads())
            self._raft_task.add_done_callback(self._raft_ended)
        for n in self.cfg.hv_nodes():
            if n in snap.reports:
                self.lost_since.pop(n, None)
            else:
                self.lost_since.setdefault(n, now)
        records = {g: r for g, r in snap.records.items() if g in self.specs}
        p = plan(snap.observed(now, self.lost_since), self.specs, snap.requests, records)
        ops = [op_put(self.keys.record(g), K.dump_record(r)) for g, r in p.changed.items()]
        ops += [op_delete(self.keys.record(g)) for g in p.removed]
        ops += [op_delete(self.keys.record(g)) for g in snap.records if g not in self.specs]
        for i, d in enumerate(p.decisions):
            ops.append(op_put(self.keys.log(now, i), K.dump_decision(d)))
            log.info("%s: decision: %s: %s", self.node, d.guest, d.text)
        extra = len(snap.log) + len(p.decisions) - K.LOG_KEEP
        ops += [op_delete(k) for k, _ in snap.log[:max(0, extra)]]
        if not ops:
            snap.records.update(p.records)
            return
        r = await self.etcd.txn([cmp_value(lk, self.node), cmp_lease(lk, lease)], ops, [])
        if r.succeeded:
            snap.records.update(p.records)
        else:
            self.leader = False
            log.warning("%s: lost the leadership before writing a plan: dropped", self.node)

    async def _witness_leads(self) -> None:
        """etcd's Raft leader on a witness, not on a data host. When a Raft leader dies,
        the new one extends every lease (etcd's lessor does, so no lease runs out early),
        so a data host's death would be detected an election (1-3 s) later. A member whose
        name is not a node of the cluster file is taken for a witness."""
        members = await self.etcd.members()
        witnesses = [m for m in members if m.get("name") not in self.cfg.cluster.nodes]
        if not witnesses:
            return
        leader = await self.etcd.raft_leader()
        if not leader or leader in {str(m["ID"]) for m in witnesses}:
            return
        current = next((m for m in members if str(m["ID"]) == leader), None)
        if current is None:
            return
        target = witnesses[0]
        await self.etcd.move_leader(str(target["ID"]), list(current.get("clientURLs", [])))
        log.info("%s: etcd's Raft leadership moved from %s to the witness %s (a data host's "
                 "death then needs no election, which would extend every lease)", self.node,
                 current.get("name"), target.get("name"))

    def _raft_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._say("raft", f"could not move etcd's Raft leader to a witness: "
                      f"{task.exception()}", logging.WARNING)

    # --- actions ------------------------------------------------------------------------------

    def _begin(self, a: Action) -> None:
        task = asyncio.get_running_loop().create_task(self._act(a))
        self._tasks[f"release:{a.guest}" if a.do is Do.RELEASE else a.guest] = task
        task.add_done_callback(lambda t, a=a: self._ended(a, t))

    def _ended(self, a: Action, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and a.do is Do.RELEASE:
            log.warning("%s: %s stays Primary for now: %s", self.node, a.guest, exc)
        elif exc is not None:
            why = str(exc) if isinstance(exc, (HvError, VirtError, ControlError)) else \
                f"internal error: {exc!r}"
            log.error("%s: %s %s failed: %s", self.node, a.do.value, a.guest, why)
            if a.seq:
                self.failed[a.guest] = (a.seq, why)
        elif a.seq:
            self.done[a.guest] = a.seq
        self._wake.set()

    async def _act(self, a: Action) -> None:
        if a.do is Do.ACK:
            return
        if a.do is Do.RELEASE:
            log.info("%s: %s Secondary (%s)", self.node, a.guest, a.why)
            await self.ctl.release_here(self.node, a.guest)
            return
        g = self.guests[a.guest]
        log.info("%s: %s %s (%s)", self.node, a.do.value, a.guest, a.why)
        if a.do is Do.START:
            await asyncio.wait_for(self.ctl.start_here(g, self.node), ACTION_TIMEOUT_S)
            log.info("%s: %s started", self.node, a.guest)
        else:
            how = await asyncio.wait_for(self.ctl.stop_here(g, self.node, a.do is Do.DESTROY),
                                         ACTION_TIMEOUT_S)
            log.info("%s: %s %s", self.node, a.guest, how)
