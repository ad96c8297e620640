"""`GET /metrics` of a node's control API (rblock/metrics.py), against real `rblock up` nodes
(tests/cluster.py): the scrape parses with prometheus_client's own parser, counters move by
exactly what a known workload did, histograms count every request, and the replication
gauges follow a disconnect, writes while disconnected, and the resync after it.

NBD requests go through tests/nbdwire.py's raw client (simple replies), so the test knows
every request the server saw: libnbd would add none, but this leaves no doubt.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from rblock.config import Address
from rblock.control_client import ControlClient, summarize_metrics
from tests import nbdwire

pytestmark = pytest.mark.slow

BLOCK = 4096
WRITES = 37  # N writes of B bytes
WRITE_BYTES = 3 * BLOCK
READS = 11
READ_BYTES = 2 * BLOCK
PIPELINED = 24  # then this many WRITE+READ pairs sent at once: batches, replies per pass
CMD_WRITE_ZEROES = 6  # the raw client's constants stop at FLUSH
SIZE_BYTES = 64 << 20

# Every family /metrics must have for a resource, with its type (rblock/metrics.py).
FAMILIES = {
    "rblock_reads": "counter", "rblock_read_bytes": "counter", "rblock_writes": "counter",
    "rblock_write_bytes": "counter", "rblock_request_seconds": "histogram",
    "rblock_request_errors": "counter", "rblock_nbd_clients": "gauge",
    "rblock_primary": "gauge", "rblock_disk_up_to_date": "gauge",
    "rblock_io_suspended": "gauge", "rblock_resource_info": "gauge",
    "rblock_peer_connected": "gauge", "rblock_peer_info": "gauge",
    "rblock_out_of_sync_bytes": "gauge", "rblock_resync_bytes": "counter",
    "rblock_resync_rate_bytes_per_second": "gauge", "rblock_replication_bytes": "counter",
    "rblock_peer_pending_writes": "gauge", "rblock_peer_unacked_bytes": "gauge",
    "process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge",
}


def scrape(c, node: str, accept: str = "") -> str:
    port = c.ports[node]["control"]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, parsed by prometheus_client."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def transmission(uri: str) -> nbdwire.Raw:
    """A raw NBD connection in transmission phase (fixed newstyle, OPT_GO, simple replies)."""
    raw = nbdwire.Raw(uri)
    raw.start()
    size, _tflags = raw.go("r0")
    assert size == SIZE_BYTES
    return raw


def write(raw: nbdwire.Raw, offset: int, data: bytes, handle: int) -> int:
    raw.request(nbdwire.CMD_WRITE, offset, len(data), handle, payload=data)
    error, got = raw.simple_reply()
    assert got == handle
    return error


def histogram(got: dict, res: dict, kind: str) -> tuple[list[tuple[float, float]], float]:
    """The cumulative buckets (le, count) of rblock_request_seconds{type=KIND}, its count."""
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in got.items()
                     if name == "rblock_request_seconds_bucket"
                     and dict(labels).get("type") == kind
                     and all(dict(labels).get(k) == x for k, x in res.items()))
    return buckets, value(got, "rblock_request_seconds_count", type=kind, **res)


def test_scrape_parses_and_counts_a_known_workload_exactly(cluster):
    c = cluster()
    c.start_fresh()
    res = {"resource": "r0", "node": "alpha"}
    before = samples(scrape(c, "alpha"))
    beta_before = samples(scrape(c, "beta"))

    with transmission(c.nbd_uri("alpha")) as raw:
        assert value(samples(scrape(c, "alpha")), "rblock_nbd_clients", **res) == 1
        for i in range(WRITES):  # N writes of B bytes, at distinct offsets
            assert write(raw, i * WRITE_BYTES, bytes([i]) * WRITE_BYTES, i + 1) == 0
        for i in range(READS):
            raw.request(nbdwire.CMD_READ, i * READ_BYTES, READ_BYTES, 1000 + i)
            assert raw.simple_reply() == (0, 1000 + i)
            raw.recv_exact(READ_BYTES)
        raw.request(nbdwire.CMD_FLUSH, handle=2000)
        assert raw.simple_reply() == (0, 2000)
        # Pipelined: the server finds many requests per receive, of two commands in turn,
        # and answers many per loop pass; each is still counted once.
        raw.send(b"".join(
            struct.pack(">IHHQQI", nbdwire.REQUEST_MAGIC, 0, nbdwire.CMD_WRITE, 4000 + i,
                        i * WRITE_BYTES, WRITE_BYTES) + bytes([i]) * WRITE_BYTES
            + struct.pack(">IHHQQI", nbdwire.REQUEST_MAGIC, 0, nbdwire.CMD_READ, 5000 + i,
                          i * READ_BYTES, READ_BYTES) for i in range(PIPELINED)))
        for _ in range(2 * PIPELINED):
            error, handle = raw.simple_reply()
            assert error == 0
            if handle >= 5000:
                raw.recv_exact(READ_BYTES)
        # Two refused requests: a WRITE past the end (ENOSPC) and an unknown command.
        assert write(raw, SIZE_BYTES, b"x" * BLOCK, 3000) != 0
        raw.request(99, 0, 0, 3001)
        assert raw.simple_reply()[1] == 3001
        raw.request(nbdwire.CMD_DISC)
        assert raw.wait_closed()

    text = scrape(c, "alpha")
    after = samples(text)
    # prometheus_client's parser read it (above); every family is there, with its type.
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {k: types.get(k) for k in FAMILIES} == FAMILIES

    writes, reads = WRITES + PIPELINED, READS + PIPELINED
    assert delta(after, before, "rblock_writes_total", **res) == writes
    assert delta(after, before, "rblock_write_bytes_total", **res) == writes * WRITE_BYTES
    assert delta(after, before, "rblock_reads_total", **res) == reads
    assert delta(after, before, "rblock_read_bytes_total", **res) == reads * READ_BYTES
    # The histograms count every request answered, the refused ones too.
    for kind, answered, errors in (("write", writes + 1, 1), ("read", reads, 0),
                                   ("flush", 1, 0), ("other", 1, 1), ("trim", 0, 0)):
        assert delta(after, before, "rblock_request_seconds_count", type=kind,
                     **res) == answered, kind
        assert delta(after, before, "rblock_request_errors_total", type=kind,
                     **res) == errors, kind
        buckets, count = histogram(after, res, kind)
        assert buckets[-1] == (float("inf"), count), kind
        assert [n for _, n in buckets] == sorted(n for _, n in buckets), kind  # cumulative
    write_sum_s = delta(after, before, "rblock_request_seconds_sum", type="write", **res)
    assert 0 < write_sum_s < writes  # each write took well under a second
    assert value(after, "rblock_nbd_clients", **res) == 0
    assert value(after, "rblock_primary", **res) == 1
    assert value(after, "rblock_disk_up_to_date", **res) == 1
    assert value(after, "rblock_io_suspended", **res) == 0
    assert value(after, "rblock_resource_info", role="Primary", disk="UpToDate",
                 protocol="C", **res) == 1
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "process_resident_memory_bytes") > 1 << 20

    # Protocol C: every write went over the link to beta (payload and frame headers).
    peer = {"resource": "r0", "node": "alpha", "peer": "beta"}
    assert delta(after, before, "rblock_replication_bytes_total", direction="sent",
                 **peer) >= WRITES * WRITE_BYTES
    beta = samples(scrape(c, "beta"))
    bres = {"resource": "r0", "node": "beta"}
    assert delta(beta, beta_before, "rblock_replication_bytes_total", direction="received",
                 resource="r0", node="beta", peer="alpha") >= WRITES * WRITE_BYTES
    assert value(beta, "rblock_writes_total", **bres) == 0  # no NBD client on a Secondary
    assert value(beta, "rblock_primary", **bres) == 0

    # The client's summary reads the same numbers.
    async def client_scrape() -> str:
        return await ControlClient(Address("127.0.0.1", c.ports["alpha"]["control"])).metrics()
    summary = summarize_metrics(asyncio.run(client_scrape()))
    r0 = summary["resources"]["r0"]
    assert summary["node"] == "alpha"
    assert r0["writes"] == value(after, "rblock_writes_total", **res)
    assert r0["write_bytes"] == value(after, "rblock_write_bytes_total", **res)
    assert r0["write_seconds_count"] == writes + 1 + value(
        before, "rblock_request_seconds_count", type="write", **res)
    assert r0["write_seconds_sum"] >= write_sum_s
    assert r0["peer_connected"] == 1 and r0["out_of_sync_bytes"] == 0
    assert {"resync_sent_bytes", "resync_received_bytes", "replication_sent_bytes",
            "replication_received_bytes", "write_errors", "flush_seconds_count"} <= set(r0)
    assert summary["process"]["resident_memory_bytes"] > 1 << 20

    # A scraper that asks for OpenMetrics gets it, and it parses as OpenMetrics.
    om = scrape(c, "alpha", "application/openmetrics-text; version=1.0.0")
    assert om.rstrip().endswith("# EOF")
    assert {f.name for f in openmetrics_families(om)} >= {"rblock_writes", "process_cpu_seconds"}


def test_out_of_sync_resync_and_peer_gauges_follow_a_disconnect(cluster):
    c = cluster()
    c.start_fresh()
    alpha = {"resource": "r0", "node": "alpha", "peer": "beta"}
    beta = {"resource": "r0", "node": "beta", "peer": "alpha"}
    before = samples(scrape(c, "alpha"))
    beta_before = samples(scrape(c, "beta"))
    assert value(before, "rblock_peer_connected", **alpha) == 1
    assert value(before, "rblock_out_of_sync_bytes", **alpha) == 0
    assert value(before, "rblock_peer_info", connection="Connected", replication="Established",
                 role="Secondary", disk="UpToDate", **alpha) == 1

    c.rblock("alpha", "disconnect", "r0")
    c.wait(lambda: value(samples(scrape(c, "alpha")), "rblock_peer_connected", **alpha) == 0
           and value(samples(scrape(c, "beta")), "rblock_peer_connected", **beta) == 0,
           what="both peer gauges at 0")
    blocks = 5
    with transmission(c.nbd_uri("alpha")) as raw:
        for i in range(blocks):  # one block each, 1 MiB apart: 5 distinct dirty blocks
            assert write(raw, i << 20, b"\x5a" * BLOCK, i + 1) == 0
        # A WRITE_ZEROES too: counted in its own histogram, and it dirties its block.
        raw.request(CMD_WRITE_ZEROES, 32 << 20, BLOCK, 100)
        assert raw.simple_reply() == (0, 100)
    dirty_bytes = (blocks + 1) * BLOCK
    mid = samples(scrape(c, "alpha"))
    assert value(mid, "rblock_out_of_sync_bytes", **alpha) == dirty_bytes
    assert value(mid, "rblock_peer_info", connection="StandAlone", replication="Off",
                 role="Unknown", disk="DUnknown", **alpha) == 1
    assert delta(mid, before, "rblock_request_seconds_count", type="write_zeroes",
                 resource="r0", node="alpha") == 1

    c.rblock("alpha", "connect", "r0")
    c.wait_synced()
    after = samples(scrape(c, "alpha"))
    beta_after = samples(scrape(c, "beta"))
    assert value(after, "rblock_peer_connected", **alpha) == 1
    assert value(beta_after, "rblock_peer_connected", **beta) == 1
    assert value(after, "rblock_out_of_sync_bytes", **alpha) == 0
    assert value(after, "rblock_resync_rate_bytes_per_second", **alpha) == 0  # none runs
    # Exactly the written blocks were resynced, alpha to beta: the zeroed one was zero on
    # both disks already (sparse), its checksums matched and it was skipped.
    assert delta(after, before, "rblock_resync_bytes_total", direction="sent",
                 **alpha) == blocks * BLOCK
    assert delta(beta_after, beta_before, "rblock_resync_bytes_total", direction="received",
                 **beta) == blocks * BLOCK

