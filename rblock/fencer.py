"""A node's etcd side of fencing: one lease for the node, kept alive, and the fencing
transactions of its resources run under it (the rules: rblock/replica/fencing.py; the
transactions: rblock/replica/fence_txn.py).

The lease. Granted with the cluster's `lease_ttl_s`, renewed every third of it. This node's
own deadline runs from the *send* time of its last successful keepalive plus the TTL etcd
answered: etcd started its count when the request arrived, later, so the node always
believes its lease gone before etcd deletes it (and a new Raft leader only extends leases).
When the deadline passes unrenewed, every resource hears `lease_changed(False)` (rule
lease-lost); when a lease is granted again, `lease_changed(True)`. A keepalive answered with
TTL 0 means etcd already forgot the lease (and deleted the keys bound to it): the resources
hear it is lost, and a new lease is granted at once.

A clean stop revokes the lease: the keys bound to it go at once, so the peer may be promoted
without waiting out the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from rblock.config import EtcdConfig
from rblock.etcd import Etcd, EtcdError, EtcdUnavailable
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
        self.lease = 0
        self.deadline = 0.0  # loop time
        self.valid = False
        self.last_error = ""
        self._expiry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # --- the lease -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Ask for the lease once (so a promotion right after `rblock up` finds it), then
        keep it alive in the background; etcd unreachable does not stop the node."""
        try:
            sent = self._loop.time()
            lid, ttl = await self.etcd.lease_grant(self.cfg.lease_ttl_s)
            self.lease = lid
            log.info("etcd lease %x granted (TTL %d s)", lid, ttl)
            self._renewed(sent, ttl)
        except (EtcdUnavailable, EtcdError) as e:
            self.last_error = str(e)
            log.warning("etcd: %s; fenced resources cannot be promoted until it answers", e)
        self._task = self._loop.create_task(self._keep_alive())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd lease keeper failed", exc_info=task.exception())

    async def _keep_alive(self) -> None:
        interval = self.cfg.lease_ttl_s / 3
        await asyncio.sleep(interval)
        while True:
            sent = self._loop.time()
            try:
                if not self.lease:
                    lid, ttl = await self.etcd.lease_grant(self.cfg.lease_ttl_s)
                    self.lease = lid
                    log.info("etcd lease %x granted (TTL %d s)", lid, ttl)
                    self._renewed(sent, ttl)
                else:
                    ttl = await self.etcd.lease_keepalive(self.lease)
                    if ttl <= 0:
                        log.warning("etcd lease %x expired in etcd: a new one", self.lease)
                        self.lease = 0
                        self._lost()
                        continue
                    self._renewed(sent, ttl)
            except (EtcdUnavailable, EtcdError) as e:
                if str(e) != self.last_error:
                    log.warning("etcd: %s", e)
                self.last_error = str(e)
            except Exception as e:  # noqa: BLE001 -- a bug must not end the lease for good
                log.error("etcd lease keeper: %s", e, exc_info=True)
                self.last_error = f"internal error: {e}"
            await asyncio.sleep(max(0.0, sent + interval - self._loop.time()))

    def _renewed(self, sent: float, ttl: int) -> None:
        self.last_error = ""
        self.deadline = sent + ttl
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_at(self.deadline, self._expired)
        if not self.valid:
            self.valid = True
            self._tell(True)

    def _expired(self) -> None:
        self._expiry = None
        log.error("etcd lease %x ran out (not renewed since %.1f s ago)", self.lease,
                  self.cfg.lease_ttl_s)
        self._lost()

    def _lost(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.valid:
            self.valid = False
            self._tell(False)

    def _tell(self, valid: bool) -> None:
        try:
            self._on_lease(valid)
        except Exception:  # noqa: BLE001 -- one resource's bug must not stop the others'
            log.exception("a resource failed on hearing its lease is %s",
                          "granted" if valid else "lost")

    def lease_valid(self) -> bool:
        return self.valid and self._loop.time() < self.deadline

    async def close(self) -> None:
        """A clean stop: revoke the lease (its keys go at once)."""
        if self._task is not None:
            self._task.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        if self.lease:
            try:
                await self.etcd.lease_revoke(self.lease)
                log.info("etcd lease %x revoked", self.lease)
            except (EtcdUnavailable, EtcdError) as e:
                log.warning("etcd lease %x not revoked (%s): it expires in %d s", self.lease,
                            e, self.cfg.lease_ttl_s)
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
                self.lease = 0
                self._lost()
            return Answer(Ev.UNREACHABLE, reason=str(e))


