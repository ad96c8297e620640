"""What one export's NBD requests did: counts, bytes and a latency histogram per command, as
plain ints that the server's hot path adds to. rblock/metrics.py turns them into Prometheus
metrics when someone scrapes (`GET /metrics` of the control API); nothing here knows of
Prometheus.

Why plain ints and not prometheus_client's Counter/Histogram: each of their `inc()` takes a
lock, and `observe()` walks the buckets in Python and takes two; the event loop is the only
writer here, so no lock is needed. And the clock is not read per request: the requests of one
received batch share its arrival time (one clock read), and the replies of one loop pass
leave together (one `writelines`, rblock/aio.py's SendCoalescer), so the server counts the
replies of a pass per batch they came in (a few attribute operations per request) and, when
the pass's replies go out, reads the clock once and adds each batch's count to the bucket of
its latency (`OpStats.add`). benchmarks/README.md, "Metrics", has the costs measured.

Latency is "request to reply" as the server sees it: from the loop pass that found the whole
request (header and any payload) in its receive buffer to the moment its reply is handed to
the socket, at the end of the pass that answered it. A request that waited in the receive
buffer while the connection was paused (in-flight limit) is timed from its resume.

Every request that gets a reply is counted once, in the histogram of its command, whether it
succeeded or not (`errors` counts the failed ones: refused by the protocol checks or failed
by the device); `ok_bytes` is the length of those that succeeded (a READ's or WRITE's payload;
the range of a TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS). NBD_CMD_DISC has no reply and is
not counted. A request that completes after its connection was lost is counted all the same
(its reply has nowhere to go).
"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter_ns

# Upper bounds (inclusive, Prometheus' `le`) of the latency buckets, in ns; one more bucket
# holds everything slower (+Inf). 1-2.5-5 steps from 5 us (a page-cache write on an idle
# loop) to 10 s (I/O suspended waiting for etcd).
LATENCY_BOUNDS_NS = (
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000,
    250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
)
assert list(LATENCY_BOUNDS_NS) == sorted(set(LATENCY_BOUNDS_NS))

# The `type` label of each NBD command number (doc/proto.md numbering: READ 0 ... BLOCK_STATUS
# 7), then OTHER for a command number the protocol does not know (refused with EINVAL).
REQUEST_TYPES = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes",
                 "block_status", "other")
OTHER = len(REQUEST_TYPES) - 1

now_ns = perf_counter_ns  # the clock of `arrived_ns` and of the replies
bucket_of = bisect_left  # bucket_of(LATENCY_BOUNDS_NS, ns): first bound >= ns, len() if none


class OpStats:
    """One command's figures on one export."""

    __slots__ = ("buckets", "sum_ns", "errors", "ok_bytes")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)  # not cumulative; last: +Inf
        self.sum_ns = 0
        self.errors = 0
        self.ok_bytes = 0

    @property
    def count(self) -> int:
        """Requests answered (the histogram's count)."""
        return sum(self.buckets)

    def add(self, latency_ns: int, count: int) -> None:
        """COUNT requests answered, each after LATENCY_NS."""
        self.buckets[bucket_of(LATENCY_BOUNDS_NS, latency_ns)] += count
        self.sum_ns += latency_ns * count

    def record(self, arrived_ns: int, nbytes: int, failed: bool) -> None:
        """One request answered now, timed at once (the server's rare paths: a refused
        request, a reply after the connection was lost)."""
        self.add(now_ns() - arrived_ns, 1)
        if failed:
            self.errors += 1
        else:
            self.ok_bytes += nbytes


class RequestStats:
    """Every command's OpStats for one export, shared by all of its connections (and kept
    when they close: the counters only grow, as Prometheus counters must)."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops = tuple(OpStats() for _ in REQUEST_TYPES)

    def op(self, cmd: int) -> OpStats:
        """The figures of command number CMD (OTHER's for an unknown one)."""
        return self.ops[cmd if 0 <= cmd < OTHER else OTHER]
