"""The generation-UUID decision table and promotion rules, as pure functions (hypothesis)."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from rblock.replica.state import (
    AFTER_SB_0PRI,
    AFTER_SB_1PRI,
    UUID_JUST_CREATED,
    Conn,
    Disk,
    Generation,
    Repl,
    Role,
    Side,
    SplitBrainPolicy,
    Sync,
    check_promote,
    decide,
)

# A small UUID space so that rules about equal UUIDs actually fire.
uuids = st.sampled_from([0, UUID_JUST_CREATED, 0x10001, 0x20002, 0x30003, 0x40004])
gens = st.builds(lambda c, b, h: Generation(c, b, tuple(dict.fromkeys(x for x in h if x))),
                 uuids.filter(lambda u: u != 0), uuids,
                 st.lists(uuids, max_size=2))
disks = st.sampled_from([Disk.UPTODATE, Disk.OUTDATED, Disk.INCONSISTENT])
roles = st.sampled_from([Role.PRIMARY, Role.SECONDARY])


def sides(node: str):
    return st.builds(Side, st.just(node), gens, disks, roles, st.booleans(),
                     st.integers(0, 3))


@given(a=sides("alpha"), b=sides("beta"))
def test_both_nodes_reach_the_same_decision(a, b):
    da, db = decide(a, b), decide(b, a)
    assert da.sync.mirror == db.sync, (da, db)
    assert da.rule == db.rule


@given(a=sides("alpha"), b=sides("beta"))
def test_a_sync_source_always_has_consistent_data(a, b):
    d = decide(a, b).sync
    if d in (Sync.BITMAP_SOURCE, Sync.FULL_SOURCE):
        assert a.consistent
    if d in (Sync.BITMAP_TARGET, Sync.FULL_TARGET):
        assert b.consistent


@given(a=sides("alpha"), b=sides("beta"))
def test_an_inconsistent_node_next_to_a_consistent_one_is_synced_from_it(a, b):
    """Whatever the UUIDs say (short of unrelated data or no data at all), an Inconsistent
    node connected to a consistent one of the same lineage becomes its sync target: it must
    never end up connected with nothing flowing ("no node has consistent data")."""
    assume({a.disk, b.disk} & {Disk.INCONSISTENT} and a.consistent != b.consistent)
    d = decide(a, b)
    assume(d.sync not in (Sync.UNRELATED, Sync.NO_DATA))
    assume(not (a.consistent and a.gen.fresh) and not (b.consistent and b.gen.fresh))
    if a.consistent:
        assert d.sync in (Sync.BITMAP_SOURCE, Sync.FULL_SOURCE), d
    else:
        assert d.sync in (Sync.BITMAP_TARGET, Sync.FULL_TARGET), d


@given(a=sides("alpha"), b=sides("beta"))
def test_no_sync_only_when_nothing_is_out_of_sync(a, b):
    """The resource asserts this when a connect decides "no sync": Established with blocks
    out of sync and nothing syncing them must come from a visible decision, never this one."""
    if decide(a, b).sync is Sync.NONE:
        assert a.out_of_sync_blocks == 0 and b.out_of_sync_blocks == 0
        assert a.consistent and b.consistent


def side(node, gen, disk=Disk.UPTODATE, **kw):
    return Side(node, gen, disk, **kw)


def test_fresh_nodes_wait_for_force():
    a = side("a", Generation(), Disk.INCONSISTENT)
    b = side("b", Generation(), Disk.INCONSISTENT)
    assert decide(a, b).sync is Sync.NO_DATA


def test_forced_primary_fully_syncs_a_fresh_peer():
    a = side("a", Generation(0x10001))
    b = side("b", Generation(), Disk.INCONSISTENT)
    assert decide(a, b).sync is Sync.FULL_SOURCE and decide(b, a).sync is Sync.FULL_TARGET


def test_primary_that_went_on_alone_resyncs_its_bitmap():
    start = Generation(0x10001)
    primary = side("a", start.rotated(0x20002), role=Role.PRIMARY)  # lost its peer, wrote on
    secondary = side("b", start)
    d = decide(primary, secondary)
    assert d.sync is Sync.BITMAP_SOURCE and d.rule == "bitmap-from-current"


def test_both_wrote_after_parting_is_split_brain():
    start = Generation(0x10001)
    a = side("a", start.rotated(0x20002))
    b = side("b", start.rotated(0x30003))
    assert decide(a, b).sync is Sync.SPLIT_BRAIN and not Sync.SPLIT_BRAIN.connects


def test_crashed_primary_is_the_source_for_its_activity_log():
    g = Generation(0x10001)
    a = side("a", g, crashed_primary=True, out_of_sync_blocks=5)
    b = side("b", g)
    assert decide(a, b).sync is Sync.BITMAP_SOURCE


def test_promoted_survivor_resyncs_the_returning_crashed_primary():
    g = Generation(0x10001)
    survivor = side("b", g.rotated(0x20002), role=Role.PRIMARY)
    old_primary = side("a", g, crashed_primary=True, out_of_sync_blocks=3)
    assert decide(old_primary, survivor).sync is Sync.BITMAP_TARGET


def test_sync_end_makes_uuids_equal():
    g = Generation(0x10001)
    src = g.rotated(0x20002)
    tgt = g
    assert tgt.synced_from(src).current == src.sync_source_done().current
    assert src.sync_source_done().bitmap == 0


def test_unrelated_data():
    assert decide(side("a", Generation(0x10001)),
                  side("b", Generation(0x20002))).sync is Sync.UNRELATED


@given(gen=gens)
def test_rotation_keeps_a_bitmap_generation(gen):
    assume(not gen.fresh)
    r = gen.rotated()
    assert r.bitmap != 0 and r.current != gen.current
    assert r.bitmap in (gen.current, gen.bitmap)


def promote(**kw):
    args = dict(role=Role.SECONDARY, disk=Disk.UPTODATE, gen=Generation(0x10001),
                conn=Conn.CONNECTED, repl=Repl.ESTABLISHED, peer_role=Role.SECONDARY,
                peer_disk=Disk.UPTODATE, peer_node="beta", force=False)
    args.update(kw)
    return check_promote(**args)


def test_promotion_rules():
    assert promote().ok
    r = promote(peer_role=Role.PRIMARY)
    assert not r.ok and "beta is Primary" in r.reason
    r = promote(repl=Repl.SYNC_TARGET, disk=Disk.INCONSISTENT)
    assert not r.ok and "older" in r.reason
    r = promote(disk=Disk.INCONSISTENT, gen=Generation(), peer_disk=Disk.INCONSISTENT)
    assert not r.ok and "--force" in r.reason
    r = promote(disk=Disk.INCONSISTENT, gen=Generation(), peer_disk=Disk.INCONSISTENT,
                force=True)
    assert r.ok and r.forced_fresh
    r = promote(disk=Disk.OUTDATED, conn=Conn.CONNECTING, peer_role=Role.UNKNOWN)
    assert not r.ok and "Outdated" in r.reason


def test_invalidated_primary_resyncs_from_its_peer_after_a_reconnect():
    """The bug of issue 3: 'rblock invalidate' on a connected primary, then the link drops
    (the primary starts a new generation, as any primary losing its peer does): the
    secondary's data is the good one, and the bitmaps say what to copy."""
    g = Generation(0x10001)
    primary = side("alpha", g.rotated(0x20002), Disk.INCONSISTENT, role=Role.PRIMARY,
                   out_of_sync_blocks=1000)
    secondary = side("beta", g)
    d = decide(primary, secondary)
    assert d.sync is Sync.BITMAP_TARGET, d
    assert d.rule == "disk-states after bitmap-from-current"
    assert decide(secondary, primary).sync is Sync.BITMAP_SOURCE


