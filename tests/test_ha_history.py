"""The failover history read from the HA decision log (hvctl/ha/history.py)."""

from hvctl.ha.history import failovers


def d(t, before, after, node, text="", guest="vm1"):
    return {"guest": guest, "rule": "r", "before": before, "after": after, "node": node,
            "text": text or f"{before}->{after}", "time": t}


def test_a_failover_from_lost_to_started_elsewhere():
    log = [d(1, "stopped", "starting", "alpha"), d(2, "starting", "started", "alpha"),
           d(10, "started", "fence", "alpha", "alpha lost"),
           d(11, "fence", "recovery", None), d(11.5, "recovery", "starting", "beta"),
           d(14.25, "starting", "started", "beta")]
    assert failovers(log) == [{"guest": "vm1", "from": "alpha", "to": "beta", "began": 10,
                               "ended": 14.25, "seconds": 4.25, "why": "alpha lost",
                               "outcome": "started"}]


def test_one_under_way_one_that_failed_newest_first_and_guests_apart():
    log = [d(2, "starting", "started", "alpha"), d(3, "starting", "started", "beta", guest="vm2"),
           d(10, "started", "recovery", None, "alpha fenced"),
           d(12, "recovery", "error", None, "no node can take it"),
           d(20, "started", "fence", "beta", "beta lost", guest="vm2")]
    f = failovers(log)
    assert [x["guest"] for x in f] == ["vm2", "vm1"]
    assert f[0]["outcome"] == "under way" and f[0]["from"] == "beta" and f[0]["ended"] is None
    assert f[1]["from"] == "alpha" and f[1]["outcome"] == "error" and f[1]["to"] is None
    assert "no node can take it" in f[1]["why"]


def test_a_move_or_a_stop_is_not_a_failover():
    log = [d(2, "starting", "started", "alpha"), d(3, "started", "relocate", "beta"),
           d(5, "relocate", "starting", "beta"), d(6, "starting", "started", "beta"),
           d(7, "started", "stopping", "beta"), d(8, "stopping", "stopped", None)]
    assert failovers(log) == []


def test_a_fenced_node_straight_to_starting_elsewhere():
    """What the browser test's log held: 'beta lost ...; recovering on alpha' (rule
    recover, started -> starting on alpha), then running on alpha."""
    log = [d(1, "starting", "started", "beta"),
           {**d(5, "started", "starting", "alpha", "beta lost; recovering on alpha"),
            "rule": "recover"},
           d(6.5, "starting", "started", "alpha")]
    assert failovers(log) == [{"guest": "vm1", "from": "beta", "to": "alpha", "began": 5,
                               "ended": 6.5, "seconds": 1.5,
                               "why": "beta lost; recovering on alpha", "outcome": "started"}]
