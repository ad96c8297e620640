"""rblock/aio.py's IdlePoller (the busy poll before the event loop sleeps) and its settings:
`[node.NAME] idle_poll_us` and `rblock serve --idle-poll-us`."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
import uvloop

from rblock import aio
from rblock.config import IDLE_POLL_US_DEFAULT, IDLE_POLL_US_MAX, ConfigError, load
from tests.cluster import REPO

POLL_NS = 2_000_000  # long, so a loaded test machine still answers within it


class Endpoint(asyncio.BufferedProtocol):
    """A protocol the poller reads for, recording what it got and from whom."""

    def __init__(self) -> None:
        self.buf = bytearray(4096)
        self.got = bytearray()
        self.may_read = True

    def pollable(self) -> bool:
        return self.may_read

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buf[:nbytes]


def run(coro):
    return uvloop.run(coro)


def test_poller_reads_the_answer_into_the_protocol_before_the_loop_sleeps():
    async def main():
        poller = aio.IdlePoller(POLL_NS, pressure_path=None)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        end = Endpoint()
        poller.add(ours.fileno(), end)
        try:
            theirs.send(b"answer")  # waiting already: the first poll finds it
            poller.arm()
            poller.arm()  # once per pass
            await asyncio.sleep(0)
            assert end.got == b"answer" and poller.hits == 1 and poller.misses == 0
            # Nothing comes: a miss, after about POLL_NS
            poller.arm()
            await asyncio.sleep(0)
            assert poller.misses == 1 and end.got == b"answer"
            # Not pollable (paused, say): its bytes stay in the socket for the transport
            end.may_read = False
            theirs.send(b"later")
            poller.arm()
            await asyncio.sleep(0)
            assert end.got == b"answer" and ours.recv(16) == b"later"
            # EOF is left to the transport (the socket leaves the poller)
            end.may_read = True
            theirs.close()
            poller.arm()
            await asyncio.sleep(0)
            assert ours.fileno() not in poller._by_fd and end.got == b"answer"
        finally:
            poller.close()
            ours.close()
            theirs.close()

    run(main())


def test_polls_that_mostly_miss_turn_polling_off_for_a_while():
    async def main():
        poller = aio.IdlePoller(10_000, pressure_path=None)  # 10 us: misses are quick
        ours, theirs = socket.socketpair()
        poller.add(ours.fileno(), Endpoint())
        try:
            for _ in range(aio.POLL_MISSES_MAX + 1):
                poller.arm()
                await asyncio.sleep(0)
            assert poller.misses == aio.POLL_MISSES_MAX + 1 and poller.backoffs == 1
            poller.arm()  # backed off: nothing scheduled
            assert not poller._armed
            await asyncio.sleep(0)
            assert poller.misses == aio.POLL_MISSES_MAX + 1
            poller._off_until_ns = 1  # the back-off is over
            theirs.send(b"x")
            poller.arm()
            await asyncio.sleep(0)
            assert poller.hits == 1
            # a hit counts a miss back: misses between hits keep polling on
            for _ in range(3 * aio.POLL_MISSES_MAX):
                theirs.send(b"x")
                poller.arm()
                await asyncio.sleep(0)
                poller.arm()
                await asyncio.sleep(0)
            assert poller.backoffs == 1
        finally:
            poller.close()
            ours.close()
            theirs.close()

    run(main())


def test_no_polling_while_the_cpus_are_contended(tmp_path):
    """PSI's CPU pressure over the last period above POLL_PRESSURE_MAX: no polling until
    the next period."""
    psi = tmp_path / "cpu"
    total_us = [1_000_000]

    def write_psi() -> None:
        psi.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total_us[0]}\n"
                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")

    async def main():
        write_psi()
        poller = aio.IdlePoller(10_000, pressure_path=str(psi))
        try:
            period_ns = aio.POLL_PRESSURE_PERIOD_NS
            # a period in which tasks waited for a CPU half the time
            total_us[0] += period_ns // 2000
            write_psi()
            poller._pressure_at_ns -= period_ns
            poller._pressure_next_ns = 0
            poller.arm()
            assert not poller._armed and poller.pressured == 1
            # the next period was calm: polling again
            poller._pressure_at_ns -= period_ns
            poller._pressure_next_ns = poller._off_until_ns = 0
            poller.arm()
            assert poller._armed and poller.pressured == 1
            await asyncio.sleep(0)
        finally:
            poller.close()

    run(main())


def test_a_closed_sockets_number_may_come_back_for_a_new_one():
    async def main():
        poller = aio.IdlePoller(POLL_NS, pressure_path=None)
        a, b = socket.socketpair()
        first = Endpoint()
        fd = a.fileno()
        poller.add(fd, first)
        a.close()  # the transport closed it; its protocol has not removed it yet
        c, d = socket.socketpair()
        if c.fileno() != fd:  # the kernel reuses the lowest number; make sure of it
            os.dup2(c.fileno(), fd)
        try:
            second = Endpoint()
            poller.add(fd, second)
            poller.remove(fd, first)  # the old protocol's late removal leaves the new one
            d.send(b"new")
            poller.arm()
            await asyncio.sleep(0)
            assert second.got == b"new" and first.got == b""
        finally:
            poller.close()
            if c.fileno() != fd:
                os.close(fd)
            for s in (b, c, d):
                s.close()

    run(main())


def test_idle_poller_follows_the_setting():
    async def main():
        aio.configure_idle_poll(0)
        assert aio.idle_poller() is None
        aio.configure_idle_poll(50_000)
        p = aio.idle_poller()
        assert p is not None and p is aio.idle_poller() and p.poll_ns == 50_000

    try:
        run(main())
        run(main())  # a new loop gets a new poller
    finally:
        aio.configure_idle_poll(0)


def _cluster_file(tmp_path, node_extra: str) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[resource.r0]\nsize = "16M"\nsecret = "s"\n'
        '[node.alpha]\nreplication = "127.0.0.1:7790"\ncontrol = "127.0.0.1:7800"\n'
        f'nbd = "127.0.0.1:10809"\n{node_extra}\n[node.alpha.disk]\nr0 = "a.img"\n'
        '[node.beta]\nreplication = "127.0.0.1:7791"\ncontrol = "127.0.0.1:7801"\n'
        'nbd = "127.0.0.1:10810"\n[node.beta.disk]\nr0 = "b.img"\n')
    return str(path)


def test_node_idle_poll_us_setting(tmp_path):
    cfg = load(_cluster_file(tmp_path, ""))
    assert cfg.node("alpha").idle_poll_us == IDLE_POLL_US_DEFAULT == 100
    assert load(_cluster_file(tmp_path, "idle_poll_us = 0")).node("alpha").idle_poll_us == 0
    for bad in ("-1", "true", '"100"', "1.5", str(IDLE_POLL_US_MAX + 1)):
        with pytest.raises(ConfigError, match=r"node\.alpha\.idle_poll_us: .* set "
                                              r"idle_poll_us = 100"):
            load(_cluster_file(tmp_path, f"idle_poll_us = {bad}"))


def test_serve_idle_poll_us_option(tmp_path, rblock_serve, image):
    import nbd

    for poll_us in ("0", "100"):
        srv = rblock_serve(image, "--export", "disk", "--idle-poll-us", poll_us)
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        for i in range(200):  # QD1 round trips, the poller's case
            h.pwrite(bytes([i]) * 4096, i * 4096)
            assert h.pread(4096, i * 4096) == bytes([i]) * 4096
        h.shutdown()
        assert srv.stop() == 0 and "Traceback" not in srv.log(), srv.log()
    bad = subprocess.run([sys.executable, "-m", "rblock", "serve", str(image),
                          "--idle-poll-us", "-1"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert bad.returncode == 2 and "--idle-poll-us -1: give 0 (off) to" in bad.stderr


def test_an_nbd_connection_polls_after_a_lone_reply_not_after_a_batch(tmp_path):
    """rblock/nbd/server.py POLL_AFTER_REPLIES_MAX: a client waiting for each reply gets the
    poll; a pass that answered a batch (a client keeping its queue full) does not poll."""
    from rblock.nbd.server import POLL_AFTER_REPLIES_MAX, Export, ExportCatalog, NBDServer
    from rblock.store.volume import FileVolume
    from tests.conftest import make_image
    from tests.nbdwire import CMD_WRITE, REQUEST_MAGIC, Raw

    batch = 4 * POLL_AFTER_REPLIES_MAX

    async def main():
        aio.configure_idle_poll(POLL_NS)
        poller = aio._pollers[asyncio.get_running_loop()] = aio.IdlePoller(
            POLL_NS, pressure_path=None)  # no CPU-pressure pause on a busy test machine
        vol = FileVolume(str(make_image(tmp_path / "d.img", 1 << 20)))
        catalog = ExportCatalog()
        catalog.add(Export("d", vol))
        server = NBDServer(catalog)
        host, port = await server.listen_tcp("127.0.0.1", 0)
        polls: list[int] = []

        def client() -> None:
            with Raw(f"nbd://{host}:{port}/d") as c:
                c.start()
                c.go("d")
                time.sleep(0.05)
                polls.append(poller.hits + poller.misses)
                c.request(CMD_WRITE, 0, 512, handle=1, payload=b"a" * 512)
                assert c.simple_reply() == (0, 1)
                time.sleep(0.05)  # the poll after that reply ends (a miss)
                polls.append(poller.hits + poller.misses)
                c.send(b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, h,
                                            h * 512, 512) + b"b" * 512 for h in range(2, batch + 2)))
                for h in range(2, batch + 2):
                    assert c.simple_reply() == (0, h)
                time.sleep(0.05)
                polls.append(poller.hits + poller.misses)

        try:
            await asyncio.to_thread(client)
        finally:
            await server.shutdown()
            await vol.close()
            aio.configure_idle_poll(0)
        assert polls[1] == polls[0] + 1, polls  # the lone reply: one poll
        assert polls[2] == polls[1], polls  # the batch's replies: none

    run(main())
