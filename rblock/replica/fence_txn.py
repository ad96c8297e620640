"""The etcd transactions of fencing (rblock/replica/fencing.py), built and read here. Pure:
the shell sends what `build` returns with rblock/etcd.py, the simulator runs it on its
simulated etcd; both hand the answer to `interpret`, so the compare-and-set logic that the
safety of fencing rests on is the same code under both.

Keys, under `{prefix}/{resource}/`:

    primary              value: the node's name; bound to that node's lease
    outdated/{node}      value: JSON {"by": primary, "time": unix time}; no lease
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rblock.etcd import (
    KV,
    TxnResult,
    cmp_absent,
    cmp_lease,
    cmp_value,
    op_delete,
    op_get,
    op_put,
)
from rblock.replica.fencing import Answer, Ev, Txn


@dataclass(frozen=True)
class Keys:
    prefix: str
    resource: str

    @property
    def base(self) -> str:
        return f"{self.prefix.rstrip('/')}/{self.resource}/"

    @property
    def primary(self) -> str:
        return self.base + "primary"

    @property
    def outdated_dir(self) -> str:
        return self.base + "outdated/"

    def outdated(self, node: str) -> str:
        return self.outdated_dir + node


def build(kind: Txn, keys: Keys, node: str, peer: str, lease: int,
          now: float) -> tuple[list[dict], list[dict], list[dict]]:
    """(compare, success, failure) of transaction KIND for NODE holding LEASE."""
    mine = [cmp_value(keys.primary, node), cmp_lease(keys.primary, lease)]
    if kind is Txn.TAKE:
        # one-writer: nobody holds the key (or we do, under this lease: taken again) and
        # this node is not recorded Outdated, in one step.
        return ([cmp_absent(keys.primary), cmp_absent(keys.outdated(node))],
                [op_put(keys.primary, node, lease), op_get(keys.outdated_dir, prefix=True)],
                [op_get(keys.primary), op_get(keys.outdated_dir, prefix=True)])
    if kind is Txn.OUTDATE:
        record = json.dumps({"by": node, "time": round(now, 3)})
        return (mine, [op_put(keys.outdated(peer), record)], [op_get(keys.primary)])
    if kind is Txn.CLEAR:
        return (mine, [op_delete(keys.outdated(peer))], [op_get(keys.primary)])
    if kind is Txn.CLEAR_FREE:
        # The record this node wrote as Primary, deleted once the peer caught up with it
        # (connected, UpToDate) after this node was demoted: only while nobody holds the key.
        return ([cmp_absent(keys.primary)], [op_delete(keys.outdated(peer))],
                [op_get(keys.primary)])
    return (mine, [op_delete(keys.primary)], [op_get(keys.primary)])


def _outdated(keys: Keys, kvs: list[KV]) -> frozenset[str]:
    return frozenset(kv.key[len(keys.outdated_dir):] for kv in kvs)


def interpret(kind: Txn, keys: Keys, node: str, lease: int, r: TxnResult,
              lease_left_s: float | None = None) -> Answer:
    """The Answer for the fencing core. LEASE_LEFT_S: the holder's lease's time to live when
    the key is held by another node (for the refusal's message)."""
    res = keys.resource
    if kind is Txn.TAKE:
        if r.succeeded:
            return Answer(Ev.TAKEN, outdated=_outdated(keys, r.ranges[0]))
        primary, outdated = r.ranges[0], _outdated(keys, r.ranges[1])
        holder = primary[0] if primary else None
        if holder is not None and holder.value == node and holder.lease == lease:
            # Already ours under this lease (a retry whose first answer was lost).
            if node not in outdated:
                return Answer(Ev.TAKEN, outdated=outdated)
        if node in outdated:
            return Answer(Ev.REFUSED, outdated=outdated,
                          holder=holder.value if holder else "",
                          reason=f"{node} is recorded Outdated in etcd for {res}: its disk "
                                 f"misses writes acknowledged while it was away; connect it "
                                 f"to the primary and let the resync finish")
        assert holder is not None
        left = (f", whose lease has {lease_left_s:.0f} s left" if lease_left_s is not None
                and lease_left_s >= 0 else "")
        if holder.value == node:
            why = (f"the primary key of {res} in etcd is held by an earlier run of {node} "
                   f"(lease {holder.lease:x}{left}); promote once it has expired")
        else:
            why = (f"the primary key of {res} in etcd is held by {holder.value}{left} (it "
                   f"is alive, or died less than a lease ago); demote it first, or wait "
                   f"until its lease expires if it is down")
        return Answer(Ev.REFUSED, holder=holder.value, outdated=outdated, reason=why)
    if r.succeeded:
        return Answer({Txn.OUTDATE: Ev.OUTDATED, Txn.CLEAR: Ev.CLEARED,
                       Txn.CLEAR_FREE: Ev.CLEARED, Txn.RELEASE: Ev.RELEASED}[kind])
    primary = r.ranges[0] if r.ranges else []
    holder = primary[0].value if primary else ""
    why = (f"the primary key of {res} is held by {holder}" if holder and holder != node else
           f"the primary key of {res} is no longer held by {node}'s lease")
    return Answer(Ev.NOT_HOLDER, holder=holder, reason=why)
