"""HA failover on three simulated hosts (tools/ha_hosts.py: network namespaces, real etcd,
rblock, libvirtd, hvctl agents, a TCG guest), the product's default settings (lease_ttl_s
5, peer timeouts as shipped):

    host death (its traffic dropped, every process SIGKILLed)  ->  the guest's marker on
    its console, printed by its init on the survivor

with the breakdown: detection (the kill to the leader's recovery decision: the leases run
out), promotion (to r0 Primary on the survivor), domain start (to libvirt's Started), guest
boot (to the marker). The guest then runs on the survivor; the dead host is powered on
again, resyncs, and the next repetition kills the host the guest runs on now.

    .venv/bin/python benchmarks/ha_failover.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.build_guest import build_guest  # noqa: E402
from tools.ha_hosts import HaHosts, guest_toml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MARKER = "ha-bench"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) hvctl: (.*)$", re.M)


def stamps(text: str, pattern: str, after: float) -> float | None:
    """Unix time of the first agent log line after AFTER that matches PATTERN."""
    for when, line in STAMP.findall(text):
        t = datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t >= after and re.search(pattern, line):
            return t
    return None


def running_on(ha: HaHosts) -> str:
    on = [h for h in ("alpha", "beta") if ha.domain_state(h, "vm1") == "running"]
    assert len(on) == 1, on
    return on[0]


def one(ha: HaHosts) -> dict[str, float]:
    victim = running_on(ha)
    survivor = "beta" if victim == "alpha" else "alpha"
    log = ha.console("vm1")

    def count(what: str) -> int:
        # Counted over the whole file: the survivor's virtlogd may write from where the
        # file ended when it opened it, over the dead host's last bytes.
        return log.read_text(errors="replace").count(what)

    boots, marks = count("GUEST-START"), count(f"PEEK:{MARKER}")
    t0 = time.time()
    ha.crash(victim)
    ha.wait(lambda: count("GUEST-START") > boots, "the guest's init on the survivor", 120)
    init = time.time()
    ha.wait(lambda: count(f"PEEK:{MARKER}") > marks, "the marker on the survivor", 120)
    seen = time.time()
    decisions = [json.loads(line) for line in
                 ha.hvctl("ha", "log", "--json").stdout.splitlines()]
    decided = next(d["time"] for d in decisions
                   if d["time"] >= t0 and "recovering on" in d["text"])
    agent = ha.log_text(f"agent-{survivor}")
    promoted = stamps(agent, r"r0 on \w+: promoted", t0) or decided
    started = stamps(agent, r"vm1 started$", t0) or promoted
    out = {"total_s": seen - t0, "detection_s": decided - t0,
           "promotion_s": promoted - decided, "domain_start_s": started - promoted,
           "guest_boot_s": seen - started, "kernel_s": init - started,
           "init_to_marker_s": seen - init}
    print(f"{victim} killed: vm1 back on {survivor} after {out['total_s']:.1f} s "
          f"(detection {out['detection_s']:.1f}, promotion {out['promotion_s']:.2f}, "
          f"domain start {out['domain_start_s']:.2f}, guest boot {out['guest_boot_s']:.2f})",
          flush=True)
    ha.power_on(victim)
    ha.wait(lambda: ha._in_sync(survivor), f"{victim} resynced", 120)
    ha.wait(lambda: re.search(rf"{victim}\s+online", ha.hvctl("ha", "status").stdout)
            is not None, f"{victim}'s agent online", 60)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    img = build_guest(REPO / "build" / "guest")
    runs = []
    with tempfile.TemporaryDirectory(prefix="ha-bench-", dir=REPO / "build") as tmp, \
            HaHosts(Path(tmp), guest_toml(img.kernel, img.initrd, MARKER)) as ha:
        ha.start_agents()
        ha.wait(lambda: f"PEEK:{MARKER}" in ha.console("vm1").read_text(errors="replace") or
            "LOOP 2 ok" in ha.console("vm1").read_text(errors="replace"),
                "vm1 booted", 120)
        for _ in range(args.repeat):
            runs.append(one(ha))
    print(f"\n{args.repeat} runs, median (min-max):")
    for k in runs[0]:
        vals = [r[k] for r in runs]
        print(f"  {k:<16} {statistics.median(vals):6.2f} s  ({min(vals):.2f}-{max(vals):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
