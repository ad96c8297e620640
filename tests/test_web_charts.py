"""hvctl/web/charts.py: rates from the nodes' counters, over a window."""

from __future__ import annotations

from hvctl.web.charts import Charts


def scrape(writes: float, lat_sum: float, resync: float = 0.0) -> dict:
    return {"node": "alpha", "resources": {"r0": {
        "writes": writes, "write_seconds_sum": lat_sum, "write_seconds_count": writes,
        "resync_sent_bytes": resync}}}


def test_rates_from_differences_and_a_window():
    c = Charts(window_s=10)
    c.add(100.0, "alpha", scrape(0, 0.0))
    assert c.series() == {}  # one scrape is no rate yet
    c.add(102.0, "alpha", scrape(2000, 0.2, resync=8 << 20))
    assert c.latest() == {"r0@alpha": {"t": 102.0, "write_iops": 1000.0,
                                       "write_latency_ms": 0.1, "sync_bytes_per_s": 4 << 20}}
    c.add(103.0, "alpha", scrape(2000, 0.2, resync=8 << 20))  # idle: no latency to show
    assert c.latest()["r0@alpha"]["write_latency_ms"] is None
    assert c.latest()["r0@alpha"]["write_iops"] == 0.0
    for t in range(104, 120):
        c.add(float(t), "alpha", scrape(2000 + t, 0.2))
    s = c.series()["r0@alpha"]
    assert s["t"][0] >= 119 - 10 and s["t"][-1] == 119.0 and len(s["t"]) == len(s["write_iops"])


def test_a_restarted_node_does_not_draw_a_negative_rate():
    c = Charts()
    c.add(1.0, "alpha", scrape(5000, 1.0))
    c.add(2.0, "alpha", scrape(10, 0.001))  # counters started again
    assert c.series() == {}
    c.add(3.0, "alpha", scrape(110, 0.011))
    assert c.latest()["r0@alpha"]["write_iops"] == 100.0
