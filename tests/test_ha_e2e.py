"""HA end to end, all real (tools/ha_hosts.py): alpha and beta (etcd member, rblock node,
libvirtd, hvctl agent each) and a witness (etcd only), each host in its own network
namespace; one TCG guest (tools/build_guest.py) on the replicated r0, HA "started",
preferring alpha. Its command line makes it print PEEK:<sector 0> at boot, write the marker
there, then write W<i> to block 10 every 0.5 s, printing LOOP i ok once each is done.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster import REPO

pytestmark = pytest.mark.slow

BOOT_TIMEOUT_S = 90.0
FAILOVER_TIMEOUT_S = 60.0
BLOCK = 4096
LOOP_BLOCK = 10


@pytest.fixture(scope="module")
def guest_image():
    from tools.build_guest import build_guest

    return build_guest(REPO / "build" / "guest")


def guest_toml(image, marker: str, name: str = "vm1", disk: str = "r0", extra: str = "",
               kernel: str | None = None) -> str:
    from tools.ha_hosts import guest_toml as toml

    return toml(Path(kernel) if kernel else image.kernel, image.initrd, marker, name, disk,
                extra=extra)


@pytest.fixture
def ha_hosts(tmp_path_factory):
    """make(guests_toml, **kw) -> a started HaHosts; stopped (by PID) at the end."""
    from tools.ha_hosts import HaHosts
    from tools.libvirt_hosts import LibvirtHostUnavailable, check_requirements
    from tools.netns_hosts import NetHostsUnavailable
    from tools.netns_hosts import check_requirements as net_requirements

    try:
        check_requirements()
        net_requirements()
    except (LibvirtHostUnavailable, NetHostsUnavailable) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    made = []

    def make(guests: str, **kw) -> HaHosts:
        ha = HaHosts(tmp_path_factory.mktemp("ha"), guests, **kw)
        made.append(ha)
        ha.start()
        return ha

    yield make
    for ha in made:
        ha.stop()


def text(path: Path, after: int = 0) -> str:
    return path.read_text(errors="replace")[after:] if path.exists() else ""


def wait_console(ha, pattern: str, after: int = 0, timeout_s: float = BOOT_TIMEOUT_S) -> str:
    log = ha.console("vm1")
    ha.wait(lambda: re.search(pattern, text(log, after)) is not None,
            f"{pattern!r} on vm1's console", timeout_s)
    return text(log, after)


def last_loop(console: str) -> int:
    done = re.findall(r"LOOP (\d+) ok", console)
    return int(done[-1]) if done else 0


def block10(path: Path) -> int:
    with path.open("rb") as f:
        f.seek(LOOP_BLOCK * BLOCK)
        data = f.read(16).rstrip(b"\0")
    m = re.match(rb"W(\d+)", data)
    return int(m.group(1)) if m else 0


def running_on(ha, guest: str = "vm1") -> list[str]:
    return [h for h in ("alpha", "beta") if ha.domain_state(h, guest) == "running"]


def started(ha, marker: str) -> int:
    ha.start_agents()
    console = wait_console(ha, r"LOOP 2 ok")
    assert f"WROTE:{marker}" in console and running_on(ha) == ["alpha"]
    return len(console)


def test_host_death_recovers_on_the_survivor_with_every_acked_write(ha_hosts, guest_image):
    marker = f"ha-{uuid.uuid4().hex[:10]}"
    ha = ha_hosts(guest_toml(guest_image, marker))
    started(ha, marker)
    st = ha.hvctl("ha", "status").stdout
    assert re.search(r"vm1\s+started\s+on alpha", st), st

    # alpha's power fails: silence, every process SIGKILLed.
    acked = last_loop(text(ha.console("vm1")))
    offset = len(text(ha.console("vm1")))
    t0 = time.monotonic()
    ha.crash("alpha")
    # protocol C: every write the guest was told was done is on beta's disk already
    assert block10(ha.disk("beta")) >= acked > 0
    assert running_on(ha) == []  # beta waits for alpha's lease

    console = wait_console(ha, r"PEEK:.*\n", offset, FAILOVER_TIMEOUT_S)
    took = time.monotonic() - t0
    assert f"PEEK:{marker}" in console, console
    assert running_on(ha) == ["beta"]
    log = ha.hvctl("ha", "log").stdout
    assert re.search(r"vm1: alpha lost \(lease expired [\d:.]+\); r0 UpToDate on beta, not "
                     r"outdated; recovering on beta", log), log
    st = ha.hvctl("ha", "status").stdout
    assert re.search(r"alpha\s+fenced", st) and re.search(r"vm1\s+started\s+on beta", st), st
    print(f"vm1 back on beta after {took:.1f} s")

    # alpha comes back: it resyncs from beta, and the guest stays on beta (no failback).
    ha.power_on("alpha")
    ha.wait(lambda: ha._in_sync("alpha") and ha._in_sync("beta"), "alpha resynced", 60)
    ha.wait(lambda: re.search(r"alpha\s+online", ha.hvctl("ha", "status").stdout)
            is not None, "alpha's agent online", 30)
    time.sleep(2)  # a few agent rounds: nothing may move back
    assert running_on(ha) == ["beta"]
    assert ha.res("alpha")["role"] == "Secondary" and ha.res("beta")["role"] == "Primary"


def test_partition_self_fences_before_the_other_side_starts_it(ha_hosts, guest_image):
    marker = f"ha-{uuid.uuid4().hex[:10]}"
    ha = ha_hosts(guest_toml(guest_image, marker))
    offset = started(ha, marker)

    ha.net["alpha"].cut()
    t0 = time.monotonic()
    gone_on_alpha = on_beta = None
    both = []
    while time.monotonic() - t0 < FAILOVER_TIMEOUT_S and on_beta is None:
        a, b = ha.domain_state("alpha", "vm1"), ha.domain_state("beta", "vm1")
        now = time.monotonic() - t0
        if a == "running" and b == "running":
            both.append(now)
        if gone_on_alpha is None and a != "running":
            gone_on_alpha = now
        if on_beta is None and b == "running":
            on_beta = now
        time.sleep(0.02)
    assert not both, f"vm1 ran on alpha and beta at once at {both}"
    assert gone_on_alpha is not None and on_beta is not None, (gone_on_alpha, on_beta)
    assert gone_on_alpha < on_beta
    assert "self-fenc" in ha.log_text("agent-alpha")
    wait_console(ha, rf"PEEK:{marker}", offset, FAILOVER_TIMEOUT_S)

    # The cut-off alpha cannot write r0 (no quorum, no peer): its rblock says so.
    fen = ha.res("alpha")["fencing"]
    assert fen["mode"] == "etcd" and not fen["lease"], fen

    # Healed: alpha's agent rejoins and leaves the guest where it is; r0 resyncs.
    ha.net["alpha"].heal()
    ha.wait(lambda: re.search(r"alpha\s+online", ha.hvctl("ha", "status").stdout)
            is not None, "alpha's agent online", 30)
    ha.wait(lambda: ha._in_sync("beta"), "r0 resynced", 60)
    time.sleep(2)
    assert running_on(ha) == ["beta"]


def test_agent_sigkill_libvirtd_restart_and_clean_stop_leave_the_guest_running(
        ha_hosts, guest_image):
    marker = f"ha-{uuid.uuid4().hex[:10]}"
    ha = ha_hosts(guest_toml(guest_image, marker))
    started(ha, marker)

    ha.kill_agent("alpha")
    # Its lease runs out: alpha lost, but r0 is still Primary there under rblock's live
    # lease, so the guest may run: fence, nothing started elsewhere.
    ha.wait(lambda: re.search(r"vm1\s+fence\s+on alpha", ha.hvctl("ha", "status").stdout)
            is not None, "vm1 in fence", 30)
    time.sleep(2)
    assert running_on(ha) == ["alpha"]
    ha.start_agent("alpha")
    ha.wait(lambda: re.search(r"vm1\s+started\s+on alpha", ha.hvctl("ha", "status").stdout)
            is not None, "vm1 adopted", 30)
    log = ha.hvctl("ha", "log").stdout
    assert "alpha's agent is back and vm1 runs there: adopted" in log, log
    console = text(ha.console("vm1"))
    assert console.count("GUEST-START") == 1, console  # never restarted

    # A clean stop (SIGTERM) freezes its guests; they keep running.
    assert ha.stop_agent("alpha") == 0
    ha.wait(lambda: re.search(r"vm1\s+freeze", ha.hvctl("ha", "status").stdout) is not None,
            "vm1 frozen", 30)
    assert running_on(ha) == ["alpha"]
    ha.start_agent("alpha")
    ha.wait(lambda: re.search(r"vm1\s+started\s+on alpha", ha.hvctl("ha", "status").stdout)
            is not None, "vm1 thawed", 30)
    assert text(ha.console("vm1")).count("GUEST-START") == 1

    # libvirtd restarts under the agent (an update): the guest keeps running, the agent
    # reconnects, nothing is restarted or moved.
    loops = last_loop(text(ha.console("vm1")))
    ha.libvirt["alpha"].restart_libvirtd()
    wait_console(ha, rf"LOOP {loops + 4} ok")
    time.sleep(2)
    assert running_on(ha) == ["alpha"]
    st = ha.hvctl("ha", "status").stdout
    assert re.search(r"vm1\s+started\s+on alpha", st), st
    assert text(ha.console("vm1")).count("GUEST-START") == 1


def test_witness_down_nothing_moves_then_no_quorum_then_back(ha_hosts, guest_image):
    marker = f"ha-{uuid.uuid4().hex[:10]}"
    ha = ha_hosts(guest_toml(guest_image, marker))
    started(ha, marker)

    ha.crash("witness")
    time.sleep(3 * ha.lease_ttl_s)
    assert running_on(ha) == ["alpha"]
    assert text(ha.console("vm1")).count("GUEST-START") == 1
    st = ha.hvctl("ha", "status").stdout
    assert re.search(r"vm1\s+started\s+on alpha", st), st

    # beta dies too: alpha alone has no quorum: its agent cannot renew its lease and
    # self-fences; the CLI says etcd does not answer.
    ha.crash("beta")
    ha.wait(lambda: running_on(ha) == [], "alpha self-fenced", 30)
    res = ha.hvctl("ha", "status", check=False)
    assert res.returncode == 1 and "cannot read the HA state" in res.stderr, res.stderr
    assert "self-fenc" in ha.log_text("agent-alpha")
    fen = ha.res("alpha")["fencing"]  # rblock says it too: no lease, so no lone write
    assert fen["mode"] == "etcd" and not fen["lease"], fen

    # The witness is back: quorum (alpha + witness), vm1 runs again on alpha.
    offset = len(text(ha.console("vm1")))
    ha.power_on("witness")
    wait_console(ha, rf"PEEK:{marker}", offset, FAILOVER_TIMEOUT_S)
    assert running_on(ha) == ["alpha"]


def test_maintenance_moves_away_and_max_restart_ends_in_error(ha_hosts, guest_image):
    marker = f"ha-{uuid.uuid4().hex[:10]}"
    bad = guest_toml(guest_image, "bad", name="vm2", disk="r1", kernel="/nonexistent/vmlinuz",
                     extra="max_restart = 1\nmax_relocate = 1")
    ha = ha_hosts(guest_toml(guest_image, marker) + bad, resources=("r0", "r1"))
    offset = started(ha, marker)

    # vm2 cannot start anywhere: one restart on alpha, one relocation to beta, then error.
    ha.wait(lambda: re.search(r"vm2\s+error", ha.hvctl("ha", "status").stdout) is not None,
            "vm2 in error", 60)
    log = ha.hvctl("ha", "log").stdout
    assert re.search(r"vm2: start on alpha failed: .*restart 1 of 1", log), log
    assert re.search(r"vm2: .*max_restart 1 and max_relocate 1 reached: error", log), log

    # Maintenance: vm1 moves to beta (ACPI shutdown, then a start there), nothing comes back.
    res = ha.hvctl("node", "maintenance", "alpha", "on")
    assert "no HA guest left on it" in res.stdout, res.stdout
    assert running_on(ha) == ["beta"]
    console = wait_console(ha, rf"PEEK:{marker}", offset)
    assert "POWER-BUTTON" in console
    st = ha.hvctl("ha", "status").stdout
    assert re.search(r"alpha\s+maintenance", st), st
    ha.hvctl("node", "maintenance", "alpha", "off")
    time.sleep(2)
    assert running_on(ha) == ["beta"]

    # The CLI goes through the agents: a move back, a stop, a start.
    res = ha.hvctl("guest", "move", "vm1", "alpha")
    assert res.stdout.startswith("vm1 started on alpha"), res.stdout
    assert running_on(ha) == ["alpha"]
    res = ha.hvctl("guest", "stop", "vm1")
    assert res.stdout.startswith("vm1 stopped"), res.stdout
    assert running_on(ha) == []
    res = ha.hvctl("guest", "start", "vm1", "--no-wait")
    assert "start requested" in res.stdout
    ha.wait(lambda: running_on(ha) == ["alpha"], "vm1 started again", 60)
    w = ha.hvctl("ha", "what-if", "alpha").stdout
    assert re.search(r"vm1: would be recovered on beta \(alpha lost; r0 UpToDate on beta, "
                     r"not outdated; recovering on beta\)", w), w
