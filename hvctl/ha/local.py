"""What one node's agent does with the HA guests of its node: `local_plan(...)`. Pure.

Theory of operation
-------------------
The leader's records (hvctl/ha/planner.py) say, per guest, which node should do what
(`node`, `want`, `seq`). Each agent reads them and acts only for its own node, by these
rules, first match per guest:

- self-fence: the agent's lease was not renewed in time (its keeper says so `margin_s`
  before the lease can run out in etcd): every HA guest active here is destroyed at once,
  whatever the records say, so that by the time another node may start it, this copy is
  gone. Nothing else is done while the lease is not valid (the records may be stale).
- stray: active here but the record places it on another node: destroyed (it cannot be
  the real one: the record moved only after this node stopped it or was fenced).
- run: the record says RUN here, not yet done: start it (promote its disks, define, start)
  unless it is already active (an agent restart adopts the guest: no restart), and not
  before `not_before` (the backoff after a failure).
- stop: the record says STOP here, not yet done: stop it (ACPI, then destroy), disks
  Secondary; also when it is not active (its disks may still be Primary).
- keep: the record says KEEP: only acknowledge (report what is seen).
An assignment is done once per `seq`; a guest with an action in flight is left alone.
Then, per resource:
- release: a disk of an HA guest is Primary here but no HA guest using it is active, busy
  or assigned RUN here (a self-fence left it Primary, a guest powered off by itself):
  make it Secondary, so the node where the guest runs now can resync it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hvctl.ha.model import Record, Want


class Do(enum.Enum):
    RELEASE = "release"  # the resource Secondary here
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"  # at once, no ACPI; then disks Secondary
    ACK = "ack"  # nothing to do: report the seq done


@dataclass(frozen=True)
class Action:
    do: Do
    guest: str  # RELEASE: the resource
    seq: int
    why: str


def local_plan(node: str, records: Mapping[str, Record], active: frozenset[str],
               done: Mapping[str, int], failed: Mapping[str, int], busy: frozenset[str],
               lease_valid: bool, fence_due: bool, now: float,
               disks: Mapping[str, tuple[str, ...]] | None = None,
               primary_here: frozenset[str] = frozenset()) -> list[Action]:
    """ACTIVE: HA guests active on this node; DONE/FAILED: guest -> seq carried out/failed
    here; BUSY: guests with an action in flight (or releasing a disk); DISKS: HA guest ->
    its resources; PRIMARY_HERE: resources Primary on this node."""
    out: list[Action] = []
    if fence_due:
        for g in sorted(active & set(records)):
            out.append(Action(Do.DESTROY, g, 0, "self-fence: the agent's lease was not "
                              "renewed in time"))
        return out
    if not lease_valid:
        return out
    for g in sorted(records):
        rec = records[g]
        if g in busy:
            continue
        if rec.node != node:
            if g in active:
                out.append(Action(Do.DESTROY, g, 0, f"stray copy: HA places it on "
                                  f"{rec.node}"))
            continue
        if done.get(g, 0) >= rec.seq or failed.get(g, 0) >= rec.seq:
            continue
        if rec.want is Want.KEEP:
            out.append(Action(Do.ACK, g, rec.seq, "keep"))
        elif rec.want is Want.RUN:
            if g in active:
                out.append(Action(Do.ACK, g, rec.seq, "already running here"))
            elif now >= rec.not_before:
                out.append(Action(Do.START, g, rec.seq, rec.reason))
        else:
            out.append(Action(Do.STOP, g, rec.seq, rec.reason))
    acting = {a.guest for a in out}
    for r in sorted(primary_here):
        users = [g for g, d in (disks or {}).items() if r in d]
        if not users or f"release:{r}" in busy:
            continue
        needed = [g for g in users if g in active or g in busy or g in acting or
                  (g in records and records[g].node == node and records[g].want is Want.RUN)]
        if not needed:
            out.append(Action(Do.RELEASE, r, 0, f"{r} Primary here, but no HA guest of it "
                              "runs or is to run here"))
    return out
