"""What to resync or verify next, and how fast: sans-IO planners driven by the resource.

The sync target walks its dirty bitmap with a `SweepPlanner`: runs of out-of-sync blocks, at
most `run_blocks_max` long, at most `inflight_max` requests outstanding, one pass from a
cursor that wraps once (bits can only be set again by a new connection, which restarts the
sweep). Verify uses the same planner over every block. A `RateLimiter` (token bucket) keeps
the sweep under `rate_bytes_per_s` so guest I/O stays responsive.
"""

from __future__ import annotations

from collections.abc import Callable

RESYNC_RUN_BLOCKS_MAX = 64  # 256 KiB per request with 4 KiB blocks
RESYNC_INFLIGHT_MAX = 8
RATE_BURST_S = 0.1  # the bucket holds this many seconds of traffic


class RateLimiter:
    def __init__(self, rate_bytes_per_s: int):
        assert rate_bytes_per_s > 0
        self.rate_bytes_per_s = rate_bytes_per_s
        self._capacity = max(1, int(rate_bytes_per_s * RATE_BURST_S))
        self._tokens = float(self._capacity)
        self._last_s: float | None = None

    def take(self, now_s: float, nbytes: int) -> float:
        """Charge NBYTES now; returns how many seconds to wait before sending them (0: at
        once). The bytes are charged whether or not the caller has to wait: a request
        that waited was once not charged at all, and a 20 MiB/s limit let 41.5 MiB/s
        through. The bucket may go into debt; the wait is until the debt is paid."""
        if self._last_s is not None:
            self._tokens = min(self._capacity,
                               self._tokens + (now_s - self._last_s) * self.rate_bytes_per_s)
        self._last_s = now_s
        self._tokens -= nbytes
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate_bytes_per_s


class SweepPlanner:
    """One pass over the blocks that `is_pending(first, max_blocks)` reports, in runs."""

    def __init__(self, nblocks: int, next_run: Callable[[int, int], tuple[int, int] | None],
                 run_blocks_max: int = RESYNC_RUN_BLOCKS_MAX,
                 inflight_max: int = RESYNC_INFLIGHT_MAX, wrap: bool = True,
                 ids: Callable[[], int] | None = None):
        self.nblocks = nblocks
        self._next_run = next_run
        self.run_blocks_max = run_blocks_max
        self.inflight_max = inflight_max
        self.cursor = 0
        self.inflight: dict[int, tuple[int, int]] = {}  # request id -> (first, count)
        self._next_id = 1
        # Request ids; the owner's, when answers of an earlier sweep on the same link may
        # still arrive: each id must name one request only.
        self._ids = ids
        self._wrapped = not wrap  # a sweep without wrap ends at the last block

    def next_request(self) -> tuple[int, int, int] | None:
        """(request id, first block, count) to ask for now, or None (bound reached or no
        more runs in this pass)."""
        if len(self.inflight) >= self.inflight_max:
            return None
        run = self._next_run(self.cursor, self.run_blocks_max) if self.cursor < self.nblocks \
            else None
        if run is None and not self._wrapped and not self.inflight:
            # Bits behind the cursor (a retried range): one more pass, once the requests in
            # flight are answered; until then their bits are still set.
            self._wrapped = True
            self.cursor = 0
            run = self._next_run(0, self.run_blocks_max)
        if run is None:
            return None
        first, count = run
        assert 0 <= first < self.nblocks and 0 < count <= self.run_blocks_max
        self.cursor = first + count
        if self._ids is not None:
            rid = self._ids()
        else:
            rid = self._next_id
            self._next_id += 1
        self.inflight[rid] = (first, count)
        return rid, first, count

    def done(self, rid: int) -> tuple[int, int]:
        return self.inflight.pop(rid)

    @property
    def finished(self) -> bool:
        return not self.inflight and self.next_request_would_be_none()

    def next_request_would_be_none(self) -> bool:
        if self.cursor < self.nblocks and self._next_run(self.cursor, 1) is not None:
            return False
        return self._wrapped or self._next_run(0, 1) is None


def all_blocks(nblocks: int) -> Callable[[int, int], tuple[int, int] | None]:
    """A `next_run` over every block (for verify and full syncs)."""
    def next_run(start: int, max_blocks: int) -> tuple[int, int] | None:
        if start >= nblocks:
            return None
        return start, min(max_blocks, nblocks - start)
    return next_run