def test_invalidated_node_after_a_split_brain_gets_a_full_sync():
    g = Generation(0x10001)
    a = side("a", g.rotated(0x20002))
    b = side("b", g.rotated(0x30003), Disk.INCONSISTENT)  # invalidated: its changes go
    assert decide(a, b).sync is Sync.FULL_SOURCE
    assert decide(b, a).sync is Sync.FULL_TARGET


def test_two_inconsistent_nodes_still_have_no_good_data():
    g = Generation(0x10001)
    a = side("a", g.rotated(0x20002), Disk.INCONSISTENT)
    b = side("b", g, Disk.INCONSISTENT)
    assert decide(a, b).sync is Sync.NO_GOOD_DATA


# --- the secondary's apply order (ApplyQueue) ------------------------------------------------


def _reference_startable(entries, started, done):
    """The module docstring's three rules, checked the slow way against every entry."""
    out = []
    for i, e in enumerate(entries):
        if e.key in started or e.key in done:
            continue
        before = [x for x in entries[:i] if x.key not in done]
        if any(x.epoch < e.epoch for x in before):
            continue
        if e.barrier and before:
            continue
        if any(x.barrier for x in before):
            continue
        if not e.barrier and any(x.offset < e.offset + e.length and e.offset < x.offset + x.length
                                 for x in before):
            continue
        out.append(e.key)
    return out


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 7), st.integers(1, 3),
              st.booleans()),
    st.tuples(st.just("done"), st.integers(0, 50)),
    st.tuples(st.just("start")),
), max_size=60)


@given(ops)
def test_apply_queue_starts_exactly_what_the_ordering_rules_allow(seq):
    """ApplyQueue.startable (which looks only at the oldest epoch) against the rules applied
    to the whole queue; its entries then start in arrival order, never two overlapping
    ones at once, never across an epoch or a barrier."""
    from rblock.replica.writes import ApplyQueue

    q = ApplyQueue()
    entries, started, done = [], set(), set()
    epoch = 1
    for op in seq:
        if op[0] == "add":
            _, step, block, blocks, barrier = op
            epoch += step
            barrier = barrier and step == 0 and block == 0  # barriers now and then
            entries.append(q.add(epoch, block * 4096, 0 if barrier else blocks * 4096, barrier,
                                 0 if barrier else blocks * 4096))
        elif op[0] == "done":
            running = sorted(started - done)
            if running:
                key = running[op[1] % len(running)]
                q.done(key)
                done.add(key)
        else:
            want = _reference_startable(entries, started, done)
            got = [e.key for e in q.startable()]
            assert got == want, (got, want)
            started.update(got)
    assert len(q) == len(entries) - len(done)


