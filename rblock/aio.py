"""Small asyncio helpers shared by the daemon layers.

`run_eager` runs a coroutine on the caller's stack until it first suspends, like Python 3.12's
`asyncio.eager_task_factory`. We target Debian 12's Python 3.11 (the interpreter nbdkit's
python plugin embeds), which lacks it. Measured with uvloop on the project machine:
`create_task` + done callback costs 5.3 us per request, a direct `coro.send(None)` 0.4 us;
most NBD requests complete without suspending (a page-cache pwrite), and 5 us is a third of
the per-request budget at 60k IOPS.

Constraint: a coroutine driven this way has no Task, so it must not rely on
`asyncio.current_task()` (for example `asyncio.timeout()`); awaiting futures, other
coroutines, locks, events, `run_in_executor` and `asyncio.sleep` is fine.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable, Coroutine
from functools import partial
from time import perf_counter_ns
from typing import Any, Protocol

Done = Callable[[Any, BaseException | None], None]


def run_eager(coro: Coroutine[Any, Any, Any], done: Done) -> None:
    """Drive CORO to completion, starting now; call done(result, None) or done(None, exc)."""
    _step(coro, done, None)


def _step(coro: Coroutine[Any, Any, Any], done: Done, _resumed_by: object) -> None:
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return
    except BaseException as exc:  # noqa: BLE001 -- handed to the caller, who decides
        done(None, exc)
        return
    if getattr(yielded, "_asyncio_future_blocking", False):
        # Future.__await__ yields the future itself; resume when it resolves, as Task does.
        yielded._asyncio_future_blocking = False
        yielded.add_done_callback(partial(_step, coro, done))
    elif yielded is None:
        # A bare yield (asyncio.sleep(0)) asks to be resumed on the next loop pass.
        asyncio.get_running_loop().call_soon(_step, coro, done, None)
    else:
        coro.close()
        done(None, RuntimeError(f"coroutine yielded {yielded!r}, not an asyncio future"))


class SendCoalescer:
    """Gathers what a protocol sends during one pass of the event loop and hands it to the
    transport in one `writelines` when the pass ends: one syscall for many replies or frames.
    Measured with py-spy on a replicated 4 KiB write workload: per-frame writelines calls
    were half of the primary's and a third of the secondary's GIL time.

    `prepare`, if set, is called when the pass ends, before the buffers go out: a protocol
    that batches small messages itself (the peer link's write acks) adds them there.
    """

    def __init__(self, transport: asyncio.BaseTransport):
        self.transport = transport
        self.prepare: Callable[[], None] | None = None
        self._pending: list[bytes | memoryview] = []
        self._scheduled = False
        self.writes = 0  # write/write_one calls since the last flush (a protocol may cap it)
        self.flushed_writes = 0  # ... and in the last flush
        # Called after the pass's buffers went to the transport: an IdlePoller's arm().
        self.sent: Callable[[], None] | None = None
        # Looked up once: asyncio.get_running_loop() makes a getpid() syscall on each call.
        self._loop = asyncio.get_running_loop()

    def write(self, bufs: list[bytes | memoryview] | tuple[bytes | memoryview, ...]) -> None:
        self._pending.extend(bufs)
        self.writes += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def write_one(self, buf: bytes | memoryview) -> None:
        """`write` of one buffer (no list or tuple to build)."""
        self._pending.append(buf)
        self.writes += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def schedule(self) -> None:
        """Make sure the pass ends with a flush (and so a `prepare` call)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        if self.prepare is not None:
            self.prepare()  # its writes join this flush: _scheduled is still set
        self._scheduled = False
        self.flushed_writes, self.writes = self.writes, 0
        if not self._pending:
            return
        bufs, self._pending = self._pending, []
        if not self.transport.is_closing():
            self.transport.writelines(bufs)  # type: ignore[attr-defined]
            if self.sent is not None:
                self.sent()

    def discard(self) -> None:
        self._pending.clear()


class Pollable(Protocol):
    """What IdlePoller reads for: a BufferedProtocol that says when it may be read."""

    def pollable(self) -> bool: ...

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...


# A poll that ends without data is a miss, one that finds data a hit; past POLL_MISSES_MAX
# more misses than hits (with hits counted back down to zero), polling stops for
# POLL_BACKOFF_NS: polling pays only while most polls find their data. Measured (QD1 4 KiB
# writes, benchmarks/README.md): on an idle machine 99% of polls hit (mean wait 37 us);
# with a busy loop on the other core 77% missed, and polling cut IOPS to a third: the
# spinning server was now a CPU hog to the scheduler, and the client waited for a CPU.
POLL_MISSES_MAX = 4
POLL_BACKOFF_NS = 100_000_000
# No polling while the machine's CPUs are contended: when, over the last
# POLL_PRESSURE_PERIOD_NS, other tasks waited for a CPU more than POLL_PRESSURE_MAX of the
# time (PSI, /proc/pressure/cpu "some", read once per period, less the time this process
# itself waited after a sched_yield that let another task run: longer than
# POLL_YIELD_OTHER_NS). Then no CPU is idle, a wake-up costs no halted vCPU, and a spinning
# process (never asleep) loses the scheduler's preference for tasks that sleep. Measured
# (benchmarks/README.md): with two processes beside, busy 2 ms, asleep 2 ms in turn (PSI
# 37-43%), polling without this cut rblock serve's QD1 IOPS to 0.76x; on the idle machine
# PSI was 3-4% with rblock serve polling, and about 10% (less its own yields) for the
# primary of a replicated pair polling: the secondary's yields to fio and to it.
POLL_PRESSURE_PERIOD_NS = 100_000_000
POLL_PRESSURE_MAX = 0.20
POLL_YIELD_OTHER_NS = 5_000
PRESSURE_PATH = "/proc/pressure/cpu"


class IdlePoller:
    """A short busy poll before the event loop sleeps: after a pass sent something on a
    registered socket (an NBD reply, a frame to the peer), look for the answer for up to
    `poll_ns` before going back to the loop, which would sleep in epoll_wait.

    Why (benchmarks/README.md, "QD1: where the idle wake-up goes"): on this project's VM a
    sleeping process woken from another CPU that is idle costs 35-45 us (an IPI to a halted
    vCPU), two of them per request at queue depth 1 when client and server run on different
    CPUs: 9-12k IOPS instead of 27-29k when they share one. A process that is still running
    when its answer arrives is not woken at all, and its CPU is not halted.

    How: one epoll set of its own over the registered sockets (uvloop keeps its own);
    `arm()` schedules `_spin` at the end of the pass (call_soon: after the flushes already
    scheduled). `_spin` polls that set without blocking, yielding the CPU (sched_yield)
    between polls so that a client waiting to run on this CPU runs, until data comes or the
    time is up. Data is read the way the transport reads it: into the protocol's
    `get_buffer`, then `buffer_updated`; then the loop runs again (the replies' flush, other
    sockets, timers), so a busy socket cannot starve the loop. A protocol that may not be
    read now (paused, closing, TLS: the bytes on its socket are not its bytes) says so in
    `pollable()` and is skipped; an error or EOF is left to the transport, which sees it in
    its next poll. Polls that mostly miss turn polling off for a while (POLL_MISSES_MAX),
    and so does a machine whose CPUs are contended (POLL_PRESSURE_MAX).

    Costs CPU: up to `poll_ns` after an exchange that is not answered at once; when that
    keeps happening (a client with pauses between requests, a busy machine) at most
    POLL_MISSES_MAX polls per POLL_BACKOFF_NS; a node with nothing to do spends nothing.
    """

    def __init__(self, poll_ns: int, pressure_path: str | None = PRESSURE_PATH):
        """PRESSURE_PATH: where PSI's CPU pressure is read (None: not at all)."""
        assert poll_ns > 0
        self.poll_ns = poll_ns
        self._epoll = select.epoll()
        self._by_fd: dict[int, Pollable] = {}
        self._armed = False
        self._misses = 0  # misses less hits, at least 0
        self._off_until_ns = 0  # polling backed off until then
        self.hits = self.misses = self.backoffs = self.pressured = 0  # for tests, benchmarks
        self._loop = asyncio.get_running_loop()
        try:
            self._pressure_fd = (-1 if pressure_path is None else
                                 os.open(pressure_path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:  # no PSI (kernel without it, psi=0): only the misses decide
            self._pressure_fd = -1
        self._pressure_next_ns = 0  # when to read it again
        self._pressure_us = self._cpu_pressure_us()
        self._pressure_at_ns = perf_counter_ns()
        self._yield_wait_ns = 0  # waited after yields this period (our own share of PSI)

    def add(self, fd: int, endpoint: Pollable) -> None:
        """Poll FD for ENDPOINT. A closed socket leaves the epoll set by itself (and its
        number may come back for a new one before its protocol has heard of the close)."""
        self._by_fd.pop(fd, None)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)
        self._by_fd[fd] = endpoint

    def remove(self, fd: int, endpoint: Pollable | None = None) -> None:
        """Stop polling FD (only if it is still ENDPOINT's, when given)."""
        if fd in self._by_fd and (endpoint is None or self._by_fd[fd] is endpoint):
            del self._by_fd[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: it left the set then
                pass

    def arm(self) -> None:
        """Something was sent: poll for the answer at the end of this pass."""
        if self._armed:
            return
        now_ns = perf_counter_ns()
        if now_ns >= self._pressure_next_ns:
            self._check_pressure(now_ns)
        if now_ns < self._off_until_ns:
            return
        self._armed = True
        self._loop.call_soon(self._spin)

    def _cpu_pressure_us(self) -> int:
        """PSI's total of microseconds some task waited for a CPU; 0 without PSI."""
        if self._pressure_fd < 0:
            return 0
        try:
            text = os.pread(self._pressure_fd, 256, 0)
            return int(text.split(b"total=", 1)[1].split(None, 1)[0])
        except (OSError, IndexError, ValueError):
            return 0

    def _check_pressure(self, now_ns: int) -> None:
        self._pressure_next_ns = now_ns + POLL_PRESSURE_PERIOD_NS
        if self._pressure_fd < 0:
            return
        total_us = self._cpu_pressure_us()
        others_ns = (total_us - self._pressure_us) * 1000 - self._yield_wait_ns
        share = others_ns / max(1, now_ns - self._pressure_at_ns)
        self._pressure_us, self._pressure_at_ns = total_us, now_ns
        self._yield_wait_ns = 0
        if share > POLL_PRESSURE_MAX:
            self.pressured += 1
            self._off_until_ns = max(self._off_until_ns, self._pressure_next_ns)

    def close(self) -> None:
        self._by_fd.clear()
        self._epoll.close()
        if self._pressure_fd >= 0:
            os.close(self._pressure_fd)
            self._pressure_fd = -1

    def _spin(self) -> None:
        self._armed = False
        deadline_ns = perf_counter_ns() + self.poll_ns
        poll = self._epoll.poll
        by_fd = self._by_fd
        while True:
            got = False
            for fd, _events in poll(0):
                endpoint = by_fd.get(fd)
                if endpoint is None or not endpoint.pollable():
                    continue
                try:
                    n = os.readv(fd, [endpoint.get_buffer(-1)])
                except BlockingIOError:
                    continue
                except OSError:
                    self.remove(fd)  # the transport reports it
                    continue
                if n == 0:
                    self.remove(fd)  # EOF: the transport reads it again
                    continue
                endpoint.buffer_updated(n)
                got = True
            if got:
                self.hits += 1
                if self._misses:
                    self._misses -= 1
                return
            now_ns = perf_counter_ns()
            if now_ns >= deadline_ns:
                self.misses += 1
                self._misses += 1
                if self._misses > POLL_MISSES_MAX:
                    self._misses = 0
                    self.backoffs += 1
                    self._off_until_ns = now_ns + POLL_BACKOFF_NS
                return
            os.sched_yield()
            yielded_ns = perf_counter_ns() - now_ns
            if yielded_ns > POLL_YIELD_OTHER_NS:
                self._yield_wait_ns += yielded_ns


# The process's poll time (configure_idle_poll) and each loop's poller (one loop per daemon).
_idle_poll_ns = 0
_pollers: dict[asyncio.AbstractEventLoop, IdlePoller] = {}


def configure_idle_poll(poll_ns: int) -> None:
    """Busy-poll up to POLL_NS before sleeping (0: never): `rblock serve --idle-poll-us`,
    a node's `idle_poll_us`. For connections made after the call."""
    global _idle_poll_ns
    assert poll_ns >= 0
    _idle_poll_ns = poll_ns


def idle_poller() -> IdlePoller | None:
    """The running loop's IdlePoller, made on first use; None when polling is off."""
    if not _idle_poll_ns:
        return None
    loop = asyncio.get_running_loop()
    poller = _pollers.get(loop)
    if poller is None:
        for old in _pollers.values():  # an earlier loop's (tests run several): it is done
            old.close()
        _pollers.clear()
        poller = _pollers[loop] = IdlePoller(_idle_poll_ns)
    elif poller.poll_ns != _idle_poll_ns:
        poller.poll_ns = _idle_poll_ns
    return poller
