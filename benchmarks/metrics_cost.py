#!/usr/bin/env python3
"""What keeping the NBD request counters (rblock/nbd/stats.py) costs per request, in process
and without sockets, so that the difference is not lost in fio's noise:

    .venv/bin/python benchmarks/metrics_cost.py                          # recording alone
    .venv/bin/python benchmarks/metrics_cost.py --server --base-tree DIR # the server's path

Recording alone: the server's way (per reply a few attribute operations; per received batch
one clock read and one `OpStats.add`) against reading the clock and bucketing every request,
and against prometheus_client's own Counter and Histogram (which the server does not use).

--server: 4 KiB WRITE requests, in batches of 16 as fio's QD16 sends them, fed to the real
`rblock.nbd.server.Connection` (a null device, a transport that drops the replies, uvloop),
run in a fresh interpreter for this tree and, with --base-tree, for DIR (a checkout without
the counters, say `git worktree add DIR COMMIT`), alternating; the figure is the best run of
each, in ns per request: the whole Python path of a page-cache write, less the syscalls.
See benchmarks/README.md, "Metrics".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NS_PER_S = 1e9
WRITE_BYTES = 4096
BATCH_REQUESTS = 16


# --- recording alone ----------------------------------------------------------------------


class Req:
    __slots__ = ("arrived_ns", "length")

    def __init__(self, arrived_ns: int) -> None:
        self.arrived_ns = arrived_ns
        self.length = WRITE_BYTES


class Runs:
    """The server's state for counting a pass's replies (Connection._run_*)."""

    def __init__(self, op: object) -> None:
        self.op, self.arrived_ns, self.replies = op, -1, 0


def recording(requests: int, repeat: int) -> int:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from rblock.nbd.stats import LATENCY_BOUNDS_NS, RequestStats, bucket_of, now_ns

    batch_ns = now_ns()
    reqs = [Req(batch_ns + i // BATCH_REQUESTS) for i in range(requests)]  # 16 per arrival

    def nothing() -> None:
        for _req in reqs:
            pass

    def per_batch() -> None:  # Connection._write_done and _count_replies
        w = RequestStats().ops[1]
        run = Runs(w)
        for i, req in enumerate(reqs):
            w.ok_bytes += req.length
            if req.arrived_ns == run.arrived_ns and w is run.op:
                run.replies += 1
            else:
                run.op, run.arrived_ns, run.replies = w, req.arrived_ns, 1
            if i % BATCH_REQUESTS == BATCH_REQUESTS - 1:  # the pass's replies go out
                run.op.add(now_ns() - run.arrived_ns, run.replies)
                run.replies, run.arrived_ns = 0, -1

    def per_request() -> None:  # what the first version did: a clock read per reply
        w = RequestStats().ops[1]
        for req in reqs:
            dt = now_ns() - req.arrived_ns
            w.buckets[bucket_of(LATENCY_BOUNDS_NS, dt)] += 1
            w.sum_ns += dt
            w.ok_bytes += req.length

    def prometheus_client_metrics() -> None:
        registry = CollectorRegistry()
        labels = ["resource", "node"]
        writes = Counter("w", "", labels, registry=registry).labels("r0", "alpha")
        nbytes = Counter("b", "", labels, registry=registry).labels("r0", "alpha")
        seconds = Histogram("s", "", [*labels, "type"], registry=registry,
                            buckets=[b / NS_PER_S for b in LATENCY_BOUNDS_NS]
                            ).labels("r0", "alpha", "write")
        for req in reqs:  # children looked up once, as a careful server would
            seconds.observe((now_ns() - req.arrived_ns) / NS_PER_S)
            writes.inc()
            nbytes.inc(req.length)

    variants = (nothing, per_batch, per_request, prometheus_client_metrics)
    best: dict[str, float] = {}
    for _ in range(repeat):
        for variant in variants:  # alternated, so drift hits every variant alike
            t0 = time.perf_counter_ns()
            variant()
            ns = (time.perf_counter_ns() - t0) / requests
            best[variant.__name__] = min(best.get(variant.__name__, ns), ns)
    print(f"recording one 4 KiB write, best of {repeat} x {requests} (the bare loop's "
          f"{best['nothing']:.0f} ns subtracted):")
    for variant in variants[1:]:
        print(f"  {variant.__name__:26s} {best[variant.__name__] - best['nothing']:6.0f} ns")
    return 0


# --- the server's path --------------------------------------------------------------------


def server_child(requests: int, repeat: int) -> int:
    """Run in a fresh interpreter whose rblock is the tree to measure; prints ns/request."""
    import asyncio
    import struct

    import uvloop

    from rblock.nbd.handshake import Negotiated
    from rblock.nbd.server import Connection, Export, ExportCatalog, NBDServer
    from rblock.store.device import BlockDevice, Capabilities

    class Null(BlockDevice):
        size_bytes = 1 << 30
        capabilities = Capabilities()

        async def read(self, offset: int, length: int) -> bytes:
            return bytes(length)

        async def write(self, offset: int, data: memoryview, fua: bool) -> None:
            return None

        async def flush(self) -> None:
            return None

        async def trim(self, offset: int, length: int, fua: bool) -> None:
            return None

        async def write_zeroes(self, *args: object) -> None:
            return None

    class Sink(asyncio.Transport):
        def write(self, data: object) -> None:
            pass

        def writelines(self, bufs: object) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def run() -> float:
        catalog = ExportCatalog()
        export = Export("bench", Null())
        catalog.add(export)
        conn = Connection(NBDServer(catalog), 1)
        conn.connection_made(Sink())
        conn._enter_transmission(Negotiated(export.info(), False, None, False))
        batch = memoryview(b"".join(
            struct.pack(">IHHQQI", 0x25609513, 0, 1, i, i * WRITE_BYTES, WRITE_BYTES)
            + b"x" * WRITE_BYTES for i in range(BATCH_REQUESTS)))
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for _ in range(requests // BATCH_REQUESTS):
                pos = 0
                while pos < len(batch):  # as the transport would: into the arena
                    buf = conn.get_buffer(-1)
                    n = min(len(buf), len(batch) - pos)
                    buf[:n] = batch[pos:pos + n]
                    conn.buffer_updated(n)
                    pos += n
                await asyncio.sleep(0)  # end of the pass: the replies go out
            best = min(best, (time.perf_counter_ns() - t0) / requests)
        return best

    print(f"{uvloop.run(run()):.1f}")
    return 0


def server(trees: dict[str, Path], requests: int, repeat: int, rounds: int) -> int:
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, tree in trees.items():
            done = subprocess.run(
                [sys.executable, __file__, "--server-child", "--requests", str(requests),
                 "--repeat", str(repeat)], capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
            best[name] = min(best.get(name, float("inf")), float(done.stdout))
    print(f"4 KiB WRITEs through rblock.nbd.server.Connection, batches of {BATCH_REQUESTS}, "
          f"best of {rounds} x {repeat} x {requests} requests:")
    for name, tree in trees.items():
        print(f"  {name:6s} {best[name]:7.1f} ns per request  ({tree})")
    if "base" in best:
        extra = best["this"] - best["base"]
        print(f"  the counters: {extra:+.0f} ns per request ({extra / best['base']:+.1%})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="store_true", help="measure the server's path")
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="with --server: also measure this checkout's server")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=9, help="runs per interpreter")
    parser.add_argument("--rounds", type=int, default=8,
                        help="with --server: interpreters per tree, alternating")
    parser.add_argument("--server-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server_child:
        return server_child(args.requests, args.repeat)
    if args.server:
        trees = {"this": REPO_ROOT}
        if args.base_tree is not None:
            trees["base"] = args.base_tree.resolve()
        return server(trees, args.requests, args.repeat, args.rounds)
    sys.path.insert(0, str(REPO_ROOT))
    return recording(args.requests * 4, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
