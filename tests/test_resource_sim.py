"""The resource core under the deterministic simulator (tests/simulation.py): two nodes, a
guest, a flaky network, failing disks and power cuts, every choice drawn from one seed.

Each run checks the invariants listed in simulation.py at every step (no acknowledged
write missing from a node that may be promoted, no difference between the disks that no
bitmap marks, the disks identical once everything is healed and resynced). hypothesis
picks the seeds (derandomized: the same seeds on every run, so CI is stable); a seed that
ever failed stays in REGRESSION_SEEDS with the bug it found. RBLOCK_SIM_EXAMPLES=N and
RBLOCK_SIM_SECONDS=S run more and longer schedules (the long version).
"""

from __future__ import annotations

import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.simulation import World

RUN_S = float(os.environ.get("RBLOCK_SIM_SECONDS", "8"))
REGRESSION_RUN_S = 5.0  # the seeds below failed runs of this length (5 s of virtual time)
EXAMPLES = int(os.environ.get("RBLOCK_SIM_EXAMPLES", "150"))

# Seeds that found a bug while the core was written, with the bug; replayed exactly (runs
# of REGRESSION_RUN_S, except those in LONG_SEEDS: 20 s).
REGRESSION_SEEDS = {
    0: "a node that detached its disk kept answering bitmap chunks with a size check on a "
       "bitmap it no longer had",
    5: "the sweep's answers to a stopped resync were protocol errors; a detached Inconsistent "
       "disk was marked Outdated",
    8: "a write whose local copy landed on a disk that failed afterwards was acknowledged "
       "with no other copy",
    28: "a Diskless write's apply ack cleared a bit on the resync target's own disk",
    30: "a disk attached while connected to a peer without good data started no resync",
    31: "the flush check must skip writes the node lost in its own power cut",
    33: "a generation rotated at every reconnect to a Diskless peer ran out of history: "
        "unrelated data",
    71: "SYNC_DONE made the source take an Outdated target for UpToDate",
    103: "a Diskless node served through a peer whose data was older than what it served",
    149: "a primary losing its peer mid-resync rotated no generation: its peer, whose "
         "resync had finished unheard, passed for holding the newer writes",
    188: "a promotion whose superblock write failed left a Diskless Primary with no peer",
    262: "a write that waited for a new generation slipped past the handshake's bitmap",
    389: "writes completed at link loss were acknowledged before their new generation was "
         "durable",
    568: "an attached disk was restored to UpToDate although writes had gone through the "
         "peer while it was away",
    623: "the bitmap reached the disk before the resynced blocks it claimed (rule "
         "durable-before-claim)",
    630: "a detached disk's metadata was not marked Outdated before writes went on without it",
    711: "range locks taken synchronously were never released (lost lock reference)",
    734: "a peer that died after applying a write but before the ack is not a failed ack",
    972: "an UpToDate and an Outdated disk with the same generation: the Primary's won",
    1241: "a detached disk whose metadata failed too: only fencing can keep it from "
          "promotion (the operator here stays away from it)",
    2010: "a disk attached Inconsistent after writes went elsewhere served stale blocks",
    2154: "a Diskless primary serves its peer's disk: the peer's losses are what it can lose",
    3145: "an attached disk came back UpToDate from its superblock, whose update had failed "
          "with the disk, although this run had detached it mid-resync (Inconsistent)",
    3183: "an attached disk came back better than this run knew it (found by the attach "
          "invariant, fixed with 3145)",
    3265: "the same as 3183",
}


LONG_SEEDS = (2010, 2154, 3145, 3183, 3265)


@pytest.fixture(autouse=True)
def _quiet_core_logs(caplog):
    # The core logs every fault it handles; thousands of schedules would drown the report.
    logging.getLogger("rblock").setLevel(logging.CRITICAL)
    yield
    logging.getLogger("rblock").setLevel(logging.NOTSET)


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_regression_seed(seed):
    World(seed).run(20.0 if seed in LONG_SEEDS else REGRESSION_RUN_S)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**63 - 1))
def test_random_schedules(seed):
    World(seed).run(RUN_S)


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**63 - 1))
def test_random_schedules_network_faults_only(seed):
    """No crash and no disk fault: every write must be acknowledged, and still no block may
    go missing (this isolates the link: cuts, partitions, late frames, reconnects)."""
    w = World(seed, crashes=False, disk_faults=False)
    w.run(RUN_S)
    assert w.failed_writes == 0, f"seed {seed}: {w.failed_writes} writes failed"


AL_PRESSURE = dict(al_extents=2, guest_depth=16, late_meta_results=True)


@settings(max_examples=max(10, EXAMPLES // 5), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**63 - 1))
def test_activity_log_pressure_quiet_network(seed):
    """More guest writes in flight (16) than activity-log extents (2), metadata results
    reaching the core after the operation ran (as from the shell's worker thread), and no
    fault that would wake a stuck write by other means: every write completes. With the
    retry of an update that found the log full while an extent was unpinned removed
    (core_guest.py, "Unpinned while the update ran"), this fails: the writes wait for good,
    as fio at iodepth 32 with al_extents = 16 did."""
    w = World(seed, faults=False, crashes=False, disk_faults=False, **AL_PRESSURE)
    w.run(RUN_S)
    assert w.failed_writes == 0, f"seed {seed}: {w.failed_writes} writes failed"


@settings(max_examples=max(10, EXAMPLES // 5), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**63 - 1))
def test_activity_log_pressure_with_faults(seed):
    World(seed, **AL_PRESSURE).run(RUN_S)
