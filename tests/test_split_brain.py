"""Split brain between two real nodes (fencing = "none", a partition by nftables, both
promoted and written): DRBD's automatic recovery policies pick the victim, each decision
logged with its rule, and the victim keeps what the resync overwrote: `rblock splitbrain
export` writes its disk as it was before the resync, byte for byte (cmp with a copy taken
before the heal)."""

from __future__ import annotations

import os

import pytest

from tests.test_replication_admin import write_through
from tests.test_replication_failures import LinkCut, nft_usable

MIB = 1 << 20


def make_split_brain(c, alpha_mib: int, beta_mib: int, demote: tuple[str, ...]) -> dict:
    """Cut the link, promote beta, write ALPHA_MIB and BETA_MIB of random data from offset 0
    on each side, demote DEMOTE; the disks as they are then (before the heal)."""
    cut = LinkCut([c.ports["alpha"]["replication"], c.ports["beta"]["replication"]])
    cut.cut()
    try:
        for n in ("alpha", "beta"):
            c.wait(lambda n=n: c.peer(n)["connection"] != "Connected", timeout_s=15,
                   what=f"{n} sees the link gone")
        c.rblock("beta", "primary", "r0")  # UpToDate, no fencing: allowed (section 11)
        if alpha_mib:
            write_through(c, "alpha", 0, os.urandom(alpha_mib * MIB))
        if beta_mib:
            write_through(c, "beta", 0, os.urandom(beta_mib * MIB))
        for n in demote:
            c.rblock(n, "secondary", "r0")
        before = {n: c.disk(n).read_bytes() for n in ("alpha", "beta")}
    finally:
        cut.restore()
    return before


def check_victim_saved(c, victim: str, before: dict, tmp_path) -> None:
    snaps = c.rblock(victim, "splitbrain", "list", "r0").stdout
    assert snaps.startswith("1: ") and "complete" in snaps, snaps
    out = tmp_path / f"{victim}-before.img"
    c.rblock(victim, "splitbrain", "export", "r0", "1", "--out", str(out))
    assert out.read_bytes() == before[victim], "the export is not the victim's old disk"
    winner = "beta" if victim == "alpha" else "alpha"
    assert c.disk(victim).read_bytes() == before[winner]  # the resync took the winner's data
    c.rblock(victim, "splitbrain", "drop", "r0", "1")
    assert "no split-brain snapshots" in c.rblock(victim, "splitbrain", "list", "r0").stdout


@pytest.mark.parametrize("p0, p1, demote, alpha_mib, beta_mib, victim, rule", [
    ("discard-zero-changes", "disconnect", ("alpha", "beta"), 2, 0, "beta",
     "beta wrote nothing since the split"),
    ("discard-least-changes", "disconnect", ("alpha", "beta"), 1, 3, "alpha",
     "alpha changed fewer blocks"),
    ("discard-younger-primary", "disconnect", ("alpha", "beta"), 1, 2, "beta",
     "beta became Primary later"),
    ("disconnect", "discard-secondary", ("beta",), 1, 2, "beta", "beta is the Secondary"),
    ("discard-least-changes", "consensus", ("alpha",), 1, 3, "alpha", "consensus"),
], ids=["zero-changes", "least-changes", "younger-primary", "discard-secondary", "consensus"])
def test_policy_resolves_and_the_victim_keeps_its_data(cluster, tmp_path, p0, p1, demote,
                                                       alpha_mib, beta_mib, victim, rule):
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = cluster(size="16M", extra_resource=f'after_sb_0pri = "{p0}"\nafter_sb_1pri = "{p1}"\n')
    c.start_fresh()
    before = make_split_brain(c, alpha_mib, beta_mib, demote)
    c.wait_synced()
    log = c.log(victim)
    assert rule in log and "split brain (" in log and "saved first in" in log, log[-3000:]
    assert c.files_identical()
    check_victim_saved(c, victim, before, tmp_path)


def test_consensus_without_agreement_stays_split(cluster):
    """consensus: the 0pri policy would discard the Primary's changes: nothing is decided."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = cluster(size="16M", extra_resource='after_sb_0pri = "discard-least-changes"\n'
                                          'after_sb_1pri = "consensus"\n')
    c.start_fresh()
    make_split_brain(c, 3, 1, demote=("alpha",))  # least changes: beta, but it is Primary
    for n in ("alpha", "beta"):
        c.wait(lambda n=n: c.peer(n)["connection"] == "StandAlone", timeout_s=15,
               what=f"{n} StandAlone")
    assert c.peer("alpha")["split_brain"] is True


def test_discard_my_data_saves_the_victims_blocks(cluster, tmp_path):
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = cluster(size="16M")
    c.start_fresh()
    before = make_split_brain(c, 2, 1, demote=("alpha", "beta"))
    for n in ("alpha", "beta"):
        c.wait(lambda n=n: c.peer(n)["connection"] == "StandAlone", timeout_s=15,
               what=f"{n} StandAlone")
    c.rblock("beta", "connect", "r0", "--discard-my-data")
    c.rblock("alpha", "connect", "r0")
    c.wait_synced()
    assert c.files_identical()
    check_victim_saved(c, "beta", before, tmp_path)