# --- automatic split-brain recovery (after-sb-0pri / after-sb-1pri) -------------------------

policies = st.builds(SplitBrainPolicy, st.sampled_from(AFTER_SB_0PRI),
                     st.sampled_from(AFTER_SB_1PRI))


def sb_sides(node: str):
    return st.builds(Side, st.just(node), gens, disks, roles, st.booleans(),
                     st.integers(0, 3), st.just(False), st.just("C"),
                     st.sampled_from([0.0, 100.0, 200.0]))


@given(a=sb_sides("alpha"), b=sb_sides("beta"), p=policies)
def test_split_brain_policies_pick_the_same_victim_on_both_nodes(a, b, p):
    da, db = decide(a, b, p), decide(b, a, p)
    assert da.sync.mirror == db.sync and da.rule == db.rule, (da, db)
    if da.rule.startswith("after-sb"):
        assert decide(a, b).sync is Sync.SPLIT_BRAIN  # policies only act on a split brain
        victim = a if da.sync in (Sync.BITMAP_TARGET, Sync.FULL_TARGET) else b
        assert victim.role is not Role.PRIMARY, da  # a Primary is never the victim


def _sb(node: str, changes: int, role: Role = Role.SECONDARY, promoted_at: float = 0.0) -> Side:
    # Both moved on from the generation they parted at: rule same-bitmap.
    return Side(node, Generation(0x30003 if node == "alpha" else 0x40004, 0x20002), Disk.UPTODATE,
                role, False, changes, False, "C", promoted_at)


def test_each_policy_with_its_rule():
    p0 = SplitBrainPolicy
    d = decide(_sb("alpha", 0), _sb("beta", 5), p0("discard-zero-changes"))
    assert d.sync is Sync.BITMAP_TARGET and d.rule.startswith(
        "after-sb-0pri discard-zero-changes: alpha wrote nothing since the split"), d
    d = decide(_sb("alpha", 7), _sb("beta", 5), p0("discard-zero-changes"))
    assert d.sync is Sync.SPLIT_BRAIN
    d = decide(_sb("alpha", 7), _sb("beta", 5), p0("discard-least-changes"))
    assert d.sync is Sync.BITMAP_SOURCE and "beta changed fewer blocks" in d.rule, d
    d = decide(_sb("alpha", 5), _sb("beta", 5), p0("discard-least-changes"))
    assert d.sync is Sync.SPLIT_BRAIN
    d = decide(_sb("alpha", 1, promoted_at=200.0), _sb("beta", 9, promoted_at=100.0),
               p0("discard-younger-primary"))
    assert d.sync is Sync.BITMAP_TARGET and "alpha became Primary later" in d.rule, d
    d = decide(_sb("alpha", 1, Role.PRIMARY), _sb("beta", 9),
               p0("disconnect", "discard-secondary"))
    assert d.sync is Sync.BITMAP_SOURCE and "beta is the Secondary" in d.rule, d
    # consensus: the 0pri policy must pick the Secondary, or nothing happens.
    d = decide(_sb("alpha", 9, Role.PRIMARY), _sb("beta", 1),
               p0("discard-least-changes", "consensus"))
    assert d.sync is Sync.BITMAP_SOURCE and "consensus" in d.rule, d
    d = decide(_sb("alpha", 1, Role.PRIMARY), _sb("beta", 9),
               p0("discard-least-changes", "consensus"))
    assert d.sync is Sync.SPLIT_BRAIN
    assert decide(_sb("alpha", 0), _sb("beta", 5)).sync is Sync.SPLIT_BRAIN  # off by default


def test_a_primary_wins_over_a_crashed_former_primary():
    """Seed 1219 of the fencing simulator: the crashed former primary (now Secondary) must
    not overwrite the Primary promoted meanwhile on the same generation."""
    g = Generation(0x30003, 0, (0x20002,))
    crashed = Side("alpha", g, Disk.UPTODATE, Role.SECONDARY, True, 8)
    primary = Side("beta", g, Disk.UPTODATE, Role.PRIMARY, False, 3)
    assert decide(primary, crashed).sync is Sync.BITMAP_SOURCE
    assert decide(crashed, primary).sync is Sync.BITMAP_TARGET
    both_secondary = Side("beta", g, Disk.UPTODATE, Role.SECONDARY, False, 3)
    assert decide(crashed, both_secondary).sync is Sync.BITMAP_SOURCE  # as in DRBD
