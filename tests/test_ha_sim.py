"""The HA planner and the agents' local rules in a deterministic simulation (tests/ha_world.py):
seeded power cuts, network cuts, agent crashes and clean stops, maintenance and requests;
then the failures stop. Safety at every tick: no guest runs on two nodes that both hold an
agent lease, nor with a writable disk on two nodes. Liveness: once failures stop, every HA
guest runs on exactly one node within a bounded number of ticks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvctl.ha.model import HaMode, Request, State
from tests.ha_world import GUESTS, TTL_TICKS, World

SETTLE_TICKS = 40  # leases run out (5), a recovery, a backoff or two, a restart


def settle(w: World) -> None:
    w.heal_all()
    for _ in range(SETTLE_TICKS):
        w.step()


def started_once(w: World) -> dict[str, str]:
    bad = {}
    for g in GUESTS:
        on = w.running_on(g)
        rec = w.records.get(g)
        if len(on) != 1 or rec is None or rec.state is not State.STARTED or rec.node != on[0]:
            bad[g] = f"runs on {on}, record {rec}"
    return bad


def run(seed: int, fault_ticks: int = 60) -> World:
    w = World(seed)
    trace = []
    for _ in range(fault_ticks):
        if w.rng.random() < 0.15:
            trace.append(f"t{w.tick}: {w.random_fault()}")
        w.step()
        assert not w.violations, (w.violations, trace, w.decisions[-10:])
    settle(w)
    assert not w.violations, (w.violations, trace)
    assert not started_once(w), (started_once(w), trace,
                                 [(d.guest, d.rule, d.text) for d in w.decisions[-12:]])
    return w


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_random_failures_never_two_copies_and_always_recover(seed):
    run(seed)


def test_first_start_places_on_the_preferred_node():
    w = World(1)
    for _ in range(3):
        w.step()
    assert w.running_on("vm1") == ["alpha"] and w.running_on("vm2") == ["alpha"]
    assert w.records["vm1"].state is State.STARTED


def test_power_cut_recovers_on_the_survivor_after_the_lease():
    w = World(2)
    for _ in range(3):
        w.step()
    w.power_off("alpha")
    w.nodes["alpha"].cut = True
    ticks = 0
    while w.running_on("vm1") != ["beta"]:
        w.step()
        ticks += 1
        assert ticks < 3 * TTL_TICKS, w.decisions
    assert ticks >= TTL_TICKS - 1  # not before alpha's lease ran out
    texts = [d.text for d in w.decisions if d.guest == "vm1"]
    assert any("alpha lost" in t and "recovering on beta" in t for t in texts), texts
    w.nodes["alpha"].cut = False
    w.power_on("alpha")
    for _ in range(10):
        w.step()
    assert w.running_on("vm1") == ["beta"]  # no failback
    assert not w.violations


def test_partition_self_fences_before_the_survivor_starts():
    w = World(3)
    for _ in range(3):
        w.step()
    w.nodes["alpha"].cut = True
    destroyed_at = started_at = None
    for _ in range(20):
        w.step()
        if destroyed_at is None and "vm1" not in w.nodes["alpha"].running:
            destroyed_at = w.tick
        if started_at is None and "vm1" in w.nodes["beta"].running:
            started_at = w.tick
    assert destroyed_at is not None and started_at is not None
    assert destroyed_at < started_at
    w.nodes["alpha"].cut = False
    for _ in range(10):
        w.step()
    assert w.running_on("vm1") == ["beta"] and not w.violations


def test_agent_crash_leaves_the_guest_running_and_the_restart_adopts_it():
    w = World(4)
    for _ in range(3):
        w.step()
    starts = dict(w.starts)
    w.agent_kill("alpha")
    for _ in range(3 * TTL_TICKS):
        w.step()
    assert w.records["vm1"].state is State.FENCE  # r0 still Primary under a live lease
    assert w.running_on("vm1") == ["alpha"]
    w.agent_start("alpha")
    for _ in range(5):
        w.step()
    assert w.records["vm1"].state is State.STARTED and w.running_on("vm1") == ["alpha"]
    assert w.starts == starts  # adopted, never restarted


def test_clean_agent_stop_freezes_its_guests():
    w = World(5)
    for _ in range(3):
        w.step()
    w.agent_stop("alpha")
    for _ in range(10):
        w.step()
    assert w.records["vm1"].state is State.FREEZE and w.running_on("vm1") == ["alpha"]
    w.agent_start("alpha")
    for _ in range(3):
        w.step()
    assert w.records["vm1"].state is State.STARTED


def test_maintenance_moves_guests_away_and_places_nothing_there():
    w = World(6)
    for _ in range(3):
        w.step()
    w.maintenance.add("alpha")
    for _ in range(6):
        w.step()
    assert w.running_on("vm1") == ["beta"] and w.running_on("vm2") == ["beta"]
    w.maintenance.discard("alpha")
    for _ in range(6):
        w.step()
    assert w.running_on("vm1") == ["beta"]  # no failback


def test_max_restart_then_relocation_then_error():
    w = World(7, max_restart=1, max_relocate=1)
    w.broken = {("alpha", "vm1"), ("beta", "vm1")}
    for _ in range(30):
        w.step()
    rec = w.records["vm1"]
    assert rec.state is State.ERROR and "max_restart 1 and max_relocate 1" in rec.reason, rec
    rules = [d.rule for d in w.decisions if d.guest == "vm1"]
    assert rules[:4] == ["start", "failed", "failed", "relocated"], rules
    w.broken.clear()
    w.requests["vm1"] = Request(HaMode.STARTED, None, 1)  # hvctl guest start vm1
    for _ in range(4):
        w.step()
    assert w.records["vm1"].state is State.STARTED


def test_refused_start_says_why():
    w = World(8)
    for n in w.nodes.values():
        n.disks["r0"] = "Inconsistent"
    for _ in range(3):
        w.step()
    rec = w.records["vm1"]
    assert rec.state is State.STOPPED
    assert rec.reason == "cannot start: r0 on alpha is Inconsistent; r0 on beta is Inconsistent"


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_long_runs(seed):
    run(seed, fault_ticks=300)
