"""The node's Prometheus metrics, served by the control API as `GET /metrics` (text format;
OpenMetrics to a scraper that asks for it), made with prometheus_client at scrape time.

Nothing here runs per request: the NBD server keeps plain-int counters (rblock/nbd/stats.py),
the resources keep their state and counters (Resource.status, Resource.link_bytes), and
`NodeCollector.collect` reads them when a scrape arrives. Each app has its own
CollectorRegistry (never prometheus_client's global one), so two nodes in one process (the
tests) do not mix.

Every rblock_ metric has the labels `resource` and `node` (the node serving the scrape);
per-peer ones also `peer`. Counters only grow for the life of the process (a restart starts
them at 0, which Prometheus' rate() handles).

NBD requests to this node's export of the resource (the guest's I/O; only a Primary has any):
  rblock_reads_total, rblock_writes_total        READ / WRITE requests answered successfully
  rblock_read_bytes_total, rblock_write_bytes_total   their payload bytes
  rblock_request_seconds{type}                   histogram of request-to-reply latency
        (rblock/nbd/stats.py says where it starts and ends), of every request answered,
        failed or not; type: read, write, flush, trim, cache, write_zeroes, block_status,
        other (an unknown command). Its _count is the number of requests of the type.
  rblock_request_errors_total{type}              requests answered with an NBD error
  rblock_nbd_clients                             NBD connections open to the export

The resource on this node:
  rblock_primary                 1 if this node is Primary for it, else 0
  rblock_disk_up_to_date         1 if the local disk is UpToDate, else 0
  rblock_io_suspended            1 while guest writes wait for etcd (fencing, suspend-io)
  rblock_resource_info{role, disk, protocol}   always 1; the labels say the state

Its peer (`peer`: the other node's name):
  rblock_peer_connected          1 while the peer link is Connected, else 0
  rblock_peer_info{connection, replication, role, disk}   always 1; the peer's state as this
        node sees it (connection StandAlone/Connecting/Connected, replication Off/Established/
        SyncSource/SyncTarget/VerifyS/VerifyT, the peer's role and disk)
  rblock_out_of_sync_bytes       bytes marked out of sync with the peer (the dirty bitmap)
  rblock_resync_bytes_total{direction}   resync data sent to (`sent`) or received from
        (`received`) the peer
  rblock_resync_rate_bytes_per_second    the resync's (or verify's) current rate, over the
        last seconds (what `rblock status` shows); 0 when none runs
  rblock_replication_bytes_total{direction}   every byte over the peer links (writes,
        resync, acks, pings; frame headers included), sent or received
  rblock_peer_pending_writes, rblock_peer_unacked_bytes   writes sent to the peer and not
        acknowledged yet, and their bytes

The node process (prometheus_client's ProcessCollector, from /proc; no extra labels):
  process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
  process_open_fds, process_max_fds, process_start_time_seconds
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rblock.nbd.stats import LATENCY_BOUNDS_NS, REQUEST_TYPES, RequestStats

NS_PER_S = 1e9
# `le` of each latency bucket, as Prometheus writes floats ("5e-06", ..., "10.0", "+Inf").
_LE = [floatToGoString(b / NS_PER_S) for b in LATENCY_BOUNDS_NS] + ["+Inf"]
_SWEEPING = ("SyncSource", "SyncTarget", "VerifyS", "VerifyT")  # replication states with a rate
_COUNTED_TYPES = [(i, t) for i, t in enumerate(REQUEST_TYPES) if t != "disc"]  # no reply


class MeteredResource(Protocol):
    """What the collector reads of a resource (rblock.replica.resource.Resource)."""

    def status(self, nbd_uri: str) -> dict: ...
    def link_bytes(self) -> tuple[int, int]: ...


class MeteredNode(Protocol):
    """What the collector reads of a node (rblock.node.Node)."""

    @property
    def name(self) -> str: ...
    @property
    def resources(self) -> Mapping[str, MeteredResource]: ...
    def nbd_uri(self, export: str) -> str: ...
    def nbd_clients(self, export: str) -> int: ...
    def request_stats(self, export: str) -> RequestStats | None: ...


class NodeCollector(Collector):
    """The rblock_ metrics of one node, read from it at each scrape."""

    def __init__(self, node: MeteredNode):
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        res = ["resource", "node"]
        peer = [*res, "peer"]
        c: dict[str, Metric] = {}

        def family(kind: Callable[..., Metric], name: str, doc: str, labels: list[str]) -> None:
            c[name] = kind(name, doc, labels=labels)

        family(CounterMetricFamily, "rblock_reads_total",
               "NBD READ requests answered successfully", res)
        family(CounterMetricFamily, "rblock_read_bytes_total",
               "Bytes read by successful NBD READ requests", res)
        family(CounterMetricFamily, "rblock_writes_total",
               "NBD WRITE requests answered successfully", res)
        family(CounterMetricFamily, "rblock_write_bytes_total",
               "Bytes written by successful NBD WRITE requests", res)
        family(HistogramMetricFamily, "rblock_request_seconds",
               "NBD request to reply latency, every request answered", [*res, "type"])
        family(CounterMetricFamily, "rblock_request_errors_total",
               "NBD requests answered with an error", [*res, "type"])
        family(GaugeMetricFamily, "rblock_nbd_clients", "NBD connections open to the export",
               res)
        family(GaugeMetricFamily, "rblock_primary", "1 if this node is Primary", res)
        family(GaugeMetricFamily, "rblock_disk_up_to_date", "1 if the local disk is UpToDate",
               res)
        family(GaugeMetricFamily, "rblock_io_suspended",
               "1 while guest writes wait for etcd (suspend-io)", res)
        family(GaugeMetricFamily, "rblock_resource_info",
               "The resource's state on this node (the labels; the value is 1)",
               [*res, "role", "disk", "protocol"])
        family(GaugeMetricFamily, "rblock_peer_connected", "1 while the peer link is Connected",
               peer)
        family(GaugeMetricFamily, "rblock_peer_info",
               "The peer's state as this node sees it (the labels; the value is 1)",
               [*peer, "connection", "replication", "role", "disk"])
        family(GaugeMetricFamily, "rblock_out_of_sync_bytes",
               "Bytes marked out of sync with the peer", peer)
        family(CounterMetricFamily, "rblock_resync_bytes_total",
               "Resync data sent to or received from the peer", [*peer, "direction"])
        family(GaugeMetricFamily, "rblock_resync_rate_bytes_per_second",
               "Current resync or verify rate (0 when none runs)", peer)
        family(CounterMetricFamily, "rblock_replication_bytes_total",
               "Bytes over the peer links, every frame", [*peer, "direction"])
        family(GaugeMetricFamily, "rblock_peer_pending_writes",
               "Writes sent to the peer, not acknowledged yet", peer)
        family(GaugeMetricFamily, "rblock_peer_unacked_bytes",
               "Bytes of the writes sent to the peer, not acknowledged yet", peer)

        for name, r in list(node.resources.items()):
            lv = [name, node.name]
            st = r.status(node.nbd_uri(name))
            stats = node.request_stats(name)
            if stats is not None:
                read, write = stats.ops[0], stats.ops[1]
                c["rblock_reads_total"].add_metric(lv, read.count - read.errors)
                c["rblock_read_bytes_total"].add_metric(lv, read.ok_bytes)
                c["rblock_writes_total"].add_metric(lv, write.count - write.errors)
                c["rblock_write_bytes_total"].add_metric(lv, write.ok_bytes)
                for i, kind in _COUNTED_TYPES:
                    op = stats.ops[i]
                    buckets = op.buckets.copy()  # one snapshot: cumulative sums agree
                    total = 0
                    cumulative = []
                    for le, n in zip(_LE, buckets, strict=True):
                        total += n
                        cumulative.append((le, total))
                    c["rblock_request_seconds"].add_metric([*lv, kind], cumulative,
                                                           op.sum_ns / NS_PER_S)
                    c["rblock_request_errors_total"].add_metric([*lv, kind], op.errors)
            c["rblock_nbd_clients"].add_metric(lv, node.nbd_clients(name))
            c["rblock_primary"].add_metric(lv, int(st["role"] == "Primary"))
            c["rblock_disk_up_to_date"].add_metric(lv, int(st["disk"] == "UpToDate"))
            c["rblock_io_suspended"].add_metric(lv, int(bool(st["fencing"].get("io_suspended"))))
            c["rblock_resource_info"].add_metric([*lv, st["role"], st["disk"], st["protocol"]],
                                                 1)
            sent, received = r.link_bytes()
            for p in st["peers"]:
                pv = [*lv, p["node"]]
                c["rblock_peer_connected"].add_metric(pv, int(p["connection"] == "Connected"))
                c["rblock_peer_info"].add_metric(
                    [*pv, p["connection"], p["replication"], p["role"], p["disk"]], 1)
                c["rblock_out_of_sync_bytes"].add_metric(pv, p["out_of_sync_bytes"])
                c["rblock_resync_bytes_total"].add_metric([*pv, "sent"], p["resync_sent_bytes"])
                c["rblock_resync_bytes_total"].add_metric([*pv, "received"],
                                                          p["resync_received_bytes"])
                # (status keeps the last resync's rate after it ended: 0 here once it has)
                c["rblock_resync_rate_bytes_per_second"].add_metric(
                    pv, p["sync_rate_bytes_per_s"] if p["replication"] in _SWEEPING else 0)
                c["rblock_replication_bytes_total"].add_metric([*pv, "sent"], sent)
                c["rblock_replication_bytes_total"].add_metric([*pv, "received"], received)
                c["rblock_peer_pending_writes"].add_metric(pv, p["pending_writes"])
                c["rblock_peer_unacked_bytes"].add_metric(pv, p["unacked_bytes"])
        yield from c.values()


def node_registry(node: MeteredNode) -> CollectorRegistry:
    """A registry of its own for NODE: its rblock_ metrics and its process' CPU and RSS."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape's body and Content-Type, in the format the ACCEPT header asks for (the
    text format 0.0.4 unless OpenMetrics is asked for)."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
