"""The resource core's secondary side: the apply queue of the primary's writes (in order,
overlaps serialised), and ordered reads (rule ordered-read) for answers to the peer."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from rblock.replica import wire
from rblock.replica.core_common import (
    _FUA,
    _PRIMARY,
    _SYNC_TARGET,
    INLINE_WRITE_BYTES_MAX,
    ApplyJob,
    RangeLock,
)
from rblock.replica.state import (
    Disk,
)
from rblock.replica.wire import Frame, LinkError, T


class Apply:
    """The secondary's apply queue and the ordered reads that answer the peer."""

    # --- ordered reads (rule ordered-read) -------------------------------------------------------

    def _ordered_read(self, offset: int, length: int,
                      answer: Callable[[bytes | memoryview], None],
                      fail: Callable[[], None] | None = None) -> None:
        """Read the range as the peer will see it once every frame sent so far is applied
        there, then ANSWER (which queues the reply) unless the link changed meanwhile; if
        the read fails, the disk is detached and FAIL answers instead."""
        gen = self._link_gen
        if self.role is _PRIMARY:
            def locked(lock: RangeLock) -> None:
                def after(data: Any, exc: BaseException | None) -> None:
                    if exc is not None:
                        self._disk_failed(exc, f"reading {length} bytes at {offset}")
                        if fail is not None and gen == self._link_gen:
                            fail()
                    elif gen == self._link_gen:
                        answer(data)
                    # Only now: a write held by the lock must reach the link after the answer.
                    self._release(lock)
                self.fx.disk_read(self._op(after), offset, length, True)
            self._lock_range(offset, offset + length, locked)
            return
        self._queue(ApplyJob(T.READ_REQUEST, 0, offset, length, link_gen=gen, reply=answer,
                             fail=fail), barrier=False, data=False)

    def _lock_range(self, start: int, end: int,
                    then: Callable[[RangeLock], None]) -> RangeLock:
        lock = RangeLock(start, end, then)
        lock.waiting_for = {wid for wid, w in self._writes.items()
                            if w.started and w.offset < end and start < w.offset + w.length}
        self._locks.append(lock)
        if not lock.waiting_for:
            lock.acquired = True
            then(lock)
        return lock

    def _write_left_locks(self, wid: int) -> None:
        for lock in list(self._locks):
            if wid in lock.waiting_for:
                lock.waiting_for.discard(wid)
                if not lock.waiting_for and not lock.acquired:
                    lock.acquired = True
                    lock.then(lock)

    def _release(self, lock: RangeLock) -> None:
        if lock in self._locks:
            self._locks.remove(lock)
        blocked, lock.blocked = lock.blocked, []
        for w in blocked:
            self._admit(w)

    # --- the secondary: applying the primary's writes ------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise LinkError(f"peer asked for {length} bytes at {offset}, past the end of "
                            f"{self.name} ({self.size_bytes} bytes)")

    def _on_data(self, f: Frame) -> None:
        seq, offset, data = f.id, f.offset, f.payload
        n = len(data)
        if self._protocol_b:
            self.fx.send_frame(T.RECV_ACK, 0, seq, 0, 0)
        if offset + n > self.size_bytes:
            raise LinkError(f"peer wrote {n} bytes at {offset}, past the end of {self.name} "
                            f"({self.size_bytes} bytes)")
        if (self._fast_apply and not f.flags & _FUA and n <= INLINE_WRITE_BYTES_MAX
                and not self.applyq):
            # The common case: nothing received earlier is still being applied (so no
            # ordering rule can hold this write back) and the write is a small page-cache
            # one. Apply it now, on this stack: no queue entry, no continuation.
            epoch = self._epoch_base + f.aux
            if epoch > self._epoch_seen:
                self._epoch_seen = epoch
            err = self.fx.pwrite_now(offset, data)
            if err is not None:
                self._disk_failed(err, f"applying {n} bytes at {offset}", offset, n)
                self.fx.send_frame(T.NEG_ACK, 0, seq, 0, err.errno or errno.EIO)
                return
            if self.phase is _SYNC_TARGET:
                self.bitmap.clear_range(offset, n)  # type: ignore[union-attr]
            self.fx.send_write_ack(seq)
            return
        self._queue(ApplyJob(T.DATA, seq, offset, n, data, f.flags, self._link_gen,
                             track=self.peer_disk is Disk.DISKLESS), epoch=f.aux)

    def _on_trim_or_zeroes(self, f: Frame) -> None:
        if self._protocol_b:
            self.fx.send_frame(T.RECV_ACK, 0, f.id, 0, 0)
        length = f.u64()
        if f.offset + length > self.size_bytes:
            raise LinkError(f"peer wrote {length} bytes at {f.offset}, past the end of "
                            f"{self.name} ({self.size_bytes} bytes)")
        self._queue(ApplyJob(f.type, f.id, f.offset, length, b"", f.flags, self._link_gen,
                             track=self.peer_disk is Disk.DISKLESS), epoch=f.aux, data=False)

    def _on_flush(self, f: Frame) -> None:
        self._queue(ApplyJob(T.FLUSH, f.id, 0, 0, link_gen=self._link_gen), epoch=f.aux,
                    barrier=True, data=False)

    def _on_out_of_sync(self, f: Frame) -> None:
        """The peer could not write this range (its disk failed): it differs here, and
        this disk's data moves on without the peer's (rule new-generation)."""
        offset, length = f.offset, f.aux
        self._check_range(offset, length)
        self._diverge_pending = self._diverge_pending or f"{self.peer_node} failed a write"
        self._diverge(lambda: self._mark(offset, length))

    def _queue(self, job: ApplyJob, epoch: int | None = None, barrier: bool = False,
               data: bool = True) -> None:
        if epoch is None:
            e = self._epoch_seen
        else:
            e = max(self._epoch_base + epoch, self._epoch_seen)
        self._epoch_seen = e
        entry = self.applyq.add(e, job.offset, job.length, barrier, job.length if data else 0)
        self._jobs[entry.key] = job
        if self.applyq.full:
            self.fx.pause_link()
        self._pump()

    def _pump(self) -> None:
        """Start every queued apply that may start; re-entrant calls just ask for another
        round (an apply that completes synchronously would otherwise recurse)."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                for entry in self.applyq.startable():
                    self._run_job(entry.key, self._jobs.pop(entry.key))
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _run_job(self, key: int, job: ApplyJob) -> None:
        if not self.has_disk:
            self._job_done(key, job, None, OSError(errno.ENODEV, "no disk"))
            return
        if job.track:
            # The primary had no disk when it sent this write: this node tracks what it
            # misses, durably before the write lands (a crash here must not forget the bits:
            # there is no activity log on this side), in a generation of its own.
            job.track = False

            def tracked() -> None:
                self._mark(job.offset, job.length)
                self._flush_bitmap(lambda: self._run_job(key, job))
            self._diverge(tracked)
            return
        fx = self.fx
        kind = job.kind
        if kind is T.RS_SAME:
            self._job_done(key, job, None, None)
            return
        if kind in (T.DATA, T.RS_DATA):
            self._run_write(key, job)
            return

        def after(result: Any, exc: BaseException | None) -> None:
            self._job_done(key, job, result, exc)
        tok = self._op(after)
        if kind is T.FLUSH:
            fx.disk_flush(tok)
        elif kind is T.TRIM:
            fx.disk_trim(tok, job.offset, job.length, bool(job.flags & _FUA))
        elif kind is T.ZEROES:
            fx.disk_zeroes(tok, job.offset, job.length, bool(job.flags & _FUA),
                           not job.flags & wire.FLAG_NO_HOLE, False)
        else:  # READ_REQUEST (an ordered read for a reply)
            fx.disk_read(tok, job.offset, job.length, True)

    def _run_write(self, key: int, job: ApplyJob) -> None:
        fua = bool(job.flags & _FUA)
        if not fua and job.length <= INLINE_WRITE_BYTES_MAX:
            self._job_done(key, job, None, self.fx.pwrite_now(job.offset, job.payload))
            return

        def after(_r: Any, exc: BaseException | None) -> None:
            self._job_done(key, job, None, exc)
        self.fx.disk_write(self._op(after), job.offset, job.payload, fua)

    def _job_done(self, key: int, job: ApplyJob, result: Any, exc: BaseException | None) -> None:
        self.applyq.done(key)
        fx = self.fx
        kind = job.kind
        current = job.link_gen == self._link_gen and self.link_is_up
        if exc is not None and self.has_disk:
            self._disk_failed(exc, f"applying {kind.name} at {job.offset}", job.offset,
                              job.length)
        err = (getattr(exc, "errno", None) or errno.EIO) if exc is not None else 0
        if current:
            if kind in (T.DATA, T.TRIM, T.ZEROES):
                if err:
                    fx.send_frame(T.NEG_ACK, 0, job.seq, 0, err)
                else:
                    if kind is T.DATA and self.phase is _SYNC_TARGET and self.bitmap is not None:
                        self.bitmap.clear_range(job.offset, job.length)  # fully covered blocks
                    fx.send_write_ack(job.seq)
            elif kind is T.FLUSH:
                fx.send_frame(T.FLUSH_ACK, 0, job.seq, 0, err)
            elif kind in (T.RS_DATA, T.RS_SAME):
                if not err and self.bitmap is not None:
                    self.bitmap.clear_range(job.offset, job.length)
                self._sweep_answered(job.seq)
            elif kind is T.READ_REQUEST:
                if not err:
                    job.reply(result)  # type: ignore[misc]
                elif job.fail is not None:
                    job.fail()
            if not self.applyq.full:
                fx.resume_link()
        self._pump()

    def _on_read_request(self, f: Frame) -> None:
        rid, offset, length = f.id, f.offset, f.aux
        self._check_range(offset, length)
        if not self.has_disk or self.disk is not Disk.UPTODATE:
            self.fx.send_frame(T.READ_ERROR, 0, rid, offset, errno.EIO)
            return

        def answer(data: bytes | memoryview) -> None:
            self.fx.send_frame(T.READ_REPLY, 0, rid, offset, 0, data)

        def fail() -> None:
            self.fx.send_frame(T.READ_ERROR, 0, rid, offset, errno.EIO)
        self._ordered_read(offset, length, answer, fail)

