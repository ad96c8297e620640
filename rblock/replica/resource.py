"""One replicated resource on one node: the asyncio shell around its core.

The core (core.py) decides everything and does no I/O; this shell is its `Effects`: it owns
the peer link, the data disk (a `BlockDevice`, possibly a stack of them: a fault injector
over the file) and the metadata, runs what the core asks for and feeds the outcomes back as
events. It is also the `BlockDevice` the NBD server exports: a guest WRITE goes straight to
`core.start_write` (bound once, no call layer between), reads the local disk can serve are
served here without the core.

Rules of the shell (effects.py says them for every implementation):
- an outcome never reaches the core during the effect that started it: a disk operation
  that finishes on the caller's stack is delivered on the next loop pass;
- metadata operations run one at a time, in order, in the default thread pool (they block
  on fdatasync);
- every task is kept (`_tasks`) and its failure logged.

It also keeps what `rblock status` says beside Connecting: since when the connection is in
its state, and the last way connecting to the peer failed (`note_connect_failure`: told by
the links, node.py's dialer and its listener), as a kind (link.py's FAIL_* words), the
message, and how many attempts in a row failed that way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rblock.aio import run_eager
from rblock.config import ResourceConfig
from rblock.replica import wire
from rblock.replica.core import ResourceCore
from rblock.replica.effects import Event, ResourceError
from rblock.replica.fencing import Answer, Fencing, Txn
from rblock.replica.link import (
    FAIL_DISCONNECTED,
    FAIL_LOST,
    FAIL_PEER_REFUSED,
    FAIL_REFUSED,
    FAIL_SECRET,
    FAIL_TLS,
    PeerLink,
)
from rblock.replica.state import DISK_PERSISTED, PERSISTED_DISK, Conn, Disk, Generation, Role
from rblock.replica.wire import Frame, T
from rblock.store.device import BlockDevice, Capabilities, DeviceError, FilterDevice
from rblock.store.faults import FaultyDevice
from rblock.store.metadata import ActivityLogFull, Metadata, MetadataError
from rblock.store.victim import SavingDevice, VictimSnapshot, unfinished

log = logging.getLogger("rblock.resource")

# Opens a (replaced or repaired) disk and its metadata for `rblock attach`; blocking.
DiskOpener = Callable[[], tuple[BlockDevice, Metadata]]
# Runs a fencing transaction (rblock/fencer.py's Fencer.run): resource, peer, kind, and what
# to call with the Answer.
FenceRunner = Callable[[str, str, Txn, Callable[[Answer], None]], None]


# ResourceConfig fields `rblock adjust` may change on a running resource (config.RUNTIME_KEYS,
# by field name); apply_settings asserts nothing else differs.
RUNTIME_FIELDS = ("resync_rate_bytes_per_s", "ping_interval_s", "peer_timeout_s",
                  "ack_timeout_s", "connect_retry_max_s", "after_sb_0pri", "after_sb_1pri",
                  "secret")


@dataclass
class ConnectFailure:
    """How connecting to the peer last failed: KIND (link.py's FAIL_*) and its message;
    COUNT attempts in a row failed that way, the first at FIRST_S, the last at LAST_S
    (loop time)."""

    kind: str
    message: str
    first_s: float
    last_s: float
    count: int = 1


class Resource(BlockDevice):
    def __init__(self, node: str, cfg: ResourceConfig, peer_node: str, volume: BlockDevice,
                 meta: Metadata, emit: Callable[[Event], None],
                 open_disk: DiskOpener | None = None,
                 open_meta: Callable[[], Metadata] | None = None,
                 fencer: FenceRunner | None = None):
        self.node = node
        self.cfg = cfg
        self.name = cfg.name
        self.peer_node = peer_node
        self.volume: BlockDevice | None = volume
        self.meta: Metadata | None = meta
        self._emit = emit
        self._open_disk = open_disk
        self._open_meta = open_meta  # the detached disk's metadata, to mark it Outdated
        self.size_bytes = cfg.size_bytes
        self.description = f"rblock resource {cfg.name} on {node}"
        self.capabilities = Capabilities(can_multi_conn=True)
        self.nbd_clients: Callable[[], int] = lambda: 0
        self.link: PeerLink | None = None
        # Bytes sent and received over the peer links that are gone (each link counts its
        # own): with the current link's, what /metrics reports as the replication traffic.
        self._past_links_sent_bytes = 0
        self._past_links_received_bytes = 0
        self._loop = asyncio.get_running_loop()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._meta_queue: asyncio.Queue = asyncio.Queue()
        self._disk_ops = 0  # data-disk operations running (detach waits for them)
        self._disk_idle = asyncio.Event()
        self._disk_idle.set()
        self._drain_watch = False
        self._faults = (False, False, False)  # inject_fault: reads, writes, flushes
        self.connect_requested = asyncio.Event()  # set by connect(): a StandAlone node dials
        sb = meta.sb
        self._fencer = fencer
        self.disk_path: Path | None = None  # node.py: the backing disk (split-brain snapshots)
        self.snapshot_dir: Path | None = None  # ... and where they go (None: beside it)
        self.lease_info: Callable[[], dict] | None = None  # node.py: the node's lease
        self.dials: bool | None = None  # node.py: this node dials the peer (else it waits)
        self._conn_since_s = self._loop.time()  # the connection state's last change
        self._failure: ConnectFailure | None = None  # the last way connecting failed
        fence = None
        if cfg.fencing == "etcd":
            assert fencer is not None, "node.py gives every fenced resource the fencer"
            fence = Fencing(cfg.name, node, peer_node, cfg.on_no_quorum, self._loop.time)
        self.core = ResourceCore(
            node, cfg, peer_node, self, self._loop.time,
            Generation(sb.uuid_current, sb.uuid_bitmap, tuple(sb.uuid_history)),
            PERSISTED_DISK[sb.disk_state], False, meta.bitmap, meta, fence=fence)
        # The NBD server's WRITE enters the core directly: no shell frame per guest write.
        self.start_write = self.core.start_write  # type: ignore[method-assign]
        self._unlink()

    # --- what node.py and the control API read ------------------------------------------------

    @property
    def role(self) -> Role:
        return self.core.role

    @property
    def peer_role(self) -> Role:
        return self.core.peer_role

    @property
    def conn(self) -> Conn:
        return self.core.conn

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from a crash if the last stop was not clean, then mark the metadata open.
        A split-brain resync that did not finish goes on saving what it overwrites."""
        meta = self.meta
        assert meta is not None
        self.core.promoted_at = meta.sb.promoted_at
        if self.disk_path is not None:
            info = unfinished(self.disk_path, self.name, self.snapshot_dir)
            if info is not None:
                self._wrap_saving(VictimSnapshot(self.disk_path, info, self.size_bytes,
                                                 self.snapshot_dir))
                log.warning("%s: the split-brain resync of snapshot %s did not finish: "
                            "saving goes on", self.name, info["id"])
        sb = meta.sb
        if not sb.clean_shutdown:
            blocks = await self._loop.run_in_executor(None, meta.recover_crash)
            self.core.crashed_primary = sb.role_primary
            log.warning("%s: last stop was not clean%s; %d blocks of the activity log marked "
                        "out of sync", self.name, " (this node was Primary)"
                        if sb.role_primary else "", blocks)
        await self._loop.run_in_executor(None, meta.mark_open)
        self._spawn(self._meta_worker(), "metadata writer")

    async def close(self) -> None:
        """Clean stop: in-flight writes are done (the NBD server drained), flush, tell the
        peer, persist bitmap and superblock."""
        core = self.core
        core.begin_close()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        await self._meta_queue.join()
        volume, meta = self.volume, self.meta
        if volume is not None and meta is not None:
            try:
                await volume.flush()
                gen = core.gen
                await self._loop.run_in_executor(None, lambda: meta.write_superblock(
                    uuid_current=gen.current, uuid_bitmap=gen.bitmap,
                    uuid_history=list(gen.history), role_primary=False,
                    disk_state=DISK_PERSISTED[core.disk]))
                await self._loop.run_in_executor(None, meta.mark_clean_shutdown)
            except OSError as e:
                log.error("%s: clean stop could not write the metadata: %s; the next start "
                          "recovers as after a crash", self.name, e)
            await _close_quietly(self.name, volume, meta)
            self.volume = self.meta = None
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_ended(t, what))

    def _task_ended(self, task: asyncio.Task, what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self.name, what, exc_info=task.exception())

    # --- the BlockDevice interface (primary) ------------------------------------------------------

    def _future(self) -> tuple[asyncio.Future, Callable[[Any, BaseException | None], None]]:
        fut = self._loop.create_future()

        def done(_token: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        return fut, done

    async def read(self, offset: int, length: int) -> bytes:
        core = self.core
        if core.role is not Role.PRIMARY:
            raise DeviceError(errno.EPERM, f"resource {self.name} is not Primary on {self.node}")
        volume = self.volume
        if volume is not None and core.read_local_ok(offset, length):
            try:
                return await volume.read(offset, length)
            except OSError as e:
                core.local_read_failed(e, offset, length)  # detaches; the peer answers below
        fut = self._loop.create_future()

        def done(_token: Any, data: Any, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(data)
        core.start_read(offset, length, done, None)
        return await fut

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        fut, done = self._future()
        self.core.start_write(offset, data, fua, done, None)
        await fut

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        fut, done = self._future()
        self.core.start_trim(offset, length, fua, done, None)
        await fut

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_punch: bool,
                           fast_only: bool) -> None:
        fut, done = self._future()
        self.core.start_zeroes(offset, length, fua, may_punch, fast_only, done, None)
        await fut

    async def flush(self) -> None:
        fut, done = self._future()
        self.core.start_flush(done, None)
        await fut

    async def cache(self, offset: int, length: int) -> None:
        if self.volume is not None:
            await self.volume.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self.volume is None or self.core.disk is not Disk.UPTODATE:
            return [(length, 0)]  # holes here may be data the peer has
        return await self.volume.extents(offset, length)

    # --- the peer link (LinkOwner) ----------------------------------------------------------------

    def attach_link(self, link: PeerLink) -> None:
        """A new authenticated link (dialed or accepted) replaces any old one."""
        old = self.link
        if old is not None and old is not link:
            self._retire_link(old)
            self.link = None
            self.core.link_down("replaced by a new connection")
            old.close("replaced by a new connection")
        self.link = link
        # The core's frames go straight to the link's methods while it is up.
        self.send_frame = link.send_frame  # type: ignore[method-assign]
        self.send_write_ack = link.send_write_ack  # type: ignore[method-assign]

    def _retire_link(self, link: PeerLink) -> None:
        self._past_links_sent_bytes += link.sent_bytes
        self._past_links_received_bytes += link.received_bytes

    def _unlink(self) -> None:
        if self.link is not None:
            self._retire_link(self.link)
        self.link = None
        self.send_frame = _drop  # type: ignore[method-assign]
        self.send_write_ack = _drop  # type: ignore[method-assign]

    def link_up(self, link: PeerLink) -> None:
        self._failure = None
        self.attach_link(link)
        self.core.link_up()

    def link_failed(self, link: PeerLink, kind: str, reason: str) -> None:
        """A link for this resource closed before it was up (link.py's FAIL_* kind; the
        kind already says the peer refused: the message is the peer's reason)."""
        self.note_connect_failure(kind, reason.removeprefix("peer refused: "))

    def note_connect_failure(self, kind: str, message: str) -> None:
        """Connecting to the peer failed (for status). The same kind again counts one more
        attempt of the same failure, with the newest message."""
        now = self._loop.time()
        f = self._failure
        if f is not None and f.kind == kind:
            f.message, f.last_s, f.count = message, now, f.count + 1
        else:
            self._failure = ConnectFailure(kind, message, now, now)

    def link_frame(self, link: PeerLink, f: Frame) -> None:
        if link is self.link:
            self.core.frame(f)

    def link_down(self, link: PeerLink, reason: str) -> None:
        if link is not self.link:
            return
        self._unlink()
        message = reason
        if reason.startswith("peer disconnected: "):
            kind, message = FAIL_DISCONNECTED, reason.removeprefix("peer disconnected: ")
        elif reason.startswith("peer refused: "):
            kind = (FAIL_SECRET if link.failure_kind == FAIL_SECRET else
                    FAIL_TLS if link.failure_kind == FAIL_TLS else FAIL_PEER_REFUSED)
            message = reason.removeprefix("peer refused: ")
        elif self.core.refusal and reason == self.core.refusal:
            kind = FAIL_REFUSED  # the handshake's decision refused the peer (protocols differ)
        else:
            kind = FAIL_LOST
        self.note_connect_failure(kind, message)
        self.core.link_down(reason)

    # --- effects: the link ------------------------------------------------------------------------

    def send_frame(self, t: int, flags: int, fid: int, offset: int, aux: int,
                   payload: bytes | memoryview = b"") -> None:
        """Replaced by the link's own method while a link is attached (see attach_link)."""

    def send_write_ack(self, seq: int) -> None:
        """Replaced by the link's own method while a link is attached (see attach_link)."""

    def send_json(self, t: T, obj: dict) -> None:
        if self.link is not None:
            self.link.send(wire.encode_json(t, obj))

    def flush_link(self) -> None:
        if self.link is not None:
            self.link.flush()

    def link_congested(self) -> bool:
        link = self.link
        if link is None or not link.congested:
            return False
        if not self._drain_watch:
            self._drain_watch = True
            self._spawn(self._wait_drained(link), "link drain")
        return True

    async def _wait_drained(self, link: PeerLink) -> None:
        try:
            await link.drained()
        finally:
            self._drain_watch = False
        self.core.link_drained()

    def pause_link(self) -> None:
        if self.link is not None:
            self.link.pause()

    def resume_link(self) -> None:
        if self.link is not None:
            self.link.resume()

    def close_link(self, reason: str, refuse: bool = False) -> None:
        link = self.link
        if link is None:
            return
        if refuse:
            link.refuse(reason)
        else:
            link.close(reason)

    # --- effects: the data disk -------------------------------------------------------------------

    def pwrite_now(self, offset: int, data: bytes | memoryview) -> OSError | None:
        volume = self.volume
        if volume is None:
            return OSError(errno.ENODEV, "the disk is detached")
        try:
            volume.write_inline(offset, data)  # type: ignore[arg-type]
        except OSError as e:
            return e
        return None

    def _disk_op(self, token: int,
                 make: Callable[[BlockDevice], Coroutine[Any, Any, Any]]) -> None:
        volume = self.volume
        if volume is None:
            self._loop.call_soon(self.core.disk_done, token, None,
                                 OSError(errno.ENODEV, "the disk is detached"))
            return
        self._disk_ops += 1
        self._disk_idle.clear()
        returned = False

        def done(result: Any, exc: BaseException | None) -> None:
            self._disk_ops -= 1
            if not self._disk_ops:
                self._disk_idle.set()
            if returned:
                self.core.disk_done(token, result, exc)
            else:  # finished on the core's stack: deliver it on the next pass
                self._loop.call_soon(self.core.disk_done, token, result, exc)
        run_eager(make(volume), done)
        returned = True

    def disk_write(self, token: int, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._disk_op(token, lambda v: v.write(offset, data, fua))  # type: ignore[arg-type]

    def disk_trim(self, token: int, offset: int, length: int, fua: bool) -> None:
        self._disk_op(token, lambda v: v.trim(offset, length, fua))

    def disk_zeroes(self, token: int, offset: int, length: int, fua: bool, may_punch: bool,
                    fast_only: bool) -> None:
        self._disk_op(token, lambda v: v.write_zeroes(offset, length, fua, may_punch,
                                                      fast_only))

    def disk_read(self, token: int, offset: int, length: int, once: bool) -> None:
        if once:
            self._disk_op(token, lambda v: v.read_once(offset, length))
        else:
            self._disk_op(token, lambda v: v.read(offset, length))

    def disk_flush(self, token: int) -> None:
        self._disk_op(token, lambda v: v.flush())

    def outdate_detached(self, token: int) -> None:
        opener = self._open_meta

        async def run() -> None:
            if opener is None:
                raise OSError(f"{self.name}: this node cannot open metadata")

            def mark() -> None:
                try:
                    meta = opener()
                except MetadataError as e:  # locked, damaged, gone: the core logs it
                    raise OSError(str(e)) from None
                try:
                    meta.write_superblock(disk_state=DISK_PERSISTED[Disk.OUTDATED])
                finally:
                    meta.close()
            await self._loop.run_in_executor(None, mark)
        self._meta_queue.put_nowait((token, run))

    def detach_disk(self) -> None:
        volume, meta = self.volume, self.meta
        self.volume = self.meta = None

        async def close() -> None:
            await self._disk_idle.wait()
            await _close_quietly(self.name, volume, meta)
        self._meta_queue.put_nowait((None, close))

    # --- effects: metadata ----------------------------------------------------------------------

    async def _meta_worker(self) -> None:
        """Run metadata operations one at a time, in the order the core asked for them."""
        while True:
            token, run = await self._meta_queue.get()
            try:
                try:
                    await run()
                except (OSError, ActivityLogFull) as e:  # AL full, I/O errors: to the core
                    # (ActivityLogFull is a MetadataError, not an OSError: once it went
                    # nowhere, and the writes waiting for the activity log hung for good.)
                    exc: BaseException | None = e
                else:
                    exc = None
                if token is not None:
                    self.core.meta_done(token, exc)
            except Exception:
                log.exception("%s: metadata operation failed", self.name)
            finally:
                self._meta_queue.task_done()

    def _in_pool(self, token: int, fn: Callable[[], Any]) -> None:
        meta = self.meta

        async def run() -> None:
            if meta is None:
                raise OSError(errno.ENODEV, "the disk is detached")
            await self._loop.run_in_executor(None, fn)
        self._meta_queue.put_nowait((token, run))

    def persist(self, token: int, changes: dict) -> None:
        meta = self.meta
        self._in_pool(token, lambda: meta.write_superblock(**changes))  # type: ignore[union-attr]

    def flush_bitmap(self, token: int) -> None:
        meta, volume = self.meta, self.volume

        async def run() -> None:
            if meta is None or volume is None:
                raise OSError(errno.ENODEV, "the disk is detached")
            await volume.flush()  # the data first (effects.py)
            await self._loop.run_in_executor(None, meta.flush_bitmap)
        self._meta_queue.put_nowait((token, run))

    def activate_al(self, token: int, extents: list[int]) -> None:
        meta, volume = self.meta, self.volume

        async def run() -> None:
            if meta is None or volume is None:
                raise OSError(errno.ENODEV, "the disk is detached")
            await volume.flush()  # what leaves the log is on the disk first (effects.py)
            await self._loop.run_in_executor(None, meta.al_activate, extents)
        self._meta_queue.put_nowait((token, run))

    # --- effects: timers and events ---------------------------------------------------------------

    def set_timer(self, name: str, delay_s: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = self._loop.call_later(delay_s, self._fire, name)

    def cancel_timer(self, name: str) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()

    def _fire(self, name: str) -> None:
        del self._timers[name]
        self.core.timer(name)

    def emit(self, event: Event) -> None:
        if event.what == "connection":
            self._conn_since_s = self._loop.time()
            if event.old == Conn.STANDALONE.value:
                self._failure = None  # `rblock connect`: what failed before no longer counts
        self._emit(event)

    # --- effects: split brain -------------------------------------------------------------------

    def victim_begin(self, info: dict) -> bool:
        if self.disk_path is None or self.volume is None:
            log.error("%s: split-brain victim, but the disk is not known here: no resync",
                      self.name)
            return False
        if isinstance(self.volume, SavingDevice):
            return True  # (a resync interrupted and started again: the snapshot goes on)
        try:
            snap = VictimSnapshot.create(self.disk_path, self.size_bytes, resource=self.name,
                                         node=self.node, where=self.snapshot_dir, **info)
        except OSError as e:
            log.error("%s: cannot create the split-brain snapshot in %s (%s): no resync, "
                      "rather than overwrite the victim's blocks unsaved; free space there "
                      "and connect again", self.name, self.snapshot_dir or self.disk_path, e)
            return False
        self._wrap_saving(snap)
        log.warning("%s: %s loses the split brain (%s): every block the resync overwrites is "
                    "saved first in %s ('rblock splitbrain list %s')", self.name, self.node,
                    info["decision"], snap.img, self.name)
        self.emit(Event(self.name, "split-brain-victim", "", str(snap.img), info["decision"]))
        return True

    def _wrap_saving(self, snap: VictimSnapshot) -> None:
        assert self.volume is not None
        base = self.volume
        while isinstance(base, FilterDevice):
            base = base.inner
        self.volume = SavingDevice(self.volume, base.fd, snap)  # type: ignore[attr-defined]

    def victim_end(self) -> None:
        v = self.volume
        if isinstance(v, SavingDevice):
            v.snap.finish()
            self.volume = v.inner
            log.info("%s: split-brain resync done; the victim's old blocks are kept in %s",
                     self.name, v.snap.img)

    # --- effects: fencing -----------------------------------------------------------------------

    def fence(self, token: int, kind: Txn) -> None:
        assert self._fencer is not None
        self._fencer(self.name, self.peer_node, kind,
                     lambda answer: self.core.disk_done(token, answer, None))

    # --- commands ---------------------------------------------------------------------------------

    async def _command(self, start: Callable[[Callable[[str, BaseException | None], None]],
                                             None]) -> str:
        fut = self._loop.create_future()

        def done(message: str, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(message)
        start(done)  # may raise ResourceError: refused before anything changed
        return await fut

    async def promote(self, force: bool = False, ignore_fencing: bool = False) -> str:
        return await self._command(lambda done: self.core.promote(force, done, ignore_fencing))

    async def demote(self, force: bool = False) -> str:
        if self.core.role is Role.SECONDARY:
            return "already Secondary"
        clients = self.nbd_clients()
        if clients and not force:
            raise ResourceError(f"{self.name} has {clients} NBD client(s) connected on "
                                f"{self.node}; stop them first (or --force to cut them off)")
        return await self._command(self.core.demote)

    def disconnect(self) -> str:
        return self.core.disconnect()

    def connect(self, discard_my_data: bool = False) -> str:
        msg = self.core.connect(discard_my_data)
        self.connect_requested.set()  # wakes the node's dialer
        return msg

    def start_verify(self) -> str:
        return self.core.verify()

    async def invalidate(self) -> str:
        return await self._command(self.core.invalidate)

    def detach(self) -> str:
        return self.core.detach()

    async def attach(self) -> str:
        """Open the disk and metadata named in the config again (after `create-md` on a
        replaced disk, or once the old one works again) and resync it from the peer."""
        if self.core.has_disk:
            raise ResourceError(f"{self.name} on {self.node} already has a disk "
                                f"({self.core.disk.value})")
        if self._open_disk is None:
            raise ResourceError(f"{self.name}: this node cannot open disks")
        await self._meta_queue.join()  # the old disk is closed
        try:
            volume, meta = await self._loop.run_in_executor(None, self._open_disk)
        except (OSError, ValueError) as e:
            raise ResourceError(f"cannot attach {self.name} on {self.node}: {e}") from None
        sb = meta.sb
        try:
            if not sb.clean_shutdown:
                await self._loop.run_in_executor(None, meta.recover_crash)
            await self._loop.run_in_executor(None, meta.mark_open)
        except OSError as e:
            await _close_quietly(self.name, volume, meta)
            raise ResourceError(f"cannot attach {self.name} on {self.node}: its metadata "
                                f"cannot be written: {e}") from None
        if self.core.has_disk:  # attached twice at once
            await _close_quietly(self.name, volume, meta)
            raise ResourceError(f"{self.name} on {self.node} already has a disk")
        self.volume, self.meta = self._with_faults(volume), meta
        gen = Generation(sb.uuid_current, sb.uuid_bitmap, tuple(sb.uuid_history))
        return self.core.attached(gen, PERSISTED_DISK[sb.disk_state], meta.bitmap, meta)

    def inject_fault(self, reads: bool, writes: bool, flushes: bool) -> str:
        """Test aid, like DRBD's fault injection: make this node's disk fail the chosen
        operations with EIO from now on (all False: stop failing). The setting belongs to the
        node's disk slot, not to one open disk: it stays on across detach and attach until
        cleared, so attaching a disk that still "fails" fails again."""
        self._faults = (reads, writes, flushes)
        volume = self.volume
        if volume is not None:
            inner = volume.inner if isinstance(volume, FaultyDevice) else volume
            self.volume = self._with_faults(inner)
        if not (reads or writes or flushes):
            return "disk faults cleared"
        what = ", ".join(FaultyDevice(self, reads=reads, writes=writes, flushes=flushes).faults)
        log.warning("%s: fault injection: the disk on %s now fails %s", self.name, self.node,
                    what)
        return f"the disk now fails {what} with EIO"

    def _with_faults(self, volume: BlockDevice) -> BlockDevice:
        reads, writes, flushes = self._faults
        if not (reads or writes or flushes):
            return volume
        return FaultyDevice(volume, reads=reads, writes=writes, flushes=flushes)

    # --- status ---------------------------------------------------------------------------------

    def link_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes over every peer link this resource has had, the current
        one included: counters that only grow (`status` shows the current link's)."""
        link = self.link
        return (self._past_links_sent_bytes + (link.sent_bytes if link else 0),
                self._past_links_received_bytes + (link.received_bytes if link else 0))

    def apply_settings(self, cfg: ResourceConfig) -> None:
        """`rblock adjust`: take the RUNTIME_FIELDS of CFG, on the live link too (its next
        ping and silence check use the new times). Any other field that differs is a bug of
        the caller (node.py tells the user those need a restart)."""
        for f in dataclasses.fields(cfg):
            if f.name not in RUNTIME_FIELDS:
                assert getattr(cfg, f.name) == getattr(self.cfg, f.name), f.name
        self.cfg = cfg
        self.core.settings_changed(cfg)
        link = self.link
        if link is not None:
            link.ping_interval_s = cfg.ping_interval_s
            link.peer_timeout_s = cfg.peer_timeout_s

    def status(self, nbd_uri: str) -> dict:
        st = self.core.status(nbd_uri)
        link = self.link
        now = self._loop.time()
        st["tls"] = self.cfg.tls
        for peer in st["peers"]:
            peer["sent_bytes"] = link.sent_bytes if link else 0
            peer["received_bytes"] = link.received_bytes if link else 0
            peer["tls_version"] = link.tls_version if link is not None and link.up else None
            peer["connection_for_s"] = round(now - self._conn_since_s, 1)
            if self.dials is not None:
                peer["dialer"] = self.node if self.dials else self.peer_node
            f = self._failure
            peer["connect_failure"] = None if f is None else {
                "kind": f.kind, "message": f.message, "attempts": f.count,
                "first_ago_s": round(now - f.first_s, 1), "last_ago_s": round(now - f.last_s, 1)}
        st["disk_faults"] = [w for w, on in zip(("reads", "writes", "flushes"), self._faults,
                                                strict=True) if on] or None
        if self.lease_info is not None and st["fencing"]["mode"] == "etcd":
            st["fencing"].update(self.lease_info())
        return st


def _drop(*_args: Any) -> None:
    """A frame for a link that is gone: dropped (effects.py)."""


async def _close_quietly(name: str, volume: BlockDevice | None, meta: Metadata | None) -> None:
    """Close a disk that may be failing: errors are logged, never raised."""
    if volume is not None:
        try:
            await volume.close()
        except OSError as e:
            log.error("%s: closing the disk: %s", name, e)
    if meta is not None:
        try:
            meta.close()
        except OSError as e:
            log.error("%s: closing the metadata: %s", name, e)
