"""The resource core's side of fencing (the rules are in rblock/replica/fencing.py): the
facts it feeds the rules, the single-copy writes it holds until they may go, and the
transactions it starts through its effects."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from rblock.replica.core_common import _NO_DISK, _PRIMARY, DECIDED, GuestWrite, Phase, log
from rblock.replica.effects import Event, ResourceError
from rblock.replica.fencing import Answer, Ev, Key, Step
from rblock.replica.state import Disk
from rblock.replica.writes import PendingWrite
from rblock.store.device import DeviceError


class Fence:
    """Fencing in the core: everything here is a no-op when `self.fence` is None."""

    def _fence_facts(self) -> None:
        """Called by _refresh: tell the rules whether this node would write alone."""
        f = self.fence
        if f is None or self.phase is Phase.HANDSHAKE:
            return  # a handshake decides where writes go; until then they wait anyway
        # (Not "link down": a link that is up but not decided yet replicates nothing.)
        alone = self.role is _PRIMARY and not (
            self.link_is_up and self.phase in DECIDED and self.peer_disk not in _NO_DISK
            and not self._peer_write_failed)
        uptodate = (self.link_is_up and self.phase is Phase.ESTABLISHED
                    and self.peer_disk is Disk.UPTODATE and not self._peer_write_failed)
        if alone == f.alone_needed and uptodate == f.peer_uptodate:
            return
        self._fence_apply(f.set_facts(alone, uptodate))

    def lease_changed(self, valid: bool) -> None:
        """Event: this node's etcd lease was granted (VALID) or ran out."""
        if self.fence is not None and valid != self.fence.lease_valid:
            self._fence_apply(self.fence.step(Ev.LEASE_GRANTED if valid else Ev.LEASE_LOST))

    def _fence_apply(self, st: Step) -> None:
        f = self.fence
        assert f is not None
        for what, detail in st.events:
            log.warning("%s: fencing: %s: %s (rule %s)", self.name, what, detail, st.rule)
            self.fx.emit(Event(self.name, what, "", f"{detail} (rule {st.rule})"))
        if st.txn is not None:
            kind = st.txn
            log.info("%s: fencing: %s in etcd (rule %s)", self.name, kind.value, st.rule)

            def answered(answer: Answer, _exc: BaseException | None) -> None:
                if self.fence is not None:
                    self._fence_apply(self.fence.step(answer.event, answer))
            self.fx.fence(self._op(answered), kind)
        if st.retry_s is not None:
            self.fx.set_timer("fence-retry", st.retry_s)
        if st.promoted is not None and self._fence_promote is not None:
            then, self._fence_promote = self._fence_promote, None
            then(st.promoted, st.reason)
        if st.demoted and self._fence_demote is not None:
            then_d, self._fence_demote = self._fence_demote, None
            then_d(st.reason)
        if (self._fence_held or self._fence_waiters) and (
                f.gate_open() or f.peer_uptodate or f.fail_single_copy()
                or self.role is not _PRIMARY):
            # Released from a timer, never from inside the handler that changed the facts.
            self.fx.set_timer("fence-gate", 0)

    def _fence_gate(self) -> None:
        """Timer: writes held for fencing go on or fail. A write not started yet (held in
        _route) goes on once single-copy writes may be acknowledged, or the peer replicates
        again (it then goes to both); one the peer never confirmed (lost with the link)
        only once single-copy writes may be acknowledged, or the resync has brought the
        peer up to date: until then it is on this copy alone. Under io-error they fail
        once a try to record the peer failed; on a demoted node they all fail."""
        f = self.fence
        if f is None:
            return
        primary = self.role is _PRIMARY
        alone_ok = primary and f.single_copy_ok()
        fail = not primary or f.fail_single_copy()
        why = (self._io_error_why() if primary else
               f"{self.name}: {self.node} was demoted while the write waited for fencing")
        if alone_ok or (primary and f.peer_uptodate) or fail:
            waiters, self._fence_waiters = self._fence_waiters, []
            for fn in waiters:
                fn(not fail or alone_ok or (primary and f.peer_uptodate), why)
        if alone_ok or (primary and not f.alone_needed) or fail:
            held, self._fence_held = self._fence_held, []
            for w in held:
                if primary and (alone_ok or not f.alone_needed):
                    self._route(w)
                else:
                    self._fail_write(w, why)

    def _io_error_why(self) -> str:
        f = self.fence
        assert f is not None
        return (f"{self.name}: I/O suspended on {self.node} ({f.suspended_why or f.last_reason})"
                f" and on_no_quorum = \"io-error\"")

    def _fence_holds(self, w: GuestWrite) -> bool:
        """Rule no-ack-lost: hold W, which only this node would hold, if it may not go now."""
        f = self.fence
        if f is None or f.single_copy_ok():
            return False
        if f.fail_single_copy():
            self._fail_write(w, self._io_error_why())
            return True
        self._fence_held.append(w)
        if not f.alone_needed:
            self._fence_facts()
        return True

    def _fence_wait(self, fn: Callable[[bool, str], None]) -> None:
        """Run FN(ok, why) once single-copy writes may be acknowledged (ok) or must fail."""
        f = self.fence
        if f is None or f.single_copy_ok():
            fn(True, "")
            return
        self._fence_waiters.append(fn)
        if f.fail_single_copy():
            self.fx.set_timer("fence-gate", 0)

    def _fail_lost(self, lost: list[PendingWrite], why: str) -> None:
        """Writes the peer never confirmed, under io-error: EIO, never acknowledged."""
        for pw in lost:
            on_ack = pw.on_ack
            if on_ack is None:
                continue
            if on_ack == self._fast_acked:
                pw.on_ack = None
                done, token, first, last, al = pw.ctx
                al.al_unpin_range(first, last)
                if self._al_full:
                    self._al_unpinned()
                self.tracker.close_epoch()
                done(token, DeviceError(errno.EIO, why))
                continue
            if isinstance(pw.ctx, GuestWrite):
                pw.ctx.error = DeviceError(errno.EIO, why)
            pw.on_ack = None
            on_ack(pw, False)

    # --- commands --------------------------------------------------------------------------------

    def _fence_take(self, ignore: bool, then: Callable[[bool, str], None]) -> None:
        """Rule one-writer: take the primary key, then THEN(ok, why)."""
        f = self.fence
        if f is None or f.key in (Key.HELD, Key.IGNORED):
            then(True, "")
            return
        if f.key is not Key.NONE:
            raise ResourceError(f"cannot promote {self.name} on {self.node}: its primary key "
                                f"is {f.key.value} in etcd; try again in a moment")
        self._fence_promote = then
        if ignore:
            log.error("%s: promoted on %s WITH FENCING IGNORED (--ignore-fencing): nothing "
                      "stops another node from being Primary too, and writes are "
                      "acknowledged on this copy alone", self.name, self.node)
        self._fence_apply(f.step(Ev.PROMOTE_IGNORING if ignore else Ev.PROMOTE))

    def _fence_release(self, then: Callable[[str], None]) -> None:
        """Rule release-on-demote: THEN(note) once the key is released (or given up on)."""
        f = self.fence
        if f is None:
            then("")
            return
        earlier = self._fence_demote
        if earlier is not None:  # (a failed promotion's release, still on its way)
            def both(note: str, first: Callable[[str], None] = earlier) -> None:
                first(note)
                then(note)
            self._fence_demote = both
        else:
            self._fence_demote = then
        self._fence_apply(f.step(Ev.DEMOTE))

    def fence_status(self) -> dict[str, Any] | None:
        f = self.fence
        if f is None:
            return None
        return {"mode": "etcd", "on_no_quorum": "io-error" if f.io_error else "suspend-io",
                "quorum": f.quorum, "lease": f.lease_valid, "primary_key": f.key.value,
                "holder": self.node if f.key is Key.HELD else (f.holder or None),
                "peer_outdated": [f.peer] if f.peer_record else [],
                "self_outdated": f.self_outdated,
                "io_suspended": f.suspended_since is not None,
                "io_suspended_for_s": (round(self.clock() - f.suspended_since, 3)
                                       if f.suspended_since is not None else None),
                "io_suspended_since": (round(self.wall_clock() - self.clock()
                                             + f.suspended_since, 3)
                                       if f.suspended_since is not None else None),
                "io_suspended_why": f.suspended_why or None,
                "held_writes": len(self._fence_held) + len(self._fence_waiters),
                "last_reason": f.last_reason or None}
