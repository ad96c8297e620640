"""The resource core's sweeps: the resync (the target requests, the source answers) and the
online verify, both paced by the rate limiter."""

from __future__ import annotations

from typing import Any

from rblock.replica import wire
from rblock.replica.core_common import (
    _ESTABLISHED,
    _PRIMARY,
    _SYNC_TARGET,
    BITMAP_FLUSH_INTERVAL_S,
    PROGRESS_SAMPLE_S,
    PROGRESS_SAMPLES_MAX,
    ApplyJob,
    Phase,
    RangeLock,
    Sweep,
    _block_crcs,
    log,
)
from rblock.replica.effects import Event
from rblock.replica.resync import SweepPlanner, all_blocks
from rblock.replica.state import (
    Disk,
    Generation,
)
from rblock.replica.wire import Frame, LinkError, T
from rblock.store.metadata import BLOCK_BYTES, Bitmap


class Sweeps:
    """Resync and online verify: the target drives, the source answers."""

    # --- resync: the target drives --------------------------------------------------------------

    def _begin_sync_target(self) -> None:
        self._set_phase(Phase.SYNC_TARGET)
        self._set("disk", Disk.INCONSISTENT)
        bitmap = self.bitmap
        assert bitmap is not None
        blocks = bitmap.count()
        self.counters.reset_resync(blocks)
        log.info("%s: resync from %s: %d blocks (%d bytes) out of sync", self.name,
                 self.peer_node, blocks, blocks * BLOCK_BYTES)
        gen = self._link_gen
        # Rule durable-before-claim, the other way round: Inconsistent, and the bits of what
        # is to come, are on disk before the first resync block lands here.

        def go() -> None:
            if self._link_gen == gen and self.phase is Phase.SYNC_TARGET:
                self._start_resync(bitmap)
        self._persist(lambda: self._flush_bitmap(go))

    def _start_resync(self, bitmap: Bitmap) -> None:
        self._start_sweep("resync", SweepPlanner(self.nblocks, bitmap.next_run, ids=self._id))

    def _start_sweep(self, kind: str, planner: SweepPlanner) -> None:
        self._stop_sweep()
        self._sweep = Sweep(kind, planner, self._link_gen)
        if kind == "resync":
            self.fx.set_timer("bitmap-flush", BITMAP_FLUSH_INTERVAL_S)
        self._sweep_pump()

    def _stop_sweep(self) -> None:
        s = self._sweep
        if s is not None:
            self.fx.cancel_timer("sweep")
            self.fx.cancel_timer("bitmap-flush")
            if s.link_gen == self._link_gen:
                # Answers to these may still be on the wire: dropped when they arrive.
                self._stale_answers.update(s.planner.inflight)
        self._sweep = None
        # Guest writes held until an answer is applied go on: no answer will be applied now.
        locks, self._rs_locks = self._rs_locks, {}
        for lock in locks.values():
            self._release(lock)

    def _sweep_pump(self) -> None:
        """Send resync or verify requests: at most RESYNC_INFLIGHT_MAX in flight, at the
        configured rate (a request waits for the rate, charged when it is planned)."""
        s = self._sweep
        while s is not None and s is self._sweep and s.link_gen == self._link_gen:
            if s.deferred is not None:
                return  # the "sweep" timer sends it
            nxt = s.planner.next_request()
            if nxt is None:
                if not s.planner.inflight:
                    self._sweep_finished(s)
                return
            delay = self._rate.take(self.clock(), nxt[2] * BLOCK_BYTES)
            if delay > 0:
                s.deferred = nxt
                self.fx.set_timer("sweep", delay)
                return
            self._sweep_issue(s, *nxt)

    def _sweep_issue(self, s: Sweep, rid: int, first: int, count: int) -> None:
        offset, length = first * BLOCK_BYTES, count * BLOCK_BYTES
        if self.role is _PRIMARY:
            # A primary's guest writes may land in the range: rule ordered-read.
            self._lock_range(offset, offset + length,
                             lambda lock: self._sweep_read(s, rid, offset, length, lock))
        else:
            self._sweep_read(s, rid, offset, length, None)

    def _sweep_read(self, s: Sweep, rid: int, offset: int, length: int,
                    lock: RangeLock | None) -> None:
        def after(data: Any, exc: BaseException | None) -> None:
            if exc is not None:
                if lock is not None:
                    self._release(lock)
                self._disk_failed(exc, f"reading {length} bytes at {offset} for the "
                                       f"{s.kind}")
                return
            if s is not self._sweep or s.link_gen != self._link_gen:
                if lock is not None:
                    self._release(lock)
                return
            ftype = T.RS_REQUEST if s.kind == "resync" else T.VERIFY_REQUEST
            self.fx.send_frame(ftype, 0, rid, offset, length, _block_crcs(data))
            if lock is not None:
                if s.kind == "resync":
                    # A primary SyncTarget (after invalidate or attach): later guest writes
                    # to the range wait until the answer is applied here, so an answer never
                    # overwrites a newer guest write.
                    self._rs_locks[rid] = lock
                else:
                    self._release(lock)  # verify: the request is in the stream before them
        self.fx.disk_read(self._op(after), offset, length, True)

    def _sweep_answered(self, rid: int) -> None:
        lock = self._rs_locks.pop(rid, None)
        if lock is not None:
            self._release(lock)
        s = self._sweep
        if s is not None and rid in s.planner.inflight:
            s.planner.done(rid)
            self._sample_progress()
            self._sweep_pump()

    def _sweep_finished(self, s: Sweep) -> None:
        self._stop_sweep()
        if s.kind == "verify":
            self._end_verify(f"{s.found} blocks differ")
            return
        bitmap = self.bitmap
        assert bitmap is not None
        if bitmap.count():
            # Blocks behind the sweep were marked again (a failed apply): another pass.
            self._start_resync(bitmap)
            return
        gen = self._link_gen
        peer_gen = self.peer_gen
        assert peer_gen is not None

        def flushed(_r: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self._disk_failed(exc, "flushing the resynced data")
                return
            if self._link_gen != gen or self.phase is not Phase.SYNC_TARGET:
                return  # interrupted; the next connection resumes from the bitmap
            self.gen = self.gen.synced_from(peer_gen)
            self.crashed_primary = False
            # The target holds the source's data now, and what the source knows of it.
            source = self.peer_side
            self._set("disk", Disk.OUTDATED if source is not None
                      and source.disk is Disk.OUTDATED else Disk.UPTODATE)
            self._flush_bitmap(lambda: self._persist(done, role_primary=self.role is _PRIMARY))

        def done() -> None:
            if self._link_gen != gen or self.phase is not Phase.SYNC_TARGET:
                return
            self.fx.send_json(T.SYNC_DONE, {"gen": self.gen.to_json(),
                                            "disk": self.disk.value})
            self._set_phase(Phase.ESTABLISHED)
            self._audit_established("blocks marked again after the resync")
            self.fx.emit(Event(self.name, "sync-done", "", "target"))
            self.fx.victim_end()  # (a no-op unless this resync resolved a split brain)
            log.info("%s: resync from %s finished", self.name, self.peer_node)
        # Rule durable-before-claim: the resynced blocks are on disk before the bitmap and
        # the superblock say the disk is UpToDate.
        self.fx.disk_flush(self._op(flushed))

    def _sample_progress(self) -> None:
        """Remember (time, blocks left) now and then: status derives rate and ETA from it."""
        now = self.clock()
        h = self.counters.history
        if not h or now - h[-1][0] >= PROGRESS_SAMPLE_S:
            h.append((now, self._sweep_left()))
            del h[:-PROGRESS_SAMPLES_MAX]

    def _sweep_left(self) -> int:
        s = self._sweep
        if s is not None and s.kind == "verify":
            return max(0, self.nblocks - s.planner.cursor)
        return self.bitmap.count() if self.bitmap is not None else 0

    def _on_rs_request(self, f: Frame) -> None:
        """Source: answer with the data, or RS_SAME when every block's checksum matches."""
        offset, length, rid, crcs = f.offset, f.aux, f.id, bytes(f.payload)
        self._check_range(offset, length)
        if not self.has_disk:
            return  # detached: the STATE that says so stops the peer's resync

        def answer(data: bytes | memoryview) -> None:
            if _block_crcs(data) == crcs:
                self.fx.send_frame(T.RS_SAME, 0, rid, offset, length)
            else:
                self.fx.send_frame(T.RS_DATA, 0, rid, offset, 0, data)
                self.counters.resync_sent_bytes += len(data)
            if self.bitmap is not None:
                self.bitmap.clear_range(offset, length)
            self._sample_progress()
        self._ordered_read(offset, length, answer)

    def _on_rs_data(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not _SYNC_TARGET:
            return
        self.counters.resync_received_bytes += len(f.payload)
        self._queue(ApplyJob(T.RS_DATA, f.id, f.offset, len(f.payload), f.payload,
                             link_gen=self._link_gen), barrier=False)

    def _on_rs_same(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not _SYNC_TARGET:
            return
        self._queue(ApplyJob(T.RS_SAME, f.id, f.offset, f.aux, link_gen=self._link_gen),
                    barrier=False, data=False)

    def _answer_expected(self, rid: int) -> bool:
        """Whether an answer to sweep request RID is to be used (it may be one to a sweep
        stopped meanwhile, dropped; one never asked for is a protocol error)."""
        s = self._sweep
        if s is not None and rid in s.planner.inflight:
            return True
        if rid in self._stale_answers:
            self._stale_answers.discard(rid)
            return False
        raise LinkError(f"answer to request {rid}, which is not in flight")

    def _on_sync_done(self, f: Frame) -> None:
        """Source: the target has everything; stop tracking."""
        body = f.json()
        try:
            self.peer_gen = Generation.from_json(body["gen"])
            peer_disk = Disk(body["disk"])
        except (KeyError, ValueError, TypeError) as e:
            raise LinkError(f"malformed SYNC_DONE: {e}") from None
        self.gen = self.gen.sync_source_done()
        if self.bitmap is not None:
            self.bitmap.clear_range(0, self.size_bytes)
        self.crashed_primary = False
        self._set("peer-disk", peer_disk)  # UpToDate, or Outdated like this disk
        self._set_phase(Phase.ESTABLISHED)
        self.fx.emit(Event(self.name, "sync-done", "", "source"))
        log.info("%s: resync to %s finished", self.name, self.peer_node)
        # role_primary too: a crashed primary's mark ends with this resync, or a later crash
        # of this node (as Secondary) would make it the "crashed primary" source again.
        self._persist(lambda: self._flush_bitmap(), role_primary=self.role is _PRIMARY)

    # --- verify -------------------------------------------------------------------------------

    def _start_verify(self) -> None:
        self.counters.reset_resync(self.nblocks)
        self._set_phase(Phase.VERIFY_SOURCE)
        self._start_sweep("verify", SweepPlanner(self.nblocks, all_blocks(self.nblocks),
                                                 wrap=False, ids=self._id))

    def _on_verify_request(self, f: Frame) -> None:
        """VerifyT: compare the sender's checksums with this disk, in the order of the
        writes on the link (rule ordered-read: no false difference under guest writes)."""
        offset, length, rid, theirs = f.offset, f.aux, f.id, bytes(f.payload)
        self._check_range(offset, length)
        if not self.has_disk:
            return  # detached: the STATE that says so stops the peer's verify
        if self.phase is _ESTABLISHED:
            self._set_phase(Phase.VERIFY_TARGET)

        def answer(data: bytes | memoryview) -> None:
            mine = _block_crcs(data)
            differ = 0
            for i in range(len(mine) // 4):
                if mine[4 * i:4 * i + 4] != theirs[4 * i:4 * i + 4]:
                    differ |= 1 << i
                    self._mark(offset + i * BLOCK_BYTES, BLOCK_BYTES)
            self.fx.send_frame(T.VERIFY_REPLY, 0, rid, offset, differ, wire.u64(length))
        self._ordered_read(offset, length, answer)

    def _on_verify_reply(self, f: Frame) -> None:
        if not self._answer_expected(f.id) or self.phase is not Phase.VERIFY_SOURCE:
            return
        s = self._sweep
        assert s is not None
        differ = f.aux
        for i in range(f.u64() // BLOCK_BYTES):
            if differ >> i & 1:
                self._mark(f.offset + i * BLOCK_BYTES, BLOCK_BYTES)
                s.found += 1
        self._sweep_answered(f.id)

    def _on_verify_start(self, f: Frame) -> None:
        """The peer (a Secondary) asked for a verify: a Primary runs it, so its checksums
        come from reads ordered with its guest writes."""
        if self.phase is _ESTABLISHED and self.role is _PRIMARY and self.has_disk:
            log.info("%s: verify requested by %s", self.name, self.peer_node)
            self._start_verify()
        else:
            log.warning("%s: verify requested by %s ignored: this node is %s, %s", self.name,
                        self.peer_node, self.role.value, self.repl.value)

    def _on_verify_done(self, f: Frame) -> None:
        self._set_phase(Phase.ESTABLISHED)
        self._audit_established("verify found differences")
        self._flush_bitmap()

    def _end_verify(self, outcome: str) -> None:
        if self.phase is Phase.VERIFY_SOURCE:
            self._stop_sweep()
            log.info("%s: verify done: %s (marked out of sync; disconnect and connect to "
                     "resync them)", self.name, outcome)
            self.fx.send_json(T.VERIFY_DONE, {"outcome": outcome})
        self._set_phase(Phase.ESTABLISHED)
        self._audit_established("verify found differences")
        self._flush_bitmap()

