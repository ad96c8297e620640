"""The failover history, read from the HA decision log (hvctl/ha/keys.py keeps the newest
LOG_KEEP decisions). Pure.

A failover begins when a started guest's record leaves STARTED because its node was lost
(the planner's rules `fence` and `recover`: to FENCE, RECOVERY, or straight to STARTING on
another node), and ends at the guest's next STARTED (on the node that
took it) or at ERROR / STOPPED (it did not come back). Its duration runs from the decision
that the node was lost, so it leaves out the lease expiry that led to that decision
(benchmarks/ha_failover.py measures the whole, from the host's death).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

LOST_STATES = ("fence", "recovery")
LOST_RULES = ("fence", "recover")  # hvctl/ha/planner.py's rules for a node that is gone
ENDS = ("started", "error", "stopped")


def failovers(log: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """LOG: decisions oldest first ({"guest", "rule", "before", "after", "node", "text",
    "time"}, as HaView.log gives them). Newest failover first: {"guest", "from", "to",
    "began", "ended", "seconds", "why", "outcome" (started|error|stopped|under way)}."""
    open_: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    ran_on: dict[str, str | None] = {}  # guest -> the node of its last STARTED
    for d in log:
        g = d["guest"]
        if g not in open_:
            if d["before"] == "started" and (d["after"] in LOST_STATES
                                             or d["rule"] in LOST_RULES):
                lost = ran_on.get(g) or (d.get("node") if d["after"] == "fence" else None)
                open_[g] = {"guest": g, "from": lost, "to": None,
                            "began": d["time"], "ended": None, "seconds": None,
                            "why": d["text"], "outcome": "under way"}
            elif d["after"] == "started":
                ran_on[g] = d.get("node")
            continue
        f = open_[g]
        if d["after"] in ENDS:
            f.update(ended=d["time"], seconds=round(d["time"] - f["began"], 2),
                     outcome=d["after"], to=d.get("node") if d["after"] == "started" else None)
            if d["after"] != "started":
                f["why"] = f"{f['why']}; then: {d['text']}"
            done.append(open_.pop(g))
            ran_on[g] = d.get("node") if d["after"] == "started" else None
    done.extend(open_.values())
    return sorted(done, key=lambda f: f["began"], reverse=True)
