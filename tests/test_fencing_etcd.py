"""Fencing end to end: two real `rblock up` nodes, a real etcd (one member, or three), a
workload that records every acknowledged write (AckedWriter), SIGKILL and nftables cuts.

Each node reaches etcd on its own client ports (tests/etcd_cluster.py), so one node can be
cut off from etcd while the other still reaches it. Leases are 2 s (lease_ttl_s = 2).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.etcd_cluster import ETCD, EtcdCluster
from tests.test_replication_failures import (
    BLOCK,
    AckedWriter,
    LinkCut,
    check_region,
    nft_usable,
    read_file_range,
)

pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd-server is not installed")
TTL_S = 2
W_FIRST, W_BLOCKS = 0, 2048  # the AckedWriters' 8 MiB


def region_bytes(c, node: str, w: AckedWriter) -> bytes:
    return read_file_range(c.disk(node), w.first_block * BLOCK, w.block_count * BLOCK)


@pytest.fixture
def etcd1(tmp_path):
    e = EtcdCluster(tmp_path / "etcd", members=1)
    e.start()
    yield e
    e.stop()


def fenced_cluster(cluster, e: EtcdCluster, **kw):
    c = cluster(size="64M", protocol="C",
                prelude={n: e.toml(n, TTL_S) for n in ("alpha", "beta")}, **kw)
    c.start_fresh()
    return c


def link_cut(c, *more_ports: int) -> LinkCut:
    """The replication link between the nodes (and MORE_PORTS: a node's etcd ports)."""
    return LinkCut([c.ports["alpha"]["replication"], c.ports["beta"]["replication"],
                    *more_ports])


def fencing(c, node: str) -> dict:
    return c.res(node)["fencing"]


def promote(c, node: str) -> tuple[bool, str]:
    res = c.rblock(node, "primary", "r0", check=False)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


def wait_promoted(c, node: str, timeout_s: float) -> float:
    """Try `rblock primary` on NODE until it succeeds; the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        ok, last = promote(c, node)
        if ok:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{node} not promoted within {timeout_s}s: {last}")


def test_status_shows_fencing_and_the_lease(cluster, etcd1):
    c = fenced_cluster(cluster, etcd1)
    f = fencing(c, "alpha")
    assert f["mode"] == "etcd" and f["quorum"] is True and f["lease"] is True, f
    assert f["primary_key"] == "held" and f["holder"] == "alpha", f
    assert f["lease_until"] and f["io_suspended"] is False, f
    assert fencing(c, "beta")["primary_key"] == "none"
    text = c.rblock("alpha", "status").stdout
    assert "fencing:etcd quorum:yes lease:yes primary-key:held holder:alpha" in text, text
    ok, out = promote(c, "beta")
    assert not ok and "peer alpha is Primary" in out, out  # (connected: the disk check)


def test_link_cut_records_peer_outdated_then_resync_clears_it(cluster, etcd1):
    """Both reach etcd, the replication link is cut: the primary records beta Outdated and
    goes on after a bounded stall; beta's promotion is refused; after the heal the bitmap
    resync clears the record."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = fenced_cluster(cluster, etcd1)
    w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=8).start()
    cut = link_cut(c)
    try:
        c.wait(lambda: w.acked_count > 200, what="writes before the cut")
        cut.cut()
        t_cut = time.monotonic()
        c.wait(lambda: fencing(c, "alpha")["peer_outdated"] == ["beta"], timeout_s=20,
               what="beta recorded Outdated")
        n = w.acked_count
        c.wait(lambda: w.acked_count > n + 200, what="writes go on alone")
        gaps = [b - a for a, b in zip(w.ack_times, w.ack_times[1:], strict=False)
                if a >= t_cut - 1]
        print(f"longest write stall after the cut: {max(gaps):.2f}s")
        ok, out = promote(c, "beta")
        assert not ok and "beta is recorded Outdated in etcd" in out, out
        assert fencing(c, "beta")["self_outdated"] is True
    finally:
        cut.restore()
    c.wait_synced()
    c.wait(lambda: fencing(c, "alpha")["peer_outdated"] == [], what="the record cleared")
    w.stop()
    check_region(w, region_bytes(c, "beta", w))
    assert c.files_identical()


