"""Roles, disk and connection states, and the decisions taken on them. Pure: no I/O, no await.

Theory of operation
-------------------
Each node keeps generation UUIDs for its data (DRBD's scheme):

- `current`: names the data as it is now. A fresh disk has UUID_JUST_CREATED.
- `bitmap`: the generation the dirty bitmap counts changes from; 0 while nothing is tracked.
- `history`: older generations, newest first (at most HISTORY_MAX).

A new current UUID is generated when data starts to diverge from what the peer has: a
primary losing its peer, a node promoted while disconnected, a forced first promotion. When a
resync ends, the target takes the source's current UUID and both sides clear `bitmap`.

When two nodes connect, `decide(local, peer)` compares their UUIDs through the rule table
`RULES`, first match wins, and says: nothing to do, bitmap resync one way, full sync one
way, split brain (both wrote since they parted: refuse, never merge), or unrelated data.
The table is symmetric: `decide(a, b)` and `decide(b, a)` always agree on the direction, so
both nodes reach the same decision without another round trip (tested with hypothesis).
Every decision carries the name of the rule that made it, for the log. When the UUIDs leave
no usable direction but exactly one disk is Inconsistent, the disk states decide (as in
DRBD): the consistent node is the source, so an invalidated node always gets its data back.

`check_promote` says whether a node may become primary, and why not.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

UUID_JUST_CREATED = 4  # DRBD's marker for "metadata created, no data yet"
HISTORY_MAX = 2


class Role(enum.Enum):
    PRIMARY = "Primary"
    SECONDARY = "Secondary"
    UNKNOWN = "Unknown"  # a peer we are not connected to


class Disk(enum.Enum):
    DISKLESS = "Diskless"  # no local disk: it failed (detached) or was never attached
    FAILED = "Failed"  # an I/O error: being detached (then Diskless)
    INCONSISTENT = "Inconsistent"  # fresh, or a resync target that has not finished
    OUTDATED = "Outdated"  # consistent, but known to miss writes the peer has
    UPTODATE = "UpToDate"
    UNKNOWN = "DUnknown"  # a peer's disk while disconnected


class Conn(enum.Enum):
    STANDALONE = "StandAlone"  # not trying to connect (disconnect, split brain)
    CONNECTING = "Connecting"
    CONNECTED = "Connected"


class Repl(enum.Enum):
    OFF = "Off"
    ESTABLISHED = "Established"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    VERIFY_SOURCE = "VerifyS"
    VERIFY_TARGET = "VerifyT"


PERSISTED_DISK = {"inconsistent": Disk.INCONSISTENT, "outdated": Disk.OUTDATED,
                  "uptodate": Disk.UPTODATE}
DISK_PERSISTED = {v: k for k, v in PERSISTED_DISK.items()}


def new_uuid() -> int:
    """A random 64-bit generation UUID, never one of the reserved small values."""
    while True:
        u = secrets.randbits(64) & ~1  # DRBD keeps bit 0 for flags; we keep it clear too
        if u > 0xFFFF:
            return u


@dataclass(frozen=True, slots=True)
class Generation:
    current: int = UUID_JUST_CREATED
    bitmap: int = 0
    history: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert len(self.history) <= HISTORY_MAX
        assert all(0 <= u < 2**64 for u in (self.current, self.bitmap, *self.history))

    @property
    def fresh(self) -> bool:
        return self.current == UUID_JUST_CREATED

    def rotated(self, new_current: int | None = None) -> Generation:
        """Start a new data generation (data begins to differ from the peer's).
        The bitmap keeps counting from the oldest generation the peer may still have: if it
        already tracks one, the old current goes to history instead."""
        cur = new_current if new_current is not None else new_uuid()
        if self.bitmap == 0:
            return Generation(cur, self.current, self.history)
        return Generation(cur, self.bitmap, _push(self.history, self.current))

    def synced_from(self, source: Generation) -> Generation:
        """The target's UUIDs after a completed resync from SOURCE."""
        return Generation(source.current, 0, _push(source.history, self.current)
                          if self.current not in (UUID_JUST_CREATED, source.current)
                          else source.history)

    def sync_source_done(self) -> Generation:
        """The source's UUIDs after a completed resync: nothing to track any more."""
        if self.bitmap == 0:
            return self
        return Generation(self.current, 0, _push(self.history, self.bitmap))

    def to_json(self) -> dict:
        return {"current": self.current, "bitmap": self.bitmap, "history": list(self.history)}

    @classmethod
    def from_json(cls, d: dict) -> Generation:
        return cls(int(d["current"]), int(d["bitmap"]), tuple(int(h) for h in d["history"]))


def _push(history: tuple[int, ...], uuid: int) -> tuple[int, ...]:
    if uuid in (0, UUID_JUST_CREATED):
        return history
    return ((uuid,) + tuple(h for h in history if h != uuid))[:HISTORY_MAX]


@dataclass(frozen=True, slots=True)
class Side:
    """What a node tells its peer at connect time."""

    node: str
    gen: Generation
    disk: Disk
    role: Role = Role.SECONDARY
    crashed_primary: bool = False  # was primary and did not stop cleanly
    out_of_sync_blocks: int = 0
    discard_my_data: bool = False  # 'connect --discard-my-data': lose a split brain
    protocol: str = "C"  # the resource's protocol in this node's config
    promoted_at: float = 0.0  # unix time this node last became Primary (0: never)

    def to_json(self) -> dict:
        return {"node": self.node, "gen": self.gen.to_json(), "disk": self.disk.value,
                "role": self.role.value, "crashed_primary": self.crashed_primary,
                "out_of_sync_blocks": self.out_of_sync_blocks,
                "discard_my_data": self.discard_my_data, "protocol": self.protocol,
                "promoted_at": self.promoted_at}

    @classmethod
    def from_json(cls, d: dict) -> Side:
        return cls(str(d["node"]), Generation.from_json(d["gen"]), Disk(d["disk"]),
                   Role(d["role"]), bool(d["crashed_primary"]), int(d["out_of_sync_blocks"]),
                   bool(d["discard_my_data"]), str(d["protocol"]),
                   float(d.get("promoted_at", 0.0)))

    @property
    def consistent(self) -> bool:
        return self.disk in (Disk.UPTODATE, Disk.OUTDATED)


class Sync(enum.Enum):
    NONE = "no sync"
    BITMAP_SOURCE = "bitmap resync, this node is the source"
    BITMAP_TARGET = "bitmap resync, this node is the target"
    FULL_SOURCE = "full sync, this node is the source"
    FULL_TARGET = "full sync, this node is the target"
    NO_DATA = "neither node has data yet; promote one with --force"
    SPLIT_BRAIN = "split brain: both nodes wrote since they parted"
    UNRELATED = "unrelated data: the nodes share no generation"
    NO_GOOD_DATA = "no node has consistent data to sync from"
    BOTH_DISCARD = ("both nodes were told to discard their data (connect --discard-my-data "
                    "on both); give it on one node only")
    DISKLESS = "a node has no disk: nothing to sync, it uses its peer's disk"

    @property
    def connects(self) -> bool:
        """Whether replication may start (writes flow to the peer)."""
        return self not in (Sync.SPLIT_BRAIN, Sync.UNRELATED, Sync.BOTH_DISCARD)

    @property
    def mirror(self) -> Sync:
        return _MIRROR.get(self, self)


_MIRROR = {Sync.BITMAP_SOURCE: Sync.BITMAP_TARGET, Sync.BITMAP_TARGET: Sync.BITMAP_SOURCE,
           Sync.FULL_SOURCE: Sync.FULL_TARGET, Sync.FULL_TARGET: Sync.FULL_SOURCE}


@dataclass(frozen=True, slots=True)
class Decision:
    sync: Sync
    rule: str

    def __str__(self) -> str:
        return f"{self.sync.value} (rule {self.rule})"


def _source_if(local_is_source: bool, bitmap: bool) -> Sync:
    if bitmap:
        return Sync.BITMAP_SOURCE if local_is_source else Sync.BITMAP_TARGET
    return Sync.FULL_SOURCE if local_is_source else Sync.FULL_TARGET


def _both_fresh(a: Side, b: Side) -> Sync | None:
    return Sync.NO_DATA if a.gen.fresh and b.gen.fresh else None


def _one_fresh(a: Side, b: Side) -> Sync | None:
    if b.gen.fresh and not a.gen.fresh:
        return Sync.FULL_SOURCE if a.consistent else Sync.NO_GOOD_DATA
    if a.gen.fresh and not b.gen.fresh:
        return Sync.FULL_TARGET if b.consistent else Sync.NO_GOOD_DATA
    return None


def _same_current(a: Side, b: Side) -> Sync | None:
    """Same generation: at most some blocks differ (interrupted resync, crashed primary,
    verify findings); the bitmaps of both sides say which."""
    if a.gen.current != b.gen.current:
        return None
    if a.consistent != b.consistent:
        return _source_if(a.consistent, bitmap=True)
    if not a.consistent:
        return Sync.NO_GOOD_DATA
    if {a.disk, b.disk} == {Disk.UPTODATE, Disk.OUTDATED}:
        # The Outdated one knows it misses writes (its disk failed, or it was cut off by
        # its primary): the UpToDate one is the source, whoever is Primary.
        return _source_if(a.disk is Disk.UPTODATE, bitmap=True)
    if a.crashed_primary != b.crashed_primary:
        if a.role != b.role and Role.PRIMARY in (a.role, b.role):
            # A Primary now (promoted while the crashed one was away, with fencing's
            # consent) holds acknowledged writes; the crashed one's extra blocks were never
            # acknowledged beyond what it replicated: the Primary is the source (its bitmap
            # and the crashed node's activity log, merged, cover every difference).
            return _source_if(a.role is Role.PRIMARY, bitmap=True)
        # The crashed primary may hold writes that never reached the peer (its activity log
        # extents): it is the source, as in DRBD.
        return _source_if(a.crashed_primary, bitmap=True)
    if a.out_of_sync_blocks or b.out_of_sync_blocks or a.crashed_primary:
        # Both consistent and something differs: the primary's data wins, else the node
        # whose name sorts first, so both sides pick the same direction.
        if a.role != b.role and Role.PRIMARY in (a.role, b.role):
            return _source_if(a.role is Role.PRIMARY, bitmap=True)
        return _source_if(a.node < b.node, bitmap=True)
    return Sync.NONE


def _peer_moved_on(a: Side, b: Side) -> Sync | None:
    """One side started a new generation from the other's current one; its bitmap holds every
    block written since."""
    peer_from_ours = b.gen.bitmap != 0 and b.gen.bitmap == a.gen.current
    ours_from_peer = a.gen.bitmap != 0 and a.gen.bitmap == b.gen.current
    if peer_from_ours and ours_from_peer:
        return Sync.SPLIT_BRAIN  # each claims to descend from the other: cannot be ordered
    if peer_from_ours:
        return Sync.BITMAP_TARGET if b.consistent else Sync.NO_GOOD_DATA
    if ours_from_peer:
        return Sync.BITMAP_SOURCE if a.consistent else Sync.NO_GOOD_DATA
    return None


def _both_moved_on(a: Side, b: Side) -> Sync | None:
    """Both started new generations from the same parent: both wrote. Never merged."""
    if a.gen.bitmap and a.gen.bitmap == b.gen.bitmap:
        return Sync.SPLIT_BRAIN
    return None


def _in_history(a: Side, b: Side) -> Sync | None:
    """One side's data is an ancestor of the other's, further back than a bitmap covers."""
    ours_older = a.gen.current in b.gen.history
    peer_older = b.gen.current in a.gen.history
    if ours_older and peer_older:
        return Sync.SPLIT_BRAIN
    if ours_older:
        return Sync.FULL_TARGET if b.consistent else Sync.NO_GOOD_DATA
    if peer_older:
        return Sync.FULL_SOURCE if a.consistent else Sync.NO_GOOD_DATA
    return None


def _shared_ancestor(a: Side, b: Side) -> Sync | None:
    ours = {a.gen.bitmap, *a.gen.history} - {0}
    theirs = {b.gen.bitmap, *b.gen.history} - {0}
    return Sync.SPLIT_BRAIN if ours & theirs else None


# name -> rule; the first rule that returns a Sync decides.
RULES: list[tuple[str, Callable[[Side, Side], Sync | None]]] = [
    ("both-fresh", _both_fresh),
    ("one-fresh", _one_fresh),
    ("same-current", _same_current),
    ("bitmap-from-current", _peer_moved_on),
    ("same-bitmap", _both_moved_on),
    ("current-in-history", _in_history),
    ("shared-ancestor", _shared_ancestor),
]


# Rules after which the two data sets are known to differ only where the bitmaps say: a sync
# decided by disk states may then copy just those blocks (the others need the whole disk).
_BITMAP_RULES = ("same-current", "bitmap-from-current")


def _by_disk_states(a: Side, b: Side, sync: Sync, rule: str) -> Sync | None:
    """DRBD's "Becoming sync source/target due to disk states": when exactly one node is
    Inconsistent and the UUIDs found no usable direction (NO_GOOD_DATA: the inconsistent one
    holds the newer generation; SPLIT_BRAIN: both moved on), the consistent node is the
    source. An Inconsistent disk holds no complete image of any generation, so there is
    nothing on it to keep; this is how an invalidated node (`rblock invalidate`) and a
    primary whose resync from the peer was interrupted get their data back. The
    inconsistent node's bitmap holds every block it changed or has not received (bits are
    only cleared for blocks equal on both nodes), so after a bitmap rule the union of both
    bitmaps covers every difference. Unrelated data (no rule matched) stays refused: it may
    be the wrong peer."""
    if sync not in (Sync.NO_GOOD_DATA, Sync.SPLIT_BRAIN):
        return None
    if a.consistent == b.consistent or Disk.INCONSISTENT not in (a.disk, b.disk):
        return None
    if (a.gen.fresh and a.consistent) or (b.gen.fresh and b.consistent):
        return None  # a "consistent" fresh disk holds nothing to copy (not a real state)
    bitmap = sync is Sync.NO_GOOD_DATA and rule in _BITMAP_RULES
    return _source_if(a.consistent, bitmap=bitmap)


def _by_discard(a: Side, b: Side, sync: Sync, rule: str) -> Sync | None:
    """DRBD's `connect --discard-my-data`: it resolves a split brain (or unrelated data, where
    the operator knows better) in favour of the other node. It never resets the victim to
    "just created", which would let two different copies connect as equal: the victim is
    the sync target, with a bitmap resync where both bitmaps count from the generation the
    nodes parted at (rule same-bitmap: their union holds every block either wrote), a full
    one otherwise. Given on both nodes it is refused: there would be no survivor. Outside a
    split brain it changes nothing (the table already knows the direction)."""
    if not (a.discard_my_data or b.discard_my_data):
        return None
    if sync not in (Sync.SPLIT_BRAIN, Sync.UNRELATED):
        return None
    if a.discard_my_data and b.discard_my_data:
        return Sync.BOTH_DISCARD
    return _source_if(b.discard_my_data, bitmap=rule == "same-bitmap")


# Automatic split-brain recovery, DRBD's after-sb-0pri / after-sb-1pri (off by default:
# "disconnect"). Both nodes read the same policies, so both pick the same victim. (The
# names are rblock/config.py's too, which checks them.)
AFTER_SB_0PRI = ("disconnect", "discard-zero-changes", "discard-least-changes",
                 "discard-younger-primary")
AFTER_SB_1PRI = ("disconnect", "consensus", "discard-secondary")


@dataclass(frozen=True, slots=True)
class SplitBrainPolicy:
    after_sb_0pri: str = "disconnect"
    after_sb_1pri: str = "disconnect"


def _victim_0pri(a: Side, b: Side, policy: str) -> tuple[str | None, str]:
    """Which node's changes are thrown away under POLICY (None: none, disconnect), and why.
    The changes of a node are the blocks its bitmap counts since the nodes parted."""
    ca, cb = a.out_of_sync_blocks, b.out_of_sync_blocks
    if policy == "discard-zero-changes":
        if (ca == 0) != (cb == 0):
            v = a if ca == 0 else b
            return v.node, f"{v.node} wrote nothing since the split"
        if ca == 0:
            v = max(a, b, key=lambda s: s.node)  # neither wrote: any direction keeps all
            return v.node, "neither node wrote since the split"
        return None, f"both nodes wrote since the split ({ca} and {cb} blocks)"
    if policy == "discard-least-changes":
        if ca != cb:
            v = a if ca < cb else b
            return v.node, (f"{v.node} changed fewer blocks since the split "
                            f"({min(ca, cb)} against {max(ca, cb)})")
        return None, f"both nodes changed {ca} blocks"
    if policy == "discard-younger-primary":
        if a.promoted_at and b.promoted_at and a.promoted_at != b.promoted_at:
            v = a if a.promoted_at > b.promoted_at else b
            return v.node, f"{v.node} became Primary later"
        return None, "which node became Primary later is not known"
    return None, "policy disconnect"


def _by_policy(a: Side, b: Side, sync: Sync, rule: str,
               policy: SplitBrainPolicy) -> Decision | None:
    """after-sb-0pri / after-sb-1pri: a split brain resolved by policy, the victim the
    sync target (bitmap resync after rule same-bitmap, a full one otherwise). A Primary is
    never the victim: with two Primaries the nodes disconnect."""
    if sync is not Sync.SPLIT_BRAIN:
        return None
    primaries = [s for s in (a, b) if s.role is Role.PRIMARY]
    if not primaries:
        victim, why = _victim_0pri(a, b, policy.after_sb_0pri)
        name = f"after-sb-0pri {policy.after_sb_0pri}"
    elif len(primaries) == 1:
        secondary = b if primaries[0] is a else a
        name = f"after-sb-1pri {policy.after_sb_1pri}"
        if policy.after_sb_1pri == "discard-secondary":
            victim, why = secondary.node, f"{secondary.node} is the Secondary"
        elif policy.after_sb_1pri == "consensus":
            victim, why = _victim_0pri(a, b, policy.after_sb_0pri)
            if victim != secondary.node:
                return None  # the 0pri policy would discard the Primary: no consensus
            why = f"{why}, and it is the Secondary (after-sb-0pri {policy.after_sb_0pri})"
        else:
            return None
    else:
        return None
    if victim is None:
        return None
    return Decision(_source_if(victim == b.node, bitmap=rule == "same-bitmap"),
                    f"{name}: {why}; after {rule}")


def decide(local: Side, peer: Side, policy: SplitBrainPolicy | None = None) -> Decision:
    if Disk.DISKLESS in (local.disk, peer.disk):
        return Decision(Sync.DISKLESS, "diskless")
    sync, name = Sync.UNRELATED, "no-match"
    for rule_name, rule in RULES:
        found = rule(local, peer)
        if found is not None:
            sync, name = found, rule_name
            break
    by_disks = _by_disk_states(local, peer, sync, name)
    if by_disks is not None:
        return Decision(by_disks, f"disk-states after {name}")
    by_discard = _by_discard(local, peer, sync, name)
    if by_discard is not None:
        return Decision(by_discard, f"discard-my-data after {name}")
    if policy is not None:
        by_policy = _by_policy(local, peer, sync, name, policy)
        if by_policy is not None:
            return by_policy
    return Decision(sync, name)


@dataclass(frozen=True, slots=True)
class PromoteCheck:
    ok: bool
    reason: str = ""
    forced_fresh: bool = False  # the first promotion of fresh data: start a generation


def check_promote(role: Role, disk: Disk, gen: Generation, conn: Conn, repl: Repl,
                  peer_role: Role, peer_disk: Disk, peer_node: str, force: bool,
                  out_of_sync_bytes: int = 0) -> PromoteCheck:
    """May this node become primary? The reason names what is wrong and what to do.
    OUT_OF_SYNC_BYTES: this node's dirty bitmap, which on an Inconsistent disk counts what a
    resync has not copied yet."""
    if role is Role.PRIMARY and not (force and disk is Disk.OUTDATED):
        return PromoteCheck(True, "already Primary")
    connected = conn is Conn.CONNECTED
    if connected and peer_role is Role.PRIMARY and role is not Role.PRIMARY:
        return PromoteCheck(False, f"peer {peer_node} is Primary; make it secondary first "
                                   f"('rblock secondary' on {peer_node})")
    if disk in (Disk.DISKLESS, Disk.FAILED):
        if connected and peer_disk is Disk.UPTODATE and repl is not Repl.OFF:
            return PromoteCheck(True, f"no local disk: reads and writes go to {peer_node}")
        return PromoteCheck(False, f"this node has no disk (it failed or was detached) and "
                                   f"no connected peer with an UpToDate disk; attach one "
                                   f"('rblock attach') or connect {peer_node}")
    if connected and repl is Repl.SYNC_TARGET:
        return PromoteCheck(False, f"this node's data is older than {peer_node}'s (resync from "
                                   f"it is running); wait for the resync to finish")
    if disk is Disk.UPTODATE:
        return PromoteCheck(True)
    missing = f"{out_of_sync_bytes / 2**20:.1f} MiB"
    if disk is Disk.INCONSISTENT and gen.fresh and out_of_sync_bytes == 0:
        if force and (not connected or peer_disk is Disk.INCONSISTENT):
            return PromoteCheck(True, "forced: first promotion of fresh data", forced_fresh=True)
        if force:
            return PromoteCheck(False, f"the disk holds no data yet and {peer_node}'s disk is "
                                       f"{peer_disk.value}: it is synced from there; wait "
                                       f"for that sync")
        return PromoteCheck(False, "the disk holds no data yet; the first promotion of fresh "
                                   "data needs --force")
    if disk is Disk.INCONSISTENT:
        what = ("a full sync from the peer into it did not finish" if gen.fresh
                else "a resync from the peer into it did not finish")
        if force:
            return PromoteCheck(True, f"forced: an Inconsistent disk becomes the good data "
                                      f"({what}; {missing} never arrived and keep their old "
                                      f"contents)")
        return PromoteCheck(False, f"the disk is Inconsistent: {what} ({missing} still to "
                                   f"copy), so it is part new data and part old. Connect to "
                                   f"{peer_node} and let the resync finish; --force would "
                                   f"serve this partial copy as good data and lose the rest")
    if disk is Disk.OUTDATED and force:
        return PromoteCheck(True, "forced: promoting an Outdated disk")
    return PromoteCheck(False, f"local disk is {disk.value}, not UpToDate"
                               + ("; it is resyncing from the peer" if repl is Repl.SYNC_TARGET
                                  else "; connect to a peer with good data to resync it"))


@dataclass
class PeerCounters:
    """Per-peer numbers shown by `rblock status`."""

    sent_bytes: int = 0
    received_bytes: int = 0
    resync_sent_bytes: int = 0
    resync_received_bytes: int = 0
    pending_writes: int = 0  # sent, not yet acked
    unacked_bytes: int = 0
    resync_started_blocks: int = 0  # out-of-sync blocks when the resync began
    history: list[tuple[float, int]] = field(default_factory=list)  # (time_s, oos blocks)

    def reset_resync(self, blocks: int) -> None:
        self.resync_started_blocks = blocks
        self.history.clear()


def sync_progress(started_blocks: int, left_blocks: int,
                  samples: list[tuple[float, int]]) -> tuple[float, float, float | None]:
    """(percent done, rate in blocks/s, eta in s) from (time, blocks left) samples."""
    pct = 100.0 if started_blocks == 0 else 100.0 * (started_blocks - left_blocks) / started_blocks
    rate = 0.0
    if len(samples) >= 2:
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        if t1 > t0:
            rate = max(0.0, (b0 - b1) / (t1 - t0))
    eta = left_blocks / rate if rate > 0 else None
    return max(0.0, min(100.0, pct)), rate, eta


def with_disk(side: Side, disk: Disk) -> Side:
    return replace(side, disk=disk)
