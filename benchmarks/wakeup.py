#!/usr/bin/env python3
"""The wake-up mechanisms alone: a Python client sends a 4 KiB + 28 byte request over
loopback TCP and waits for a 16 byte answer; a forked Python server receives with MODE and
answers. Round trips per second per mode, alternating.

    python3 benchmarks/wakeup.py blocking,epoll,spin,busypoll [--repeat 3] [--seconds 2]
        [--server-cpu N] [--client-cpu N] [--spin-us 50] [--work-us 0]

Modes: `blocking` (recv in a blocking socket: a connection's own thread, as nbdkit does),
`epoll` (epoll_wait, then recv: what an event loop does), `spin` (non-blocking recv in a
loop for up to --spin-us, then epoll), `busypoll` (blocking recv with SO_BUSY_POLL set to
--spin-us: the kernel polls the device queue before sleeping). --server-cpu/--client-cpu
pin either side (sched_setaffinity); --work-us makes the server busy that long per request
(as a server's own work would). See benchmarks/README.md, "QD1: where the idle wake-up goes".
Linux only; standard library only.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import time

REQUEST_BYTES = 4096 + 28
ANSWER_BYTES = 16
SO_BUSY_POLL = getattr(socket, "SO_BUSY_POLL", 46)
MODES = ("blocking", "epoll", "spin", "busypoll")


def serve(ready_fd: int, mode: str, spin_us: int, work_us: float, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    os.write(ready_fd, f"{listener.getsockname()[1]}\n".encode())
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    answer = b"a" * ANSWER_BYTES
    if mode == "busypoll":
        conn.setsockopt(socket.SOL_SOCKET, SO_BUSY_POLL, spin_us)
    epoll = None
    if mode in ("epoll", "spin"):
        conn.setblocking(False)
        epoll = select.epoll()
        epoll.register(conn.fileno(), select.EPOLLIN)
    have = 0
    while True:
        n = -1
        if mode == "spin":
            deadline = time.perf_counter() + spin_us / 1e6
            while n < 0:
                try:
                    n = conn.recv_into(view[have:])
                except BlockingIOError:
                    if time.perf_counter() > deadline:
                        break
        if n < 0:
            if epoll is not None:
                epoll.poll()
            n = conn.recv_into(view[have:])
        if n == 0:
            return
        have += n
        while have >= REQUEST_BYTES:
            if work_us:
                until = time.perf_counter() + work_us / 1e6
                while time.perf_counter() < until:
                    pass
            conn.sendall(answer)
            buf[:have - REQUEST_BYTES] = buf[REQUEST_BYTES:have]
            have -= REQUEST_BYTES


def client(port: int, seconds: float, cpu: int | None) -> float:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b"q" * REQUEST_BYTES
    buf = memoryview(bytearray(ANSWER_BYTES))
    count, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        sock.sendall(request)
        got = 0
        while got < ANSWER_BYTES:
            got += sock.recv_into(buf[got:])
        count += 1
    sock.close()
    return count / (time.perf_counter() - start)


def one_run(mode: str, args: argparse.Namespace) -> float:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        try:
            serve(ready_w, mode, args.spin_us, args.work_us, args.server_cpu)
        finally:
            os._exit(0)
    os.close(ready_w)
    port = int(os.read(ready_r, 64).split()[0])
    os.close(ready_r)
    rate = client(port, args.seconds, args.client_cpu)
    os.waitpid(pid, 0)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", help=f"comma-separated: {','.join(MODES)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--spin-us", type=int, default=50)
    parser.add_argument("--work-us", type=float, default=0.0)
    parser.add_argument("--server-cpu", type=int)
    parser.add_argument("--client-cpu", type=int)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"modes: choose from {','.join(MODES)}")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for repetition in range(args.repeat):
        for mode in (modes if repetition % 2 == 0 else modes[::-1]):
            rates[mode].append(one_run(mode, args))
            print(f"rep {repetition + 1} {mode:9s} {rates[mode][-1]:8.0f} round trips/s",
                  flush=True)
    for mode in modes:
        print(f"median {mode:9s} {statistics.median(rates[mode]):8.0f} round trips/s "
              f"({', '.join(f'{r:.0f}' for r in rates[mode])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
