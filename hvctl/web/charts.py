"""The Storage page's charts: per resource and node, write IOPS, mean write latency and
resync rate over the last minutes, from the counters each node keeps (its `GET /metrics`,
read through rblock.control_client.summarize_metrics). Pure: the web's sampler feeds it one
scrape per node per tick.

Counters only grow, so a point is the difference between two scrapes over the time between
them; a counter that went down (the node restarted) starts its series again instead of
drawing a negative rate.

    c = Charts(window_s=600)
    c.add(t, "alpha", summarize_metrics(text))    # each tick, each node that answered
    c.series()   # {"r0@alpha": {"t": [...], "write_iops": [...], "write_latency_ms": [...],
                 #               "sync_bytes_per_s": [...]}}
    c.latest()   # the newest point of each series (what the live stream carries)
"""

from __future__ import annotations

from collections import deque
from typing import Any

WINDOW_S_DEFAULT = 600.0
FIELDS = ("write_iops", "write_latency_ms", "sync_bytes_per_s")
# the counters a point is made of, from summarize_metrics' resource figures
COUNTERS = ("writes", "write_seconds_sum", "write_seconds_count", "resync_sent_bytes")


class Charts:
    def __init__(self, window_s: float = WINDOW_S_DEFAULT) -> None:
        self.window_s = window_s
        self._last: dict[str, tuple[float, dict[str, float]]] = {}  # key -> (t, counters)
        self._points: dict[str, deque[tuple[float, dict[str, float]]]] = {}

    def add(self, t: float, node: str, summary: dict[str, Any]) -> None:
        """One scrape of NODE at time T (seconds)."""
        for resource, figures in summary.get("resources", {}).items():
            key = f"{resource}@{node}"
            now = {c: float(figures.get(c, 0.0)) for c in COUNTERS}
            prev = self._last.get(key)
            self._last[key] = (t, now)
            if prev is None or t <= prev[0]:
                continue
            dt = t - prev[0]
            d = {c: now[c] - prev[1][c] for c in COUNTERS}
            if any(v < 0 for v in d.values()):  # the node restarted: its counters too
                continue
            lat = (d["write_seconds_sum"] / d["write_seconds_count"] * 1000.0
                   if d["write_seconds_count"] else None)
            point = {"write_iops": round(d["writes"] / dt, 1),
                     "write_latency_ms": round(lat, 3) if lat is not None else None,
                     "sync_bytes_per_s": round(d["resync_sent_bytes"] / dt)}
            q = self._points.setdefault(key, deque())
            q.append((t, point))
            while q and q[0][0] < t - self.window_s:
                q.popleft()

    def series(self) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for key, q in sorted(self._points.items()):
            s: dict[str, list] = {"t": [round(t, 3) for t, _ in q]}
            for f in FIELDS:
                s[f] = [p[f] for _, p in q]
            out[key] = s
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        return {key: {"t": round(q[-1][0], 3), **q[-1][1]}
                for key, q in sorted(self._points.items()) if q}
