"""One etcd lease kept alive: rblock's node lease (rblock/fencer.py) and each HA agent's
(hvctl/ha/agent.py).

Granted with TTL_S, renewed every INTERVAL_S (default a third of it), and after a failed renewal retried every
RETRY_INTERVAL_S until it answers. This process's own deadline runs from the *send* time of
its last successful keepalive plus the TTL etcd answered: etcd started its count when the
request arrived, later, so this side always believes the lease gone before etcd deletes it
(and a new Raft leader only extends leases).

ON_CHANGE(False) is called MARGIN_S before that deadline passes unrenewed (0 for rblock: its
resources stop writing at the deadline; an HA agent destroys its guests with a margin, so
they are gone before another node may start them), and ON_CHANGE(True) when a lease is valid
again. A keepalive answered with TTL 0 means etcd already forgot the lease (and deleted the
keys bound to it): ON_CHANGE(False), and a new lease is granted at once.

A clean stop revokes the lease: the keys bound to it go at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rblock.etcd import Etcd, EtcdError, EtcdUnavailable

log = logging.getLogger("rblock.lease")

RETRY_INTERVAL_S = 0.5  # after a failed keepalive (the call itself times out first)


class LeaseKeeper:
    def __init__(self, etcd: Etcd, ttl_s: int, on_change: Callable[[bool], None],
                 margin_s: float = 0.0, what: str = "etcd lease",
                 interval_s: float | None = None) -> None:
        self.etcd = etcd
        self.ttl_s = ttl_s
        self.interval_s = interval_s if interval_s is not None else ttl_s / 3
        self.margin_s = margin_s
        self.what = what
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self.lease = 0
        self.deadline = 0.0  # loop time
        self.valid = False
        self.last_error = ""
        self._expiry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Ask for the lease once (so a caller finds it at once), then keep it alive in the
        background; etcd unreachable is logged, not raised."""
        await self._grant_once()
        self._task = self._loop.create_task(self._keep_alive())
        self._task.add_done_callback(self._ended)

    async def _grant_once(self) -> None:
        sent = self._loop.time()
        try:
            lid, ttl = await self.etcd.lease_grant(self.ttl_s)
        except (EtcdUnavailable, EtcdError) as e:
            self.last_error = str(e)
            log.warning("%s: etcd: %s", self.what, e)
            return
        self.lease = lid
        log.info("%s %x granted (TTL %d s)", self.what, lid, ttl)
        self._renewed(sent, ttl)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s keeper failed", self.what, exc_info=task.exception())

    async def _keep_alive(self) -> None:
        interval = self.interval_s
        await asyncio.sleep(interval)
        while True:
            sent = self._loop.time()
            ok = False
            try:
                if not self.lease:
                    await self._grant_once()
                    ok = bool(self.lease)
                else:
                    ttl = await self.etcd.lease_keepalive(self.lease)
                    if ttl <= 0:
                        log.warning("%s %x expired in etcd: a new one", self.what, self.lease)
                        self.forget()
                        continue
                    self._renewed(sent, ttl)
                    ok = True
            except (EtcdUnavailable, EtcdError) as e:
                if str(e) != self.last_error:
                    log.warning("%s: etcd: %s", self.what, e)
                self.last_error = str(e)
            except Exception as e:  # noqa: BLE001 -- a bug must not end the lease for good
                log.error("%s keeper: %s", self.what, e, exc_info=True)
                self.last_error = f"internal error: {e}"
            wait = interval if ok else RETRY_INTERVAL_S
            await asyncio.sleep(max(0.0, sent + wait - self._loop.time()))

    def _renewed(self, sent: float, ttl: int) -> None:
        self.last_error = ""
        self.deadline = sent + ttl
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_at(self.deadline - self.margin_s, self._expired)
        if not self.valid:
            self.valid = True
            self._tell(True)

    def _expired(self) -> None:
        self._expiry = None
        log.error("%s %x not renewed for %.1f s: %s", self.what, self.lease,
                  self.ttl_s - self.margin_s,
                  "given up" if not self.margin_s else f"it runs out in {self.margin_s:g} s")
        self._lost()

    def forget(self) -> None:
        """etcd no longer knows the lease: lost now, and a new one is granted next."""
        self.lease = 0
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
            self._on_change(valid)
        except Exception:  # noqa: BLE001 -- the keeper must go on whatever a listener does
            log.exception("%s: a listener failed on hearing it is %s", self.what,
                          "granted" if valid else "lost")

    def lease_valid(self) -> bool:
        return self.valid and self._loop.time() < self.deadline - self.margin_s

    def left_s(self) -> float:
        return self.deadline - self._loop.time()

    async def close(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        if self.lease and revoke:
            try:
                await self.etcd.lease_revoke(self.lease)
                log.info("%s %x revoked", self.what, self.lease)
            except (EtcdUnavailable, EtcdError) as e:
                log.warning("%s %x not revoked (%s): it expires in %d s", self.what,
                            self.lease, e, self.ttl_s)