def test_primary_sigkill_promotion_waits_for_the_lease(cluster, etcd1):
    c = fenced_cluster(cluster, etcd1)
    w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=8).start()
    c.wait(lambda: w.acked_count > 300, what="writes before the kill")
    c.kill("alpha")
    t_kill = time.monotonic()
    w.stop(check=False)
    ok, out = promote(c, "beta")
    assert not ok and "held by alpha" in out, out
    took = wait_promoted(c, "beta", timeout_s=3 * TTL_S + 10)
    elapsed = time.monotonic() - t_kill
    print(f"primary SIGKILL to successful promotion of beta: {elapsed:.2f}s "
          f"(lease_ttl_s = {TTL_S}; retried for {took:.2f}s)")
    assert c.res("beta")["role"] == "Primary"
    check_region(w, region_bytes(c, "beta", w))


def test_primary_isolated_from_peer_and_etcd(cluster, etcd1):
    """The primary loses the peer and etcd at once: its writes are held (none acknowledged
    on its copy alone), beta is promoted once the lease expires and holds every acknowledged
    write; after the heal the old primary does not resume: it is demoted and resyncs."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = fenced_cluster(cluster, etcd1)
    w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=8).start()
    cut = link_cut(c, *etcd1.client_ports("alpha"))
    try:
        c.wait(lambda: w.acked_count > 300, what="writes before the cut")
        cut.cut()
        t_cut = time.monotonic()
        wait_promoted(c, "beta", timeout_s=3 * TTL_S + 15)
        print(f"isolation to successful promotion of beta: {time.monotonic() - t_cut:.2f}s")
        late = [t for t in w.ack_times if t > t_cut + 0.5]
        f = fencing(c, "alpha")
        assert f["io_suspended"] is True and f["lease"] is False, f
        # Acknowledged after the cut only what beta had confirmed before it (in flight).
        assert not late, f"{len(late)} writes acknowledged by the cut-off primary"
        snapshot = region_bytes(c, "beta", w)
        check_region(w, snapshot)
    finally:
        cut.restore()
    time.sleep(TTL_S)  # alpha reaches etcd again: it must not take the key back
    f = fencing(c, "alpha")
    assert f["primary_key"] == "deposed" and f["io_suspended"] is True, f
    assert not [t for t in w.ack_times if t > t_cut + 0.5]
    c.rblock("alpha", "secondary", "r0", "--force")
    w.stop(check=False)
    c.wait_synced()
    assert c.files_identical()
    assert c.res("beta")["role"] == "Primary"


def test_fencing_none_is_reported(cluster):
    c = cluster(size="16M", protocol="C")
    c.start_fresh()
    st = c.res("alpha")
    assert st["fencing"] == {"mode": "none"}
    assert "fencing:none" in c.rblock("alpha", "status").stdout
    log = c.logs["alpha"][0].read_text()
    assert 'fencing = "none"' in log, log[-2000:]


def test_rblock_events_carry_fencing_events(cluster, etcd1):
    """The JSON event stream has peer-outdated when the link is cut."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = fenced_cluster(cluster, etcd1)
    import subprocess
    import sys

    from tests.cluster import REPO
    ev = subprocess.Popen([sys.executable, "-m", "rblock", "events", "--json", "--config",
                           str(c.configs["alpha"]), "--node", "alpha"],
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    cut = link_cut(c)
    try:
        time.sleep(0.5)
        w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=4).start()
        c.wait(lambda: w.acked_count > 50, what="writes")
        cut.cut()
        c.wait(lambda: fencing(c, "alpha")["peer_outdated"] == ["beta"], timeout_s=20,
               what="beta recorded Outdated")
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = ev.stdout.readline()
            seen.append(json.loads(line)["what"])
            if "peer-outdated" in seen:
                break
        assert "io-suspended" in seen and "peer-outdated" in seen, seen
    finally:
        cut.restore()
        ev.kill()
        ev.wait()
    w.stop()


