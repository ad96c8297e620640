"""The resource core's link events and connect handshake: link_up, link_down (what is lost
with the link), STATE and BITMAP, the decision (state.decide) and what follows from it."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from rblock.replica import wire
from rblock.replica.core_common import (
    _ESTABLISHED,
    _FAILED,
    _NO_DISK,
    _NONE,
    _PENDING,
    _PRIMARY,
    BITMAP_CHUNK_BYTES,
    DECIDED,
    Phase,
    _complete_all,
    _side,
    log,
)
from rblock.replica.effects import Event
from rblock.replica.state import (
    Conn,
    Disk,
    PeerCounters,
    Role,
    Side,
    SplitBrainPolicy,
    Sync,
    decide,
)
from rblock.replica.wire import Frame, LinkError, T
from rblock.store.device import DeviceError
from rblock.store.metadata import BLOCK_BYTES


class LinkHandshake:
    """The link coming and going, and the connect handshake's decision."""

    # --- the link ------------------------------------------------------------------------------

    def link_up(self) -> None:
        """Event: a link to the peer is authenticated. Both sides send STATE and their
        bitmap; each decides on receiving the other's BITMAP|LAST."""
        self._link_gen += 1
        self.link_is_up = True
        self._peer_write_failed = False  # judged afresh by the handshake
        self._set("connection", Conn.CONNECTED)
        self.refusal = ""
        self.peer_side = None
        self._peer_chunks = []
        # Epochs restart with each primary's link; offset them so the apply order stays
        # monotonic across links (older applies may still be running).
        self._epoch_base = self._epoch_seen + 1
        self._peer_flush_gen = 0
        self._diverge_pending = ""  # the handshake compares the generations afresh
        self._stale_answers.clear()
        self.counters = PeerCounters()
        self._set_phase(Phase.HANDSHAKE)
        self.fx.send_json(T.STATE, self._local_side().to_json())
        if self.bitmap is not None:
            data = memoryview(self.bitmap.to_bytes())
            for pos in range(0, len(data), BITMAP_CHUNK_BYTES):
                chunk = data[pos:pos + BITMAP_CHUNK_BYTES]
                if any(chunk):
                    self.fx.send_frame(T.BITMAP, 0, 0, pos, 0, chunk)
        self.fx.send_frame(T.BITMAP, wire.FLAG_LAST, 0, 0, 0)
        self._watch = None
        self.fx.set_timer("ack-watch", self.cfg.ack_timeout_s / 2)
        log.info("%s: connected to %s", self.name, self.peer_node)

    def link_down(self, reason: str) -> None:
        """Event: the link broke or was closed. What the peer did not confirm is out of
        sync; writes waiting for it complete without it."""
        if not self.link_is_up:
            return
        self._link_gen += 1
        self.link_is_up = False
        was = self.phase
        lost = self.tracker.link_lost()
        for w in lost:
            self._mark(w.offset, w.length)
        had_volatile = bool(self._peer_volatile)
        self._peer_volatile_lost()
        self._stop_sweep()
        for lock in list(self._rs_locks.values()):
            self._release(lock)  # guest writes waiting on a resync answer go on (or fail)
        self._rs_locks.clear()
        self._set_phase(Phase.IDLE)
        self._set("peer-role", Role.UNKNOWN)
        self._set("peer-disk", Disk.UNKNOWN)
        if self.conn is not Conn.STANDALONE:
            self._set("connection", Conn.CONNECTING)
        self.fx.cancel_timer("ack-watch")
        log.warning("%s: lost %s: %s; %d unacknowledged writes marked out of sync", self.name,
                    self.peer_node, reason, len(lost))
        if self.role is _PRIMARY and was in DECIDED and not self.closing:
            # The peer stops following: a new generation, tracked by the bitmap.
            self._diverge_pending = f"lost {self.peer_node}"
        if lost or had_volatile:
            self._flush_bitmap()
        # Last, with the state above settled: completions may run the NBD server, which may
        # start new writes (they go the no-link way now).
        flushes, self._flushes = self._flushes, {}
        for fid in flushes:
            entry = self._guest_flushes.get(fid)
            if entry is not None:
                entry[3] = _FAILED
                self._flush_maybe_done(fid)
        reads, self._reads = self._reads, {}
        for done, token, offset, _length in reads.values():
            done(token, None, DeviceError(errno.EIO, f"{self.name}: {self.peer_node} lost "
                                                     f"while reading at {offset}: {reason}"))
        if lost:
            # These complete without the peer: the data moves on without it, so the peer is
            # recorded Outdated first (rule no-ack-lost, with fencing) and the new
            # generation is durable (rule new-generation).
            def go(ok: bool, why: str) -> None:
                if ok:
                    # Checked again once the generation is durable: the lease may have run
                    # out meanwhile (rule lease-lost holds at the acknowledgment).
                    self._diverge(lambda: self._fence_wait(
                        lambda ok2, why2: _complete_all(lost) if ok2
                        else self._fail_lost(lost, why2)))
                else:
                    self._fail_lost(lost, why)
            self._fence_wait(go)
        if self._drain_waiters:
            # Protocol A writes still in the link's buffer: on this copy alone now.
            waiters = self._drain_waiters
            self._drain_waiters = []

            def drained(ok: bool, why: str) -> None:
                for w in waiters:
                    if w.peer is _PENDING:
                        w.peer = _NONE
                        if not ok:
                            w.error = DeviceError(errno.EIO, why)
                        self._maybe_complete(w)
            self._fence_wait(drained)
        if self._invalidating is not None:
            self._invalidating()
        self._settle()


    # --- connect handshake: STATE, BITMAP, decision --------------------------------------------

    def _local_side(self) -> Side:
        return Side(self.node, self.gen, self.disk if self.has_disk else Disk.DISKLESS,
                    self.role, self.crashed_primary,
                    self.bitmap.count() if self.bitmap is not None else 0,
                    self.discard_my_data, self.cfg.protocol, self.promoted_at)

    def _on_state_first(self, f: Frame) -> None:
        if self.peer_side is not None:
            raise LinkError("a second STATE during the handshake")
        self.peer_side = _side(f)
        self.peer_gen = self.peer_side.gen

    def _on_bitmap(self, f: Frame) -> None:
        if self.peer_side is None:
            raise LinkError("BITMAP before STATE")
        if f.flags & wire.FLAG_LAST:
            self._decide()
            return
        limit = (self.nblocks + 7) // 8
        if f.offset + len(f.payload) > limit or f.offset % BITMAP_CHUNK_BYTES:
            raise LinkError(f"BITMAP chunk at {f.offset} of {len(f.payload)} bytes is outside "
                            f"the {limit}-byte bitmap")
        self._peer_chunks.append((f.offset, bytes(f.payload)))

    def _decide(self) -> None:
        peer = self.peer_side
        assert peer is not None
        local = self._local_side()
        chunks, self._peer_chunks = self._peer_chunks, []
        if peer.protocol != self.cfg.protocol:
            why = (f"protocol {self.cfg.protocol} on {self.node} but {peer.protocol} on "
                   f"{peer.node}; set the same protocol in [resource.{self.name}] on both "
                   f"nodes and restart them")
            log.error("%s: refusing to replicate with %s: %s", self.name, peer.node, why)
            self.refusal = why
            self.fx.close_link(why, refuse=True)
            return
        d = decide(local, peer, SplitBrainPolicy(self.cfg.after_sb_0pri,
                                                 self.cfg.after_sb_1pri))
        self.last_decision = d
        self._set("peer-role", peer.role)
        self._set("peer-disk", peer.disk)
        log.info("%s: %s vs %s: %s", self.name, self.node, peer.node, d)
        self.fx.emit(Event(self.name, "decision", "", d.sync.name, str(d)))
        if self.discard_my_data:
            if d.rule.startswith("discard-my-data") or d.sync is Sync.BOTH_DISCARD:
                log.warning("%s: --discard-my-data: %s", self.name, d)
            else:
                log.warning("%s: --discard-my-data ignored: there was no split brain to "
                            "resolve (%s)", self.name, d)
            self.discard_my_data = False
        if d.sync.connects and peer.role is _PRIMARY and self.role is _PRIMARY:
            # Not a split brain (the data has a direction): one of them was deposed by
            # fencing, or an operator promoted both. Keep trying: once one is demoted, the
            # next connect resyncs it.
            why = (f"both nodes are Primary; demote one ('rblock secondary {self.name}'), "
                   f"then it resyncs ({d})")
            log.error("%s: refusing to replicate with %s: %s", self.name, peer.node, why)
            self.refusal = why
            self.fx.send_json(T.DISCONNECT, {"reason": why})
            self.fx.close_link(why)
            return
        if not d.sync.connects:
            why = str(d)
            if d.sync is Sync.BOTH_DISCARD:
                fix = (f"run 'rblock connect {self.name} --discard-my-data' on the node whose "
                       f"changes are to be thrown away only, and 'rblock connect "
                       f"{self.name}' on the other")
            else:
                fix = (f"resolve with 'rblock connect {self.name} --discard-my-data' on the "
                       f"node whose changes are to be thrown away, then 'rblock connect "
                       f"{self.name}' on the other")
            log.error("%s: refusing to replicate with %s: %s. Data on both nodes is kept; %s",
                      self.name, peer.node, why, fix)
            self.refusal = why
            self._set("connection", Conn.STANDALONE)
            self.fx.emit(Event(self.name, "split-brain", "", why))
            self.fx.send_json(T.DISCONNECT, {"reason": why})
            self.fx.close_link(why)
            return
        bitmap = self.bitmap
        if d.sync in (Sync.BITMAP_SOURCE, Sync.BITMAP_TARGET) and bitmap is not None:
            peer_bits = bytearray(bitmap.nbytes)
            for pos, data in chunks:
                peer_bits[pos:pos + len(data)] = data
            bitmap.merge(bytes(peer_bits))
        elif d.sync in (Sync.FULL_SOURCE, Sync.FULL_TARGET) and bitmap is not None:
            bitmap.set_range(0, self.size_bytes)
        if d.sync in (Sync.BITMAP_TARGET, Sync.FULL_TARGET):
            if d.rule.startswith(("discard-my-data", "after-sb")) and not self.fx.victim_begin(
                    {"peer": peer.node, "decision": str(d),
                     "generation": f"{local.gen.current:016X}",
                     "changed_blocks": local.out_of_sync_blocks}):
                # This node loses a split brain, and what the resync would overwrite cannot
                # be kept: no resync (the shell said why), the data stays as it is.
                why = "the split-brain victim's blocks cannot be saved"
                self.refusal = why
                self._set("connection", Conn.STANDALONE)
                self.fx.send_json(T.DISCONNECT, {"reason": why})
                self.fx.close_link(why)
                return
            self._begin_sync_target()
        elif d.sync in (Sync.BITMAP_SOURCE, Sync.FULL_SOURCE):
            self._set_phase(Phase.SYNC_SOURCE)
            self._set("peer-disk", Disk.INCONSISTENT)
            self.counters.reset_resync(bitmap.count() if bitmap is not None else 0)
        elif d.sync is Sync.NONE:
            # The table says "no sync" only when neither side has a block out of sync
            # (rule same-current; tested with hypothesis): anything else is a bug in it.
            assert local.out_of_sync_blocks == 0 and peer.out_of_sync_blocks == 0, \
                f"{d} with {local.out_of_sync_blocks} + {peer.out_of_sync_blocks} blocks " \
                f"out of sync"
            self._set_phase(Phase.ESTABLISHED)
            if self.crashed_primary:
                self.crashed_primary = False
                self._persist(role_primary=self.role is _PRIMARY)
            self._catch_up(peer)
        elif d.sync is Sync.DISKLESS:
            if not self.has_disk and not self._may_use(peer):
                why = (f"{peer.node}'s data ({peer.gen.current:016X}, {peer.disk.value}) is "
                       f"not the data {self.node} served ({self.gen.current:016X}) before its "
                       f"disk went away: it misses writes that only that disk holds; attach "
                       f"that disk ('rblock attach {self.name}') and connect")
                log.error("%s: refusing to serve through %s: %s", self.name, peer.node, why)
                self.refusal = why
                self._set("connection", Conn.STANDALONE)
                self.fx.send_json(T.DISCONNECT, {"reason": why})
                self.fx.close_link(why)
                return
            if not self.has_disk:
                self.gen = peer.gen  # the data this node serves from now on
            self._set_phase(Phase.ESTABLISHED)
            if peer.disk is Disk.DISKLESS:
                self._diverge_pending = f"{peer.node} has no disk"
        else:  # NO_DATA / NO_GOOD_DATA: connected, nothing flows until someone has data
            self._set_phase(Phase.ESTABLISHED)
            self._audit_established(str(d), peer.out_of_sync_blocks)
        self._settle()

    def _may_use(self, peer: Side) -> bool:
        """A Diskless node serves through PEER only if the peer's disk is UpToDate and holds
        the data this node last served, or data that moved on from it (DRBD's exposed
        data UUID): never a copy that is behind."""
        if peer.disk is not Disk.UPTODATE:
            return True  # nothing is served through it anyway (write-routing)
        mine = self.gen.current
        return (self.gen.fresh or peer.gen.current == mine or peer.gen.bitmap == mine
                or mine in peer.gen.history)

    def _settle(self) -> None:
        """The handshake is over (or the link is gone): held guest writes go on."""
        held, self._held = self._held, []
        for w in held:
            self._admit(w)

    def _audit_established(self, why: str, peer_blocks: int = 0) -> None:
        """Established means writes flow and no resync runs, so blocks still marked out of
        sync then stay different until the next connect. That is legitimate after a verify
        (as in DRBD, the operator reconnects to resync what it found) or a write the peer
        failed to apply, and unavoidable when no node has consistent data, but it must never
        pass unnoticed: an error in the log and an event, not an assertion."""
        blocks = self.bitmap.count() if self.bitmap is not None else 0
        if self.phase is not _ESTABLISHED or not (blocks or peer_blocks):
            return
        if self.peer_disk in _NO_DISK or not self.has_disk:
            return  # tracking for a missing disk: that is what the bits are for
        log.error("%s: Established with %s, with %d blocks (%d bytes) out of sync here and "
                  "%d on %s, and no resync running (%s): they stay different until a resync; "
                  "run 'rblock disconnect %s' and 'rblock connect %s' once a node has good data",
                  self.name, self.peer_node, blocks, blocks * BLOCK_BYTES, peer_blocks,
                  self.peer_node, why, self.name, self.name)
        self.fx.emit(Event(self.name, "out-of-sync", "", str(blocks * BLOCK_BYTES), why))

    def _on_state(self, f: Frame) -> None:
        """A later STATE: the peer's role or disk changed."""
        side = _side(f)
        old = self.peer_side
        self.peer_side = side
        self.peer_gen = side.gen
        if side.role is _PRIMARY and self.role is _PRIMARY:
            self._protocol_error("both nodes are Primary")
            return
        self._set("peer-role", side.role)
        if side.disk is Disk.DISKLESS and (old is None or old.disk is not Disk.DISKLESS):
            self._peer_lost_disk()
        self._set("peer-disk", side.disk)
        if self.phase is _ESTABLISHED:
            self._catch_up(side)
        if self.phase in (Phase.VERIFY_SOURCE, Phase.VERIFY_TARGET) and old is not None \
                and old.role is not side.role:
            self._end_verify("a node changed its role")

    def _catch_up(self, peer: Side) -> None:
        """An Outdated disk that holds exactly what a connected UpToDate peer holds (the same
        generation, nothing out of sync on either side) is UpToDate again."""
        if (self.disk is Disk.OUTDATED and peer.disk is Disk.UPTODATE
                and peer.gen.current == self.gen.current and not peer.out_of_sync_blocks
                and self.bitmap is not None and not self.bitmap.count()):
            log.info("%s: the disk on %s holds what %s holds: UpToDate again", self.name,
                     self.node, peer.node)
            self._set("disk", Disk.UPTODATE)
            self._persist()
            self.fx.send_json(T.STATE, self._local_side().to_json())

    def _peer_lost_disk(self) -> None:
        """The peer detached its disk: nothing to sync with it; what it held only in its page
        cache is out of sync here; a new generation starts, tracked by the bitmap."""
        log.warning("%s: %s has no disk any more: it uses this node's disk", self.name,
                    self.peer_node)
        self._peer_volatile_lost()
        if self.phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET, Phase.VERIFY_SOURCE,
                          Phase.VERIFY_TARGET):
            self._stop_sweep()
            self._set_phase(Phase.ESTABLISHED)
        self._diverge_pending = f"{self.peer_node} lost its disk"
        self._peer_write_failed = False  # it has no disk now: judged afresh when it attaches
        self._refresh()

    def _outdate_detached(self, then: Callable[[], None]) -> None:
        """Before the first write goes on without the detached disk, its metadata says
        Outdated (if it can still be written), so that the disk, opened again after a
        restart, is never taken for the newer data. THEN runs once that is done, or failed:
        a disk whose metadata fails too is kept from promotion by fencing, not here."""
        self._outdating.append(then)
        if len(self._outdating) > 1:
            return

        def done(_r: Any, exc: BaseException | None) -> None:
            self._detached_unmarked = False
            if exc is not None:
                log.error("%s: could not mark the detached disk Outdated (%s): after a "
                          "restart without %s it could be taken for good data", self.name,
                          exc, self.peer_node)
            waiting, self._outdating = self._outdating, []
            for fn in waiting:
                fn()
        self.fx.outdate_detached(self._op(done))

    def _diverge(self, then: Callable[[], None]) -> None:
        """Rule new-generation (DRBD's new-current-UUID): the first write this disk takes
        that the peer's misses starts a new generation, tracked by the bitmap, so the
        peer's disk is resynced when it is back; and that generation is durable before the
        write lands, so a crash cannot hide that the data moved on (which would let the
        peer's older copy win the next connect). Lazily, at that first write, not when the
        peer went away: a node that took no write since has not diverged, and two nodes
        that both rotated without writing would look like a split brain. THEN runs once
        it is durable (at once if nothing is pending)."""
        if not self._diverge_pending and not self._diverging:
            then()
            return
        self._diverging.append(then)
        if len(self._diverging) > 1:
            return  # the superblock is on its way
        why, self._diverge_pending = self._diverge_pending, ""
        if self.disk is Disk.UPTODATE:
            # Even while a bitmap is already tracked (a resync was under way): the peer
            # may hold this very generation by now (a resync that finished without us
            # hearing of it), and must never pass for holding what comes next.
            self.gen = self.gen.rotated(self._new_uuid())
            log.info("%s: new generation %016X (%s)", self.name, self.gen.current, why)

        def durable() -> None:
            waiting, self._diverging = self._diverging, []
            for fn in waiting:
                fn()
        self._persist(durable)

