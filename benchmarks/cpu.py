#!/usr/bin/env python3
"""Where the CPU goes: one fio job against one server, with each process's CPU per I/O.

    .venv/bin/python benchmarks/cpu.py rblock-c randwrite-4k-qd16 [--runtime-s 8] [--size 256M]
    .venv/bin/python benchmarks/cpu.py rblock-base randwrite-4k-qd16 --base-tree /tmp/base

Starts the server the way `run.py` does (for rblock-c/rblock-a: both nodes, alpha Primary,
sync done), runs the fio job, and prints, per server process (both nodes of a cluster), user
and system CPU microseconds per I/O from /proc/PID/stat, voluntary context switches per I/O
(how often the process slept in epoll: a low figure means large batches), the share of the
time it was busy; then fio's own CPU per I/O and the machine's idle and softirq shares from
/proc/stat. The figures in benchmarks/README.md ("Where the replicated write's time goes")
come from it. With --base-tree DIR, a server named NAME-base runs from that checkout (as in
run.py). Linux only; standard library only.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 -- the benchmark's own server and fio helpers

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
US_PER_S = 1_000_000


def process_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of PID so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS_PER_S, int(fields[12]) / CLOCK_TICKS_PER_S


def voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def machine_ticks() -> tuple[int, int, int]:
    """(idle + iowait, softirq + irq, total) jiffies of all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], values[5] + values[6], sum(values)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains TEXT (the nodes of one cluster: its directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_text().replace("\0", " "):
                    pids.append(int(entry.name))
            except OSError:
                continue  # it exited meanwhile
    return sorted(pids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server", choices=[*run.SERVERS,
                                           *(s + run.BASE_SUFFIX for s in run.SERVERS
                                             if s.startswith("rblock"))])
    parser.add_argument("job", choices=[job.name for job in run.JOBS])
    parser.add_argument("--runtime-s", type=float, default=8)
    parser.add_argument("--size", type=run.parse_size, default=run.parse_size("256M"))
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="the checkout a NAME-base server runs from")
    args = parser.parse_args()
    if args.server.endswith(run.BASE_SUFFIX) and args.base_tree is None:
        parser.error(f"{args.server} runs from --base-tree DIR; give one")
    run.base_tree = args.base_tree.resolve() if args.base_tree is not None else None
    replicated = run.kind_of(args.server) in run.REPLICATED
    job = run.JOBS_BY_NAME[args.job]
    with tempfile.TemporaryDirectory(prefix="rblock-cpu-") as tmp:
        workdir = Path(tmp)
        target = workdir / "cluster" if replicated else workdir / "image"
        if not replicated:
            run.fresh_image(target, args.size)
        with run.serving(args.server, target, workdir / "server.log", args.size) as server:
            pids = ([server.process.pid] if not replicated
                    else processes_mentioning(str(target)))
            if job.needs_prefill:
                run.run_fio([*server.client_prefix, *run.prefill_command(server.uri, args.size)],
                            run.FIO_GRACE_S)
            fio_args = argparse.Namespace(runtime_s=args.runtime_s, size=args.size)
            cpu_before = {pid: process_cpu_s(pid) for pid in pids}
            switches_before = {pid: voluntary_switches(pid) for pid in pids}
            ticks_before, start_s = machine_ticks(), time.monotonic()
            fio_job = run.run_fio([*server.client_prefix,
                                   *run.fio_command(job, server.uri, fio_args)],
                                  args.runtime_s + run.FIO_GRACE_S)
            elapsed_s, ticks_after = time.monotonic() - start_s, machine_ticks()
            cpu_after = {pid: process_cpu_s(pid) for pid in pids}
            switches_after = {pid: voluntary_switches(pid) for pid in pids}
    section = fio_job[job.section]
    ios = section["total_ios"]
    print(f"{args.server} {args.job}: {section['iops']:.0f} IOPS, {ios} I/Os in "
          f"{elapsed_s:.1f} s")
    for pid in pids:
        user_s = cpu_after[pid][0] - cpu_before[pid][0]
        system_s = cpu_after[pid][1] - cpu_before[pid][1]
        print(f"  pid {pid:<7} user {user_s * US_PER_S / ios:6.1f} us  system "
              f"{system_s * US_PER_S / ios:6.1f} us per I/O; busy "
              f"{(user_s + system_s) / elapsed_s:4.0%}; "
              f"{(switches_after[pid] - switches_before[pid]) / ios:.3f} sleeps per I/O")
    fio_s = (fio_job["usr_cpu"] + fio_job["sys_cpu"]) / 100 * elapsed_s
    print(f"  fio         {fio_s * US_PER_S / ios:6.1f} us per I/O (user "
          f"{fio_job['usr_cpu']:.0f}%, system {fio_job['sys_cpu']:.0f}%)")
    total = ticks_after[2] - ticks_before[2]
    print(f"  machine     idle {(ticks_after[0] - ticks_before[0]) / total:.0%}, irq+softirq "
          f"{(ticks_after[1] - ticks_before[1]) / total:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