def test_etcd_members_stopped_one_by_one(cluster, tmp_path):
    """Three members: with two up nothing changes; with one (no quorum) a primary with a
    connected peer carries on, and one that also loses its peer suspends; etcd back: I/O
    resumes (the lease, the key and the Outdated record, in that order)."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    e = EtcdCluster(tmp_path / "etcd3", members=3)
    e.start()
    try:
        c = fenced_cluster(cluster, e)
        w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=8).start()
        c.wait(lambda: w.acked_count > 200, what="writes")
        e.stop_member(2)
        n = w.acked_count
        c.wait(lambda: w.acked_count > n + 300, what="writes with two members of three")
        assert fencing(c, "alpha")["lease"] is True
        e.stop_member(1)
        c.wait(lambda: fencing(c, "alpha")["lease"] is False, timeout_s=3 * TTL_S + 5,
               what="the lease runs out without a quorum")
        n = w.acked_count
        c.wait(lambda: w.acked_count > n + 300, what="writes go on with the peer connected")
        cut = link_cut(c)
        try:
            cut.cut()
            t_cut = time.monotonic()
            c.wait(lambda: fencing(c, "alpha")["io_suspended"] is True, timeout_s=10,
                   what="I/O suspended: no peer, no etcd")
            time.sleep(2.0)
            assert not [t for t in w.ack_times if t > t_cut + 0.5], "acknowledged alone"
            t_back = time.monotonic()
            e.start_member(1)
            e.start_member(2)
            e.wait_healthy()
            c.wait(lambda: w.ack_times and w.ack_times[-1] > t_back, timeout_s=20,
                   what="I/O resumes once etcd is back")
            print(f"etcd members restarted to the first write acknowledged: "
                  f"{min(t for t in w.ack_times if t > t_back) - t_back:.2f}s")
            assert fencing(c, "alpha")["peer_outdated"] == ["beta"]
        finally:
            cut.restore()
        c.wait_synced()
        w.stop()
        check_region(w, region_bytes(c, "beta", w))
        assert c.files_identical()
    finally:
        e.stop()


def test_io_error_fails_single_copy_writes_when_etcd_is_gone(cluster, etcd1):
    """on_no_quorum = "io-error": the primary cut off from the peer and etcd fails the writes
    it cannot record (EIO), never acknowledges them, and keeps serving none alone."""
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = fenced_cluster(cluster, etcd1, extra_resource='on_no_quorum = "io-error"\n')
    w = AckedWriter(c.nbd_uri("alpha"), W_FIRST, W_BLOCKS, depth=4).start()
    cut = link_cut(c, *etcd1.client_ports("alpha"))
    try:
        c.wait(lambda: w.acked_count > 100, what="writes before the cut")
        cut.cut()
        t_cut = time.monotonic()
        c.wait(lambda: bool(w.errors) or bool(w.failure), timeout_s=20,
               what="writes fail with EIO")
        assert all(e == 5 for _b, _c, e in w.errors), w.errors  # EIO
        assert not [t for t in w.ack_times if t > t_cut + 0.5]
        f = fencing(c, "alpha")
        assert f["on_no_quorum"] == "io-error" and f["io_suspended"] is True, f
        assert f["io_suspended_since"] > time.time() - 60, f
    finally:
        cut.restore()
    w.stop(check=False)


def test_ignore_fencing_is_the_only_way_without_etcd(cluster, etcd1):
    """etcd gone for good: promotion is refused (even with --force), and --ignore-fencing
    promotes, loudly."""
    c = fenced_cluster(cluster, etcd1)
    c.rblock("alpha", "secondary", "r0")
    etcd1.stop()
    c.wait(lambda: fencing(c, "beta")["lease"] is False, timeout_s=3 * TTL_S + 5,
           what="beta's lease runs out")
    ok, out = promote(c, "beta")
    assert not ok and "no etcd lease" in out, out
    res = c.rblock("beta", "primary", "r0", "--force", check=False)
    assert res.returncode != 0 and "no etcd lease" in res.stderr, res.stderr
    c.rblock("beta", "primary", "r0", "--ignore-fencing")
    f = fencing(c, "beta")
    assert c.res("beta")["role"] == "Primary" and f["primary_key"] == "ignored", f
    assert "WITH FENCING IGNORED" in c.log("beta")
    c.rblock("beta", "secondary", "r0")
    assert fencing(c, "beta")["primary_key"] == "none"
