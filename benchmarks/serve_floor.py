#!/usr/bin/env python3
"""The floor of a single-threaded Python NBD server's write path: how fast fio's 4 KiB
random writes can go through Python with nothing but the wire and the disk.

    .venv/bin/python benchmarks/serve_floor.py [--jobs randwrite-4k-qd16,randwrite-4k-qd1]
        [--servers floor,rblock,nbdkit] [--repeat 3] [--runtime-s 3] [--size 256M]

`floor` is this file's own server: rblock's handshake (rblock/nbd/handshake.py), then a
blocking loop: `recv_into` one buffer, every whole request in it parsed with one
`struct.unpack_from`, each WRITE `os.pwrite` to the image, the replies of the batch sent
with one `sendall`. No event loop, no statistics, no device layer, no flow control, no
error handling beyond closing: not a server anyone should run, only the least Python work
per request an NBD server written in Python can do. The others are run.py's servers, run
the same way (alternating, fresh images). Prints IOPS per server and job, medians.
Linux only.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cpu  # noqa: E402 -- per-process CPU figures
import run  # noqa: E402 -- the benchmark's own server and fio helpers

from rblock.nbd import proto as p  # noqa: E402
from rblock.nbd.handshake import Close, ExportInfo, Handshake, Negotiated  # noqa: E402

REQUEST_BYTES = p.REQUEST.size


class OneExport:
    def __init__(self, size_bytes: int):
        self.info = ExportInfo("", size_bytes, p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH)

    def names(self) -> list[str]:
        return [""]

    def lookup(self, name: str) -> ExportInfo:
        return self.info


def serve_one(conn: socket.socket, fd: int, size_bytes: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hs = Handshake(OneExport(size_bytes))
    conn.sendall(hs.greeting())
    rest = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        out, event = hs.feed(data)
        if out:
            conn.sendall(out)
        if isinstance(event, Close):
            return
        if isinstance(event, Negotiated):
            rest = event.rest
            break
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    have = len(rest)
    buf[:have] = rest
    unpack = p.REQUEST.unpack_from
    reply = p.SIMPLE_REPLY.pack
    pwrite = os.pwrite
    while True:
        pos = 0
        replies = []
        while have - pos >= REQUEST_BYTES:
            _magic, _flags, cmd, handle, offset, length = unpack(buf, pos)
            if cmd == p.CMD_WRITE:
                end = pos + REQUEST_BYTES + length
                if end > have:
                    break
                pwrite(fd, view[pos + REQUEST_BYTES:end], offset)
                pos = end
            elif cmd == p.CMD_DISC:
                return
            else:  # FLUSH (nothing to flush in a benchmark on the page cache) and the rest
                pos += REQUEST_BYTES
            replies.append(reply(p.SIMPLE_REPLY_MAGIC, 0, handle))
        if replies:
            conn.sendall(b"".join(replies))
        if pos:
            view[:have - pos] = view[pos:have]
            have -= pos
        n = conn.recv_into(view[have:])
        if n == 0:
            return
        have += n


def floor_server(image: Path, size_bytes: int) -> tuple[int, str]:
    """Fork the floor server on a free port; returns (pid, uri)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        fd = os.open(image, os.O_RDWR)
        try:
            while True:
                conn, _ = listener.accept()
                serve_one(conn, fd, size_bytes)
                conn.close()
        finally:
            os._exit(0)
    listener.close()
    return pid, f"nbd://127.0.0.1:{port}/"


def measure(server: str, job: run.Job, args: argparse.Namespace, workdir: Path) -> float:
    image = workdir / "image"
    run.fresh_image(image, args.size)
    fio_args = argparse.Namespace(runtime_s=args.runtime_s, size=args.size)
    try:
        if server == "floor":
            pid, uri = floor_server(image, args.size)
            try:
                before = cpu.process_cpu_s(pid)
                result = run.run_fio(run.fio_command(job, uri, fio_args),
                                     args.runtime_s + run.FIO_GRACE_S)
                after = cpu.process_cpu_s(pid)
                ios = result[job.section]["total_ios"]
                print(f"  floor server: user {(after[0] - before[0]) * 1e6 / ios:.1f} us, "
                      f"system {(after[1] - before[1]) * 1e6 / ios:.1f} us per I/O")
            finally:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        else:
            with run.serving(server, image, workdir / f"{server}.log", args.size) as running:
                result = run.run_fio([*running.client_prefix,
                                      *run.fio_command(job, running.uri, fio_args)],
                                     args.runtime_s + run.FIO_GRACE_S)
    finally:
        run.remove_image(image)
    return result[job.section]["iops"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="randwrite-4k-qd16,randwrite-4k-qd1")
    parser.add_argument("--servers", default="floor,rblock,nbdkit")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime-s", type=float, default=3)
    parser.add_argument("--size", type=run.parse_size, default=run.parse_size("256M"))
    args = parser.parse_args()
    jobs = [run.JOBS_BY_NAME[name] for name in args.jobs.split(",")]
    servers = args.servers.split(",")
    iops: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="rblock-floor-") as tmp:
        for job in jobs:
            for repetition in range(args.repeat):
                order = servers if repetition % 2 == 0 else servers[::-1]
                for server in order:
                    value = measure(server, job, args, Path(tmp))
                    iops.setdefault((job.name, server), []).append(value)
                    print(f"{job.name} rep {repetition + 1} {server}: {value:,.0f} IOPS",
                          flush=True)
    for job in jobs:
        for server in servers:
            values = iops[(job.name, server)]
            print(f"{job.name:18} {server:8} {statistics.median(values):9,.0f} IOPS "
                  f"(median of {len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
