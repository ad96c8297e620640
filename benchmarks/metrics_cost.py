#!/usr/bin/env python3
"""What keeping the NBD request counters costs per request, in process (no sockets): the
plain-int recording the server does (rblock/nbd/stats.py, inlined in
`Connection._write_done`) against prometheus_client's own Counter and Histogram, which the
server does not use.

    .venv/bin/python benchmarks/metrics_cost.py [--requests N] [--repeat N]

Each variant records N writes; the figure is the best of the repetitions, in ns per request,
with the cost of the loop itself (variant "nothing") subtracted. See benchmarks/README.md,
"Metrics".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402

from rblock.nbd.stats import (  # noqa: E402
    LATENCY_BOUNDS_NS,
    RequestStats,
    bucket_of,
    now_ns,
)

NS_PER_S = 1e9
WRITE_BYTES = 4096


class Req:
    __slots__ = ("arrived_ns", "length")

    def __init__(self) -> None:
        self.arrived_ns = now_ns()
        self.length = WRITE_BYTES


def nothing(reqs: list[Req]) -> None:
    for _req in reqs:
        pass


def plain_ints(reqs: list[Req]) -> None:
    w = RequestStats().ops[1]
    for req in reqs:  # the same lines as Connection._write_done
        dt = now_ns() - req.arrived_ns
        w.buckets[bucket_of(LATENCY_BOUNDS_NS, dt)] += 1
        w.sum_ns += dt
        w.ok_bytes += req.length


def clock_only(reqs: list[Req]) -> None:
    for req in reqs:
        _dt = now_ns() - req.arrived_ns


def prometheus_client_metrics(reqs: list[Req]) -> None:
    registry = CollectorRegistry()
    writes = Counter("w", "", ["resource", "node"], registry=registry).labels("r0", "alpha")
    nbytes = Counter("b", "", ["resource", "node"], registry=registry).labels("r0", "alpha")
    seconds = Histogram("s", "", ["resource", "node", "type"], registry=registry,
                        buckets=[b / NS_PER_S for b in LATENCY_BOUNDS_NS]
                        ).labels("r0", "alpha", "write")
    for req in reqs:  # children looked up once, as a careful server would
        seconds.observe((now_ns() - req.arrived_ns) / NS_PER_S)
        writes.inc()
        nbytes.inc(req.length)


VARIANTS = (nothing, clock_only, plain_ints, prometheus_client_metrics)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    reqs = [Req() for _ in range(args.requests)]
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for variant in VARIANTS:  # alternated, so drift hits every variant alike
            t0 = time.perf_counter_ns()
            variant(reqs)
            ns = (time.perf_counter_ns() - t0) / args.requests
            best[variant.__name__] = min(best.get(variant.__name__, ns), ns)
    base = best["nothing"]
    print(f"per request, best of {args.repeat} x {args.requests} (loop cost {base:.0f} ns "
          f"subtracted):")
    for variant in VARIANTS[1:]:
        print(f"  {variant.__name__:26s} {best[variant.__name__] - base:6.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
