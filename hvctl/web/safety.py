"""A guest's safety level, from its disks' rblock status on every node. Pure.

- protected: every disk is UpToDate on a second node, connected, nothing out of sync, and
  fencing is on (etcd): if the guest's host dies now, it runs again on the other with every
  write it was told was done.
- degraded: a second copy exists but lags: Outdated, or a resync under way (its percent and
  ETA); a failover now would have to wait for it, or lose what it lacks.
- unprotected: no connected second copy, or fencing off (a cut link could let both sides
  write).
The worst disk decides; the reason names it.
"""

from __future__ import annotations

from collections.abc import Mapping

LEVELS = ("protected", "degraded", "unprotected")


def disk_safety(resource: str, statuses: Mapping[str, dict]) -> tuple[str, str]:
    """(level, why) of RESOURCE; STATUSES: node -> that node's status of it ({} if the node
    cannot be asked)."""
    known = {n: s for n, s in statuses.items() if s}
    if not known:
        return "unprotected", f"{resource}: no node answers"
    primary = next((n for n, s in known.items() if s.get("role") == "Primary"), None)
    node = primary or next(iter(known))
    st = known[node]
    peers = st.get("peers") or []
    if not peers:
        return "unprotected", f"{resource}: no second copy"
    p = peers[0]
    other = p.get("node", "the peer")
    if st.get("disk") != "UpToDate":
        return "unprotected", f"{resource} on {node} is {st.get('disk')}"
    if p.get("connection") != "Connected":
        return "unprotected", f"{resource}: {other} not connected ({p.get('connection')})"
    if p.get("disk") != "UpToDate" or p.get("out_of_sync_bytes"):
        pct = p.get("sync_percent")
        eta = p.get("eta_s")
        how = f"{resource} on {other} is {p.get('disk')}"
        if p.get("replication", "").startswith("Sync") or (pct is not None and pct < 100):
            how += f", resync {pct:.1f} %" + (f", about {eta:.0f} s left" if eta else "")
        return "degraded", how
    if (st.get("fencing") or {}).get("mode") != "etcd":
        return "unprotected", f"{resource}: fencing is off (a cut link could let both write)"
    return "protected", f"{resource} UpToDate on {node} and {other}"


def guest_safety(disks: list[str], statuses: Mapping[str, Mapping[str, dict]]) -> dict:
    """{"level", "why"} of a guest; STATUSES: resource -> node -> status."""
    worst, whys = "protected", []
    for r in disks:
        level, why = disk_safety(r, statuses.get(r, {}))
        whys.append(why)
        if LEVELS.index(level) > LEVELS.index(worst):
            worst = level
    return {"level": worst, "why": "; ".join(whys)}
