"""A node's etcd side of fencing: one lease for the node, kept alive (rblock/lease.py), and
the fencing transactions of its resources run under it (the rules: rblock/replica/fencing.py;
the transactions: rblock/replica/fence_txn.py).

When the lease's deadline passes unrenewed, every resource hears `lease_changed(False)` (rule
lease-lost); when a lease is granted again, `lease_changed(True)`. A clean stop revokes the
lease: the keys bound to it go at once, so the peer may be promoted without waiting out the
TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from rblock.config import EtcdConfig
from rblock.etcd import Etcd, EtcdError, EtcdUnavailable
from rblock.lease import LeaseKeeper
from rblock.replica import fence_txn
from rblock.replica.fencing import Answer, Ev, Txn

log = logging.getLogger("rblock.fencer")


class Fencer:
    def __init__(self, cfg: EtcdConfig, node: str,
                 on_lease: Callable[[bool], None]) -> None:
        self.cfg = cfg
        self.node = node
        self._on_lease = on_lease
        ttl = cfg.lease_ttl_s
        self.etcd = Etcd(list(cfg.endpoints), ca=str(cfg.ca) if cfg.ca else None,
                         cert=str(cfg.cert) if cfg.cert else None,
                         key=str(cfg.key) if cfg.key else None,
                         timeout_s=min(1.0, ttl / 4))
        self._loop = asyncio.get_running_loop()
        self.keeper = LeaseKeeper(self.etcd, ttl, on_lease)
        self._tasks: set[asyncio.Task] = set()

    # --- the lease -------------------------------------------------------------------------------

    @property
    def lease(self) -> int:
        return self.keeper.lease

    @property
    def deadline(self) -> float:
        return self.keeper.deadline

    @property
    def last_error(self) -> str:
        return self.keeper.last_error

    def lease_valid(self) -> bool:
        return self.keeper.lease_valid()

    async def start(self) -> None:
        """Ask for the lease once (so a promotion right after `rblock up` finds it), then
        keep it alive in the background; etcd unreachable does not stop the node."""
        await self.keeper.start()
        if not self.keeper.lease:
            log.warning("fenced resources cannot be promoted until etcd answers")

    async def close(self) -> None:
        """A clean stop: revoke the lease (its keys go at once)."""
        for t in list(self._tasks):
            t.cancel()
        await self.keeper.close()
        await self.etcd.close()

    # --- the transactions ------------------------------------------------------------------------

    def run(self, resource: str, peer: str, kind: Txn,
            answer: Callable[[Answer], None]) -> None:
        """Run fencing transaction KIND for RESOURCE; ANSWER(answer) on the loop later."""
        task = self._loop.create_task(self._run(resource, peer, kind))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("%s: fencing %s failed", resource, kind.value, exc_info=exc)
                answer(Answer(Ev.UNREACHABLE, reason=f"internal error: {exc}"))
            else:
                answer(t.result())
        task.add_done_callback(done)

    async def _run(self, resource: str, peer: str, kind: Txn) -> Answer:
        if not self.lease_valid():
            why = self.last_error or "not granted yet"
            return Answer(Ev.UNREACHABLE, reason=f"no etcd lease ({why})")
        keys = fence_txn.Keys(self.cfg.prefix, resource)
        lease = self.lease
        try:
            r = await self.etcd.txn(*fence_txn.build(kind, keys, self.node, peer, lease,
                                                     time.time()))
            left = None
            if kind is Txn.TAKE and not r.succeeded and r.ranges and r.ranges[0]:
                holder = r.ranges[0][0]
                if holder.lease and holder.lease != lease:
                    try:
                        left = await self.etcd.lease_ttl(holder.lease)
                    except (EtcdUnavailable, EtcdError):
                        left = None
            return fence_txn.interpret(kind, keys, self.node, lease, r, left)
        except EtcdUnavailable as e:
            return Answer(Ev.UNREACHABLE, reason=str(e))
        except EtcdError as e:
            if e.code == 5:  # the lease is not found: etcd forgot it before we did
                self.keeper.forget()
            return Answer(Ev.UNREACHABLE, reason=str(e))


