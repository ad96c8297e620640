"""One sample of the cluster for every open page: the overview (rblock status of each node,
libvirt, one HA snapshot) is computed once per interval while anyone watches, and shared by
every server-sent-events stream and every GET in that interval. Ten open pages then cost
the nodes and etcd what one does.

    s = Sampler(compute, interval_s=1.0)
    o = await s.get()            # the newest sample, computed if older than the interval
    q = s.subscribe()            # a queue that receives each new sample (the newest only)
    s.unsubscribe(q); await s.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("hvctl.web")


class Sampler:
    def __init__(self, compute: Callable[[], Awaitable[dict[str, Any]]],
                 interval_s: float, on_error: Callable[[Exception], str]) -> None:
        self._compute = compute
        self.interval_s = interval_s
        self._on_error = on_error  # the one-line message of an error, for the streams
        self._last: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None

    async def get(self, max_age_s: float | None = None) -> dict[str, Any]:
        """The newest sample not older than MAX_AGE_S (default: the interval); raises what
        computing it raised."""
        max_age = self.interval_s if max_age_s is None else max_age_s
        async with self._lock:  # concurrent callers wait for one computation
            if self._last is not None and time.monotonic() - self._last[0] < max_age:
                return self._last[1]
            sample = await self._compute()
            self._last = (time.monotonic(), sample)
            return sample

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(1)
        self._subscribers.add(q)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    async def _run(self) -> None:
        while self._subscribers:
            started = time.monotonic()
            try:
                sample = await self.get(max_age_s=self.interval_s / 2)
            except Exception as e:  # noqa: BLE001 -- say it on the streams, keep going
                sample = {"error": self._on_error(e)}
            for q in self._subscribers:
                if q.full():  # a slow stream gets the newest, not a backlog
                    q.get_nowait()
                q.put_nowait(sample)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def close(self) -> None:
        self._subscribers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
