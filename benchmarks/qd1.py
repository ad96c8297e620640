#!/usr/bin/env python3
"""Where a QD1 request's time goes: fio 4k randwrite QD1 against servers, alternating, with
the wake-up counters beside the IOPS.

    .venv/bin/python benchmarks/qd1.py rblock,rblock-nopoll,nbdkit [--repeat 3]
        [--runtime-s 2] [--pin none|same|apart] [--busy] [--job randwrite-4k-qd1]
        [--base-tree DIR]

Servers are started as run.py starts them (run.py's names: rblock, rblock-nopoll, nbdkit,
rblock-c, rblock-c-nopoll, ...; NAME-base with --base-tree). Per run it prints IOPS and
fio's mean latency (`lat`, submission to completion: at QD1 the round trip), and per I/O:

- `CAL`, `RES`: function-call and rescheduling IPIs of the whole machine (/proc/interrupts;
  on Linux a wake-up of a task on another, idle CPU is a function-call IPI);
- `sleeps`, `preempted`: the server process's voluntary and involuntary context switches
  (1 sleep per I/O: it slept in epoll_wait between requests; about 0: it found the next
  request waiting, or polled for it);
- `server us`: the server process's CPU (user + system) per I/O;
- `CPU pressure`: the share of the run's time some task of the machine waited for a CPU
  (PSI "some", /proc/pressure/cpu).

--pin same|apart: fio and the server on one CPU (taskset, CPU 1 both) or on two (fio on 0,
the server on 1); none (default) leaves placement to the scheduler, as run.py does. Pinning
applies to single-process servers only. --busy: a busy loop (`while True: pass`) runs
meanwhile, unpinned: the "loaded" machine; --bursty N: N processes busy 2 ms, asleep 2 ms
in turn (a test suite running beside). Linux only; standard library only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 -- the benchmark's own server and fio helpers

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
IMAGE_BYTES = 256 << 20
PIN_CPUS = {"same": ("1", "1"), "apart": ("0", "1")}  # (fio, server)
# --bursty: what a test suite's processes look like to the scheduler, roughly
BURSTY_LOAD = """
import time
while True:
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    time.sleep(0.002)
"""


def machine_irqs() -> dict[str, int]:
    counts = {}
    for line in Path("/proc/interrupts").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("RES:", "CAL:"):
            counts[fields[0][:-1]] = sum(int(f) for f in fields[1:] if f.isdigit())
    return counts


def cpu_pressure_us() -> int:
    """Microseconds some task waited for a CPU, so far (PSI, /proc/pressure/cpu)."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def process_counters(pid: int) -> dict[str, float]:
    """CPU seconds and context switches of PID, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"cpu": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S, "vol": 0, "invol": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            out["vol"] = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            out["invol"] = int(line.split()[1])
    return out


def one_run(server: str, job: run.Job, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rblock-qd1-") as tmp:
        workdir = Path(tmp)
        replicated = run.kind_of(server) in run.REPLICATED
        image = workdir / ("cluster" if replicated else "image")
        if not replicated:
            run.fresh_image(image, IMAGE_BYTES)
        with run.serving(server, image, workdir / "server.log", IMAGE_BYTES) as running:
            pid = running.process.pid
            fio_args = argparse.Namespace(runtime_s=args.runtime_s, size=IMAGE_BYTES)
            command = [*running.client_prefix, *run.fio_command(job, running.uri, fio_args)]
            if args.pin != "none" and not replicated:
                fio_cpu, server_cpu = PIN_CPUS[args.pin]
                for task in Path(f"/proc/{pid}/task").iterdir():
                    subprocess.run(["taskset", "-pc", server_cpu, task.name],
                                   capture_output=True, check=True)
                command = ["taskset", "-c", fio_cpu, *command]
            before, irqs_before = process_counters(pid), machine_irqs()
            psi_before, start = cpu_pressure_us(), time.monotonic()
            fio_job = run.run_fio(command, args.runtime_s + run.FIO_GRACE_S)
            psi_after, elapsed_s = cpu_pressure_us(), time.monotonic() - start
            after, irqs_after = process_counters(pid), machine_irqs()
    section = fio_job[job.section]
    ios = section["total_ios"]
    return {
        "iops": section["iops"], "lat_us": section["lat_ns"]["mean"] / 1000,
        "CAL": (irqs_after["CAL"] - irqs_before["CAL"]) / ios,
        "RES": (irqs_after["RES"] - irqs_before["RES"]) / ios,
        "sleeps": (after["vol"] - before["vol"]) / ios,
        "preempted": (after["invol"] - before["invol"]) / ios,
        "server_us": (after["cpu"] - before["cpu"]) / ios * 1e6,
        "psi": (psi_after - psi_before) / elapsed_s / 1e6,
    }


def describe(figures: dict[str, float]) -> str:
    return (f"{figures['iops']:8.0f} IOPS  lat {figures['lat_us']:6.1f} us  per I/O: "
            f"CAL {figures['CAL']:.2f} RES {figures['RES']:.2f} sleeps "
            f"{figures['sleeps']:.2f} preempted {figures['preempted']:.2f} server "
            f"{figures['server_us']:.1f} us; CPU pressure {figures['psi']:.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", type=run.parse_subset(
        [*run.SERVERS, *(s + run.BASE_SUFFIX for s in run.SERVERS if s.startswith("rblock"))]))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime-s", type=float, default=2.0)
    parser.add_argument("--job", choices=list(run.JOBS_BY_NAME), default="randwrite-4k-qd1")
    parser.add_argument("--pin", choices=["none", "same", "apart"], default="none")
    parser.add_argument("--busy", action="store_true", help="a busy loop runs meanwhile")
    parser.add_argument("--bursty", type=int, default=0, metavar="N",
                        help="N processes run meanwhile, each busy 2 ms, asleep 2 ms, ...")
    parser.add_argument("--base-tree", type=Path, metavar="DIR")
    args = parser.parse_args()
    run.base_tree = args.base_tree.resolve() if args.base_tree is not None else None
    job = run.JOBS_BY_NAME[args.job]
    results: dict[str, list[dict[str, float]]] = {s: [] for s in args.servers}
    print(f"{args.job}, {args.runtime_s:g} s runs, pin {args.pin}, busy loop "
          f"{'on' if args.busy else 'off'}, {args.bursty} bursty loads, loadavg "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    loads = [subprocess.Popen([sys.executable, "-c", "while True: pass"])] if args.busy else []
    loads += [subprocess.Popen([sys.executable, "-c", BURSTY_LOAD]) for _ in range(args.bursty)]
    try:
        for repetition in range(args.repeat):
            for server in run.server_order(args.servers, repetition):
                figures = one_run(server, job, args)
                results[server].append(figures)
                print(f"rep {repetition + 1} {server:16s} {describe(figures)}", flush=True)
    finally:
        for load in loads:
            load.kill()
            load.wait()
        run.stop_net_hosts()
    print(f"medians of {args.repeat}, loadavg {os.getloadavg()[0]:.2f}:")
    for server, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"  {server:16s} {describe(median)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
