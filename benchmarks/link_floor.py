#!/usr/bin/env python3
"""The floor under the primary's CPU per replicated write: what sending each 4 KiB write to
a peer over loopback TCP and reading the peer's acks costs the sender, with nothing else.

    .venv/bin/python benchmarks/link_floor.py [--seconds 3] [--repeat 3] [--depth 16]

The sender (this process) keeps DEPTH writes in flight, sends them in groups of
LINK_FLUSH_FRAMES with one `sendmsg` per group (header, payload and CRC buffers, as the
peer link's coalescer hands them to the transport) and reads acks with a blocking `recv`;
a forked receiver reads frames with `recv_into` and answers each group with one ack frame
(as a secondary does, without a disk). Modes:

- `raw`: frames built once, before the clock starts: the kernel's cost (TCP send of 4 KiB,
  on loopback also the receiver's TCP input, which runs in the sender's send call; the
  ack's receive) and the loop's own Python;
- `wire`: each frame encoded with rblock's `wire.encode_fields` (header pack, CRC-32C of
  header and payload) and each ack decoded with `wire.decode`: the least Python work the
  replicated write path can do per write on top of `raw`.

Prints the sender's user and system CPU microseconds per write (getrusage), medians of the
repetitions. Compare with `benchmarks/cpu.py rblock randwrite-4k-qd16` (rblock serve's CPU
per write): the primary's CPU per write cannot be below serve's plus this. Linux only.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rblock.replica import wire  # noqa: E402
from rblock.replica.link import LINK_FLUSH_FRAMES  # noqa: E402
from rblock.replica.wire import T  # noqa: E402

PAYLOAD = b"\xa5" * 4096
FRAME_BYTES = wire.FRAME_OVERHEAD_BYTES + len(PAYLOAD)
ACK_BYTES = wire.FRAME_OVERHEAD_BYTES


def receiver(sock: socket.socket) -> None:
    """Read frames, answer every LINK_FLUSH_FRAMES of them with one ack frame."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    have = 0
    frames = 0
    ack = wire.encode_fields(T.WRITE_ACK, 0, 1, 0, LINK_FLUSH_FRAMES)[0]
    while True:
        n = sock.recv_into(view[have:])
        if n == 0:
            return
        have += n
        whole, have = divmod(have, FRAME_BYTES)
        if have:
            view[:have] = view[whole * FRAME_BYTES:whole * FRAME_BYTES + have]
        frames += whole
        groups, frames = divmod(frames, LINK_FLUSH_FRAMES)
        if groups:
            sock.sendall(ack * groups)


def run(mode: str, seconds: float, depth: int) -> tuple[float, float, int]:
    """(user us, system us) per write in the sender, and the writes done."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    pid = os.fork()
    if pid == 0:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            receiver(conn)
        finally:
            os._exit(0)
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.close()
    prebuilt = wire.encode_fields(T.DATA, 0, 1, 0, 1, PAYLOAD)
    ack_buf = bytearray(64 * 1024)
    ack_view = memoryview(ack_buf)
    pending_ack = 0
    in_flight = 0
    seq = 0
    writes = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + seconds
    while True:
        while in_flight + LINK_FLUSH_FRAMES <= depth:
            bufs: list = []
            for _ in range(LINK_FLUSH_FRAMES):
                seq += 1
                if mode == "wire":
                    bufs.extend(wire.encode_fields(T.DATA, 0, seq, seq * 4096, 1, PAYLOAD))
                else:
                    bufs.extend(prebuilt)
            sock.sendmsg(bufs)
            in_flight += LINK_FLUSH_FRAMES
        n = sock.recv_into(ack_view[pending_ack:])
        pending_ack += n
        groups = pending_ack // ACK_BYTES
        if mode == "wire":
            pos = 0
            for _ in range(groups):
                got = wire.decode(ack_buf, pos, pending_ack, ack_view)
                assert got is not None
                frame, pos = got
                assert frame.type is T.WRITE_ACK
        pending_ack -= groups * ACK_BYTES
        if pending_ack:
            ack_view[:pending_ack] = ack_view[groups * ACK_BYTES:groups * ACK_BYTES + pending_ack]
        in_flight -= groups * LINK_FLUSH_FRAMES
        writes += groups * LINK_FLUSH_FRAMES
        if time.monotonic() >= deadline:
            break
    after = resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    os.waitpid(pid, 0)
    user_us = (after.ru_utime - before.ru_utime) * 1e6 / writes
    system_us = (after.ru_stime - before.ru_stime) * 1e6 / writes
    return user_us, system_us, writes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", nargs="?", default="raw,wire")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    modes = args.modes.split(",")
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:  # alternating
            results[mode].append(run(mode, args.seconds, args.depth))
    for mode in modes:
        users = [r[0] for r in results[mode]]
        systems = [r[1] for r in results[mode]]
        rates = [r[2] / args.seconds for r in results[mode]]
        print(f"{mode:5} sender per write: user {statistics.median(users):5.2f} us, system "
              f"{statistics.median(systems):5.2f} us ({statistics.median(rates):,.0f} writes/s; "
              f"{args.repeat} x {args.seconds:g} s, depth {args.depth}, groups of "
              f"{LINK_FLUSH_FRAMES})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
