"""The resource core's disk failures (rule on-io-error=detach), attach and detach, timers,
the operator's commands (promote, demote, connect, verify, invalidate, ...) and status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rblock.config import ResourceConfig
from rblock.replica.core_common import (
    _DISK_RANK,
    _ESTABLISHED,
    _NO_DISK,
    _PRIMARY,
    BITMAP_FLUSH_INTERVAL_S,
    DECIDED,
    PEER_FLUSH_INTERVAL_S,
    SYNC_RATE_WINDOW_S,
    ActivityLogView,
    Phase,
    log,
)
from rblock.replica.effects import Event, ResourceError
from rblock.replica.fencing import Ev
from rblock.replica.resync import RateLimiter
from rblock.replica.state import (
    DISK_PERSISTED,
    Conn,
    Disk,
    Generation,
    Role,
    Sync,
    check_promote,
    sync_progress,
)
from rblock.replica.wire import T
from rblock.store.metadata import BLOCK_BYTES, Bitmap


class Commands:
    """Disk failures, attach/detach, timers, the operator's commands and status."""

    # --- disk failures (rule on-io-error=detach) -------------------------------------------------

    def _disk_failed(self, exc: BaseException, what: str, offset: int = 0,
                     length: int = 0) -> None:
        """An I/O error of the local disk (data or metadata): detach it. A failed range is
        sent to the peer as OUT_OF_SYNC: it has the data (or will), this disk does not."""
        if length and self.link_is_up and self.phase in DECIDED:
            self.fx.send_frame(T.OUT_OF_SYNC, 0, 0, offset, length)
        if not self.has_disk:
            return
        log.error("%s: disk error on %s %s: %s; detaching the disk (this node carries on "
                  "through %s)", self.name, self.node, what, exc, self.peer_node)
        self._detach(f"I/O error {what}: {exc}", failed=True)

    def _detach(self, why: str, failed: bool) -> None:
        was = self.disk
        self._disk_gen += 1
        if failed:
            self._set("disk", Disk.FAILED)
        if self.phase is Phase.HANDSHAKE:
            # The peer decides on the STATE we sent: start over with one that is true.
            self.fx.close_link("renegotiating: the disk was detached")
        self._stop_sweep()
        if self.phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET, Phase.VERIFY_SOURCE,
                          Phase.VERIFY_TARGET):
            self._set_phase(Phase.ESTABLISHED)
        # Unless the peer is connected and known to have no good disk, writes may go on
        # without this one (now, or once the peer is back): if the disk can still take a
        # superblock, mark it Outdated, so that after a restart it is never taken for good
        # data. (Reattached to this same run of the node with nothing written elsewhere
        # meanwhile, it gets its state back: `attached`.) If the metadata is on the failed
        # device too this fails, and fencing (the peer recording this node Outdated in etcd)
        # is what then keeps it from promotion.
        known_alone = (self.link_is_up and self.phase in DECIDED
                       and self.peer_disk is not Disk.UPTODATE)
        # What the detached disk held, to give it its state back if it is attached again
        # before any write went elsewhere. Only a Primary can know that (every write passes
        # through it: `_route` forgets this at the first); a Secondary's peer may write
        # without it at any time, unseen.
        self._detached = (self.gen, was) if self.role is _PRIMARY else None
        # The best state the disk can have when it is attached again in this run: what it
        # was, and no better than Outdated, since writes may go on without it. The metadata
        # alone cannot say: a superblock write may have failed with the disk (it would still
        # read UpToDate).
        self._detached_cap = Disk.OUTDATED if was is Disk.UPTODATE else was
        # Marked Outdated now, or else before the first write that goes on without it.
        self._detached_unmarked = was in (Disk.UPTODATE, Disk.OUTDATED)
        if self.bitmap is not None and not known_alone and self._detached_unmarked:
            changes = dict(uuid_current=self.gen.current, uuid_bitmap=self.gen.bitmap,
                           uuid_history=list(self.gen.history),
                           disk_state=DISK_PERSISTED[Disk.OUTDATED])

            def marked(_r: Any, exc: BaseException | None) -> None:
                if exc is not None:
                    log.error("%s: could not mark the detached disk Outdated: %s", self.name,
                              exc)
                else:
                    self._detached_unmarked = False
            self.fx.persist(self._op(marked), changes)
        self.fx.detach_disk()
        for w in self._writes.values():
            if w.al is not None and w.al[2] is self.al:
                w.al[2].al_unpin_range(w.al[0], w.al[1])
                w.al = None
        self.bitmap = None
        self.al = None
        self._peer_volatile.clear()
        self._set("disk", Disk.DISKLESS)
        self.fx.emit(Event(self.name, "detached", "", self.node, why))
        if self.link_is_up and self.phase in DECIDED:
            self.fx.send_json(T.STATE, self._local_side().to_json())
        self._refresh()
        # Writes waiting for the activity log go on without it.
        waiting, self._al_waiting = self._al_waiting, []
        for w in waiting:
            w.al = None
            self._admit(w)

    def attached(self, gen: Generation, disk: Disk, bitmap: Bitmap,
                 al: ActivityLogView) -> str:
        """Event: the shell opened a (new or repaired) disk and its metadata for this
        Diskless node. Connected to a peer with an UpToDate disk, it becomes its SyncTarget
        at once for every block (checksums skip what is equal); otherwise the next connect
        decides from the generations."""
        assert not self.has_disk
        detached, self._detached = self._detached, None
        cap, self._detached_cap = self._detached_cap, None
        self._detached_unmarked = False
        if cap is not None and _DISK_RANK[disk] > _DISK_RANK.get(cap, 0):
            log.warning("%s: the attached disk's metadata says %s, better than this run "
                        "knows it to be since it was detached: taken as %s", self.name,
                        disk.value, cap.value)
            disk = cap
        if (detached is not None and detached[0] == gen == self.gen
                and disk is Disk.OUTDATED and detached[1] is Disk.UPTODATE):
            # The disk this node detached, and no data went anywhere else meanwhile (this
            # node served nothing through a peer): it is as good as it was.
            disk = Disk.UPTODATE
        self.bitmap, self.al, self.gen = bitmap, al, gen
        self._set("disk", disk)
        if self.role is _PRIMARY:
            # Whatever the peer holds, this disk takes writes from now on: the first one
            # starts a new generation (rule new-generation).
            self._diverge_pending = "a disk was attached to a Primary"
        if not (self.link_is_up and self.phase in DECIDED and self.peer_disk is Disk.UPTODATE):
            if disk is Disk.INCONSISTENT:
                # Its bitmap says nothing of the writes that went elsewhere while it was
                # away: none of its blocks is known good (no local reads), all get resynced.
                bitmap.set_range(0, self.size_bytes)
                self._persist(self._flush_bitmap)
            else:
                self._persist()
            if self.link_is_up:
                # The peer has no good disk to sync this one from: let a new handshake
                # decide from the generations which way the data goes.
                self.fx.close_link("renegotiating: a disk was attached")
                return f"attached ({disk.value}); reconnecting to {self.peer_node} to decide " \
                       f"the resync"
            return f"attached ({disk.value}); it resyncs when {self.peer_node} connects"
        bitmap.set_range(0, self.size_bytes)
        self._set("disk", Disk.INCONSISTENT)
        self._set_phase(Phase.SYNC_TARGET)
        self.counters.reset_resync(bitmap.count())
        self.fx.send_json(T.INVALIDATE, self._local_side().to_json())
        gen_now = self._link_gen

        def go() -> None:
            if self._link_gen == gen_now and self.phase is Phase.SYNC_TARGET:
                self._start_resync(bitmap)
        self._persist(lambda: self._flush_bitmap(go))
        return f"attached: resyncing from {self.peer_node}"

    def detach(self) -> str:
        """Command: give up the local disk (DRBD's detach), e.g. to replace it."""
        if not self.has_disk:
            raise ResourceError(f"{self.name} on {self.node} has no disk to detach")
        if self.role is _PRIMARY and not (self.link_is_up and self.phase in DECIDED
                                          and self.peer_disk is Disk.UPTODATE):
            raise ResourceError(f"{self.name} is Primary on {self.node} and {self.peer_node} "
                                f"is not connected with an UpToDate disk: detaching would "
                                f"leave its clients without data")
        self._detach("detached by the operator", failed=False)
        return "detached (Diskless)"

    # --- timers ----------------------------------------------------------------------------------

    def timer(self, name: str) -> None:
        """Event: a timer set with fx.set_timer fired."""
        if name == "sweep":
            s = self._sweep
            if s is not None and s.deferred is not None:
                nxt, s.deferred = s.deferred, None
                self._sweep_issue(s, *nxt)
                self._sweep_pump()
        elif name == "bitmap-flush":
            if self._sweep is not None and self._sweep.kind == "resync":
                self._sample_progress()
                self._flush_bitmap()
                self.fx.set_timer("bitmap-flush", BITMAP_FLUSH_INTERVAL_S)
        elif name == "peer-flush":
            self._peer_flush_timer = False
            if self._peer_volatile:
                self._send_peer_flush()
                self._peer_flush_timer = True
                self.fx.set_timer("peer-flush", PEER_FLUSH_INTERVAL_S)
        elif name == "ack-watch":
            self._ack_watch()
        elif name == "fence-retry" and self.fence is not None:
            self._fence_apply(self.fence.step(Ev.RETRY))
        elif name == "fence-gate":
            self._fence_gate()

    def _ack_watch(self) -> None:
        """A peer that answers pings but leaves a write, flush, read or resync request
        unanswered for ack_timeout_s is dropped (a secondary whose disk hangs, a bug): the
        writes waiting for it then complete without it, marked out of sync."""
        if not self.link_is_up:
            return
        s = self._sweep
        oldest = (next(iter(self.tracker.pending), None), next(iter(self._flushes), None),
                  next(iter(self._reads), None),
                  min(s.planner.inflight) if s is not None and s.planner.inflight else None)
        stalled = self._watch is not None and any(
            a is not None and a == b for a, b in zip(oldest, self._watch, strict=True))
        if stalled:
            log.error("%s: %s has not answered a request for %.0f s; dropping the link",
                      self.name, self.peer_node, self.cfg.ack_timeout_s)
            self.fx.close_link(f"no answer for {self.cfg.ack_timeout_s:g} s")
            return
        self._watch = oldest
        self.fx.set_timer("ack-watch", self.cfg.ack_timeout_s / 2)

    # --- commands --------------------------------------------------------------------------------

    def promote(self, force: bool, done: Callable[[str, BaseException | None], None],
                ignore_fencing: bool = False) -> None:
        """Become Primary. With fencing, the primary key is taken in etcd first (rule
        one-writer); --force overrides the disk checks, never fencing (IGNORE_FENCING
        does, for the disaster case of an etcd lost for good)."""
        chk = check_promote(self.role, self.disk, self.gen, self.conn, self.repl,
                            self.peer_role, self.peer_disk, self.peer_node, force,
                            self.bitmap.count() * BLOCK_BYTES if self.bitmap is not None else 0)
        if not chk.ok:
            raise ResourceError(f"cannot promote {self.name} on {self.node}: {chk.reason}")
        if self._promoting:
            raise ResourceError(f"{self.name}: a promotion on {self.node} is already under way")
        if self._demoting:
            raise ResourceError(f"{self.name}: a demotion on {self.node} is under way; promote "
                                f"once it is done")
        if self.role is _PRIMARY and not (force and self.disk is Disk.OUTDATED):
            done("already Primary", None)
            return
        if self.fence is not None:
            self._promoting = True

            def taken(ok: bool, why: str) -> None:
                self._promoting = False
                if not ok:
                    done("", ResourceError(f"cannot promote {self.name} on {self.node}: "
                                           f"{why}"))
                    return
                try:
                    self._promote_now(force, done)
                except ResourceError as e:
                    # Things changed while etcd answered: give the key back.
                    self._fence_release(lambda _note, err=e: done("", err))
            try:
                self._fence_take(ignore_fencing, taken)
            except ResourceError:
                self._promoting = False
                raise
            return
        self._promote_now(force, done)

    def _promote_now(self, force: bool,
                     done: Callable[[str, BaseException | None], None]) -> None:
        chk = check_promote(self.role, self.disk, self.gen, self.conn, self.repl,
                            self.peer_role, self.peer_disk, self.peer_node, force,
                            self.bitmap.count() * BLOCK_BYTES if self.bitmap is not None else 0)
        if not chk.ok:
            raise ResourceError(f"cannot promote {self.name} on {self.node}: {chk.reason}")
        connected = self.link_is_up and self.phase in DECIDED
        if chk.forced_fresh:
            self.gen = Generation(self._new_uuid())  # nothing to track: all of it is new
            self._set("disk", Disk.UPTODATE)
        elif self.has_disk:
            if self.disk is not Disk.UPTODATE:  # forced: the operator takes this data as good
                if self.gen.fresh:
                    self.gen = Generation(self._new_uuid())
                self._set("disk", Disk.UPTODATE)
            if not connected:
                # Data starts to differ from the absent peer's.
                self.gen = self.gen.rotated(self._new_uuid())
                self._diverge_pending = ""
        link_gen = self._link_gen

        def persisted() -> None:
            # The generation is durable before a single write is taken as Primary.
            self._promoting = False
            if self.link_is_up and self.peer_role is _PRIMARY:
                self._persist(role_primary=False)
                self._fence_release(lambda _note: None)  # the key taken for nothing
                done("", ResourceError(f"cannot promote {self.name} on {self.node}: "
                                       f"{self.peer_node} became Primary meanwhile"))
                return
            if not self.has_disk and not (self.link_is_up and self.phase in DECIDED
                                          and self.peer_disk is Disk.UPTODATE):
                self._fence_release(lambda _note: None)
                done("", ResourceError(f"cannot promote {self.name} on {self.node}: its disk "
                                       f"failed while promoting, and no connected peer has "
                                       f"an UpToDate disk"))
                return
            self._set("role", Role.PRIMARY)
            if self.link_is_up and self._link_gen == link_gen:
                if chk.forced_fresh:
                    self.fx.close_link("renegotiating after forced promotion")  # full sync
                else:
                    self.fx.send_json(T.STATE, self._local_side().to_json())
            log.info("%s: Primary on %s%s", self.name, self.node,
                     f" ({chk.reason})" if chk.reason else "")
            done(chk.reason or "promoted", None)
        self._promoting = True
        self.promoted_at = round(self.wall_clock(), 3)
        self._persist(persisted, role_primary=True, promoted_at=self.promoted_at)

    def demote(self, done: Callable[[str, BaseException | None], None]) -> None:
        """The shell checks for NBD clients first (or cuts them off with --force)."""
        if self._promoting:
            raise ResourceError(f"{self.name}: a promotion on {self.node} is under way; "
                                f"demote once it is done")
        if self._demoting:
            raise ResourceError(f"{self.name}: a demotion on {self.node} is already under way")
        if self.role is Role.SECONDARY:
            done("already Secondary", None)
            return
        self._demoting = True
        finish = done

        def done(message: str, exc: BaseException | None) -> None:  # noqa: F811
            self._demoting = False
            finish(message, exc)

        def flushed(_token: Any, exc: BaseException | None) -> None:
            # Every write answered as Primary is durable on both nodes first.
            self._set("role", Role.SECONDARY)
            self._detached = None  # the peer may write without the detached disk from now
            self._fence_gate()  # writes held for fencing fail: this node is not Primary

            def released(note: str) -> None:
                if self.link_is_up and self.phase in DECIDED:
                    self.fx.send_json(T.STATE, self._local_side().to_json())
                done(f"demoted; {note}" if note else "demoted", None)
            self._persist(lambda: self._fence_release(released), role_primary=False)
        self.start_flush(flushed, None)

    def disconnect(self) -> str:
        self._set("connection", Conn.STANDALONE)
        self.refusal = f"'rblock disconnect' on {self.node}"
        if self.link_is_up:
            self.fx.send_json(T.DISCONNECT, {"reason": f"'rblock disconnect' on {self.node}",
                                             # A Diskless primary cannot carry on alone.
                                             "outdate_peer": self.role is _PRIMARY
                                             and self.disk is Disk.UPTODATE})
            self.fx.close_link("disconnect requested")
        return "disconnected (StandAlone)"

    def connect(self, discard_my_data: bool = False) -> str:
        if discard_my_data:
            if self.role is _PRIMARY:
                raise ResourceError(f"{self.name} is Primary on {self.node}; make it secondary "
                                    f"before discarding its data")
            self.discard_my_data = True
        if self.conn is Conn.STANDALONE:
            self.refusal = ""
            self._set("connection", Conn.CONNECTING)
        return "connecting"

    def settings_changed(self, cfg: ResourceConfig) -> None:
        """`rblock adjust` (Resource.apply_settings): the settings a running resource takes.
        The resync rate applies to the next request of a running resync; the others are
        read where they are used (ack watch, the next connect's split-brain policies)."""
        assert cfg.protocol == self.cfg.protocol and cfg.size_bytes == self.cfg.size_bytes
        if cfg.resync_rate_bytes_per_s != self.cfg.resync_rate_bytes_per_s:
            self._rate = RateLimiter(cfg.resync_rate_bytes_per_s)
        self.cfg = cfg

    def verify(self) -> str:
        if not (self.link_is_up and self.phase is _ESTABLISHED):
            raise ResourceError(f"{self.name}: verify needs a connected, synced peer "
                                f"(replication is {self.repl.value})")
        if not self.has_disk or self.peer_disk in _NO_DISK:
            raise ResourceError(f"{self.name}: verify needs a disk on both nodes")
        if self.role is not _PRIMARY and self.peer_role is _PRIMARY:
            self.fx.send_json(T.VERIFY_START, {})
            return f"verify started on {self.peer_node} (the Primary runs it)"
        self._start_verify()
        return "verify started"

    def invalidate(self, done: Callable[[str, BaseException | None], None]) -> None:
        """Throw away this node's data: everything is resynced from the peer.

        A Secondary marks everything out of sync and reconnects: the connect decision makes
        it the SyncTarget. A Primary keeps its link: its clients' reads of blocks not yet
        resynced are served by the peer, and their writes must reach the peer, whose copy
        is the good one from now on; it turns into a SyncTarget on the live link, as DRBD
        does."""
        if not self.has_disk:
            raise ResourceError(f"{self.name} has no disk on {self.node}; attach one")
        if self.role is _PRIMARY:
            self._invalidate_primary(done)
            return
        assert self.bitmap is not None
        self.bitmap.set_range(0, self.size_bytes)
        self._set("disk", Disk.INCONSISTENT)

        def persisted() -> None:
            if self.link_is_up:
                self.fx.close_link("invalidated: resync from the peer")
            done("invalidated: resyncing from the peer", None)
        self._persist(lambda: self._flush_bitmap(persisted))

    def _invalidate_primary(self, done: Callable[[str, BaseException | None], None]) -> None:
        if not self.link_is_up:
            raise ResourceError(f"{self.name} is Primary on {self.node} and has no peer to "
                                f"read from; connect it first")
        if self.phase is not _ESTABLISHED or self.peer_disk is not Disk.UPTODATE:
            raise ResourceError(f"{self.name}: replication with {self.peer_node} is "
                                f"{self.repl.value} and its disk {self.peer_disk.value}; "
                                f"invalidate once it is Established and UpToDate")
        if self._invalidating is not None:
            raise ResourceError(f"{self.name}: an invalidate is already under way")
        # With protocols A and B, the client may have been answered before the peer applied
        # a write. Once this disk is Inconsistent the peer's copy is the only good one, so it
        # must first hold every write answered so far; writes from now on wait for it.
        last_seq = self.tracker.next_seq - 1
        gen = self._link_gen

        def check() -> None:
            pending = self.tracker.pending
            if (self.link_is_up and self._link_gen == gen and pending
                    and next(iter(pending)) <= last_seq):
                return  # called again at the next ack
            self._invalidating = None
            self._refresh()
            if not self.link_is_up or self._link_gen != gen or self.phase is not _ESTABLISHED:
                done("", ResourceError(f"{self.name}: lost {self.peer_node} while "
                                       f"invalidating; nothing was changed, try again once "
                                       f"it is connected"))
                return
            bitmap = self.bitmap
            assert bitmap is not None
            bitmap.set_range(0, self.size_bytes)
            self._set("disk", Disk.INCONSISTENT)
            self._set_phase(Phase.SYNC_TARGET)
            blocks = bitmap.count()
            self.counters.reset_resync(blocks)
            self.fx.send_json(T.INVALIDATE, self._local_side().to_json())
            log.info("%s: invalidated on %s (Primary): resync from %s: %d blocks (%d bytes); "
                     "reads of blocks not resynced yet are served by %s", self.name, self.node,
                     self.peer_node, blocks, blocks * BLOCK_BYTES, self.peer_node)

            def go() -> None:
                done("invalidated: resyncing from the peer", None)
                if self._link_gen == gen and self.phase is Phase.SYNC_TARGET:
                    self._start_resync(bitmap)
            # Durable before the first resync block lands: after a crash from here on, this
            # node must come back Inconsistent, not as the good copy of a half-copied disk.
            self._persist(lambda: self._flush_bitmap(go))
        self._invalidating = check
        self._refresh()
        check()

    def begin_close(self) -> None:
        """A clean stop: in-flight guest I/O is done (the NBD server drained). Tell the
        peer; losing the link now starts no new generation."""
        self.closing = True
        self._stop_sweep()
        if self.link_is_up:
            self.fx.send_json(T.DISCONNECT, {"reason": "peer is shutting down"})
            self.fx.close_link("shutting down")

    # --- status ----------------------------------------------------------------------------------

    def status(self, nbd_uri: str) -> dict:
        oos = self.bitmap.count() if self.bitmap is not None else 0
        c = self.counters
        phase = self.phase
        syncing = phase in (Phase.SYNC_SOURCE, Phase.SYNC_TARGET)
        verifying = phase in (Phase.VERIFY_SOURCE, Phase.VERIFY_TARGET)
        left = oos if syncing else (self._sweep_left() if verifying else 0)
        now = self.clock()
        samples = [s for s in c.history if now - s[0] <= SYNC_RATE_WINDOW_S] + [(now, left)]
        pct, rate_blocks, eta = sync_progress(c.resync_started_blocks, left, samples)
        peer = {
            "node": self.peer_node,
            "connection": self.conn.value,
            "replication": self.repl.value,
            "role": self.peer_role.value,
            "disk": self.peer_disk.value,
            "out_of_sync_bytes": oos * BLOCK_BYTES,
            "sync_percent": round(pct, 1) if (syncing or verifying) else
            (100.0 if oos == 0 else 0.0),
            "sync_rate_bytes_per_s": int(rate_blocks * BLOCK_BYTES),
            "eta_s": round(eta, 1) if eta is not None and (syncing or verifying) else None,
            "resync_sent_bytes": c.resync_sent_bytes,
            "resync_received_bytes": c.resync_received_bytes,
            "pending_writes": len(self.tracker.pending),
            "unacked_bytes": self.tracker.pending_bytes,
            "last_decision": str(self.last_decision) if self.last_decision else None,
            "refusal": self.refusal or None,
            "split_brain": (self.last_decision is not None
                            and self.last_decision.sync is Sync.SPLIT_BRAIN
                            and self.conn is Conn.STANDALONE),
        }
        return {
            "name": self.name, "role": self.role.value, "disk": self.disk.value,
            "size_bytes": self.size_bytes, "nbd": nbd_uri if self.role is _PRIMARY else None,
            "protocol": self.cfg.protocol, "crashed_primary": self.crashed_primary,
            "generation": {"current": f"{self.gen.current:016X}",
                           "bitmap": f"{self.gen.bitmap:016X}",
                           "history": [f"{h:016X}" for h in self.gen.history]},
            "peers": [peer],
            "fencing": self.fence_status() or {"mode": "none"},
        }


