"""hvctl end to end, all real: two simulated hosts on this machine, each with its own libvirtd
(private mount namespace, tools/libvirt_hosts.py) and its own `rblock up` node; one TCG guest
(kernel + busybox initramfs, tools/build_guest.py) whose virtio disk is the replicated r0.

The guest's command line makes it, at every boot: print sector 0 (PEEK:), write the marker
there (WROTE:), rewrite a block every 0.5 s (LOOP i ok|ERR), then wait for the ACPI power
button (POWER-BUTTON). Its serial console goes to one log file, so the boots on both nodes
follow each other in it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster import REPO, Cluster
from tests.hvcluster import hv_config, hvctl, hvctl_json, role

pytestmark = pytest.mark.slow

LOOP_WRITES = 16  # 8 s of writes: long enough to restart rblock under them
BOOT_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def guest_image():
    from tools.build_guest import build_guest

    return build_guest(REPO / "build" / "guest")


@pytest.fixture
def libvirt_hosts(tmp_path_factory):
    from tools.libvirt_hosts import LibvirtHostUnavailable, hosts

    base = tmp_path_factory.mktemp("hosts")
    try:
        with hosts(base, ["alpha", "beta"]) as hv:
            yield hv
    except LibvirtHostUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def wait_log(path: Path, pattern: str, after: int = 0, timeout_s: float = BOOT_TIMEOUT_S) -> str:
    """The console log from offset AFTER once PATTERN (a regex) appears in it."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")[after:] if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the console log after {timeout_s:g} s:\n{text}")


def interactive_console(config: Path, guest: str, timeout_s: float = 30.0) -> str:
    """`hvctl guest console GUEST` on a pseudo-terminal: wait for virsh to attach, leave with
    Ctrl+], return what was printed. Fails if it does not exit 0."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: hvctl, which execs virsh on the same terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "hvctl", "--config", str(config),
                                  "guest", "console", guest])
    out = b""
    deadline = time.monotonic() + timeout_s
    sent = False
    next_escape_s = 0.0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if b"Escape character" in out and time.monotonic() >= next_escape_s:
                # virsh prints the line before it reads the terminal raw: an early Ctrl+] is
                # only echoed, so press it again until virsh has gone.
                os.write(fd, b"\x1d")  # Ctrl+]
                sent = True
                next_escape_s = time.monotonic() + 0.5
        while True:  # never hang the suite on a console that does not let go
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the console did not exit:\n{out.decode(errors='replace')}")
            time.sleep(0.05)
    finally:
        os.close(fd)
    text = out.decode(errors="replace")
    assert sent and os.waitstatus_to_exitcode(status) == 0, text
    return text


def domains(hv, node: str) -> list[str]:
    conn = hv[node].connect()
    try:
        return sorted(d.name() for d in conn.listAllDomains())
    finally:
        conn.close()


def test_guest_boots_on_alpha_survives_rblock_restart_and_moves_to_beta(
        cluster, libvirt_hosts, guest_image) -> None:
    hv = libvirt_hosts
    c: Cluster = cluster(size="64M")
    c.start_fresh()
    c.rblock("alpha", "secondary", "r0")
    marker = f"hv-{uuid.uuid4().hex[:12]}"
    log = c.dir / "hvctl-state" / "console" / "vm1.log"
    cmdline = (f"console=ttyS0 panic=-1 quiet rblock.peek=1 rblock.write={marker} "
               f"rblock.loop={LOOP_WRITES} rblock.hold=1")
    cfg = hv_config(c, {n: hv[n].uri for n in ("alpha", "beta")}, f"""
[guest.vm1]
disks = ["r0"]
memory = "256M"
kernel = "{guest_image.kernel}"
initrd = "{guest_image.initrd}"
cmdline = "{cmdline}"
""", "stop_timeout_s = 20")

    # Start on alpha: r0 Primary there, the domain type probed (TCG here), the guest writes.
    res = hvctl(cfg, "guest", "start", "vm1", "--on", "alpha")
    assert res.stdout.strip() == "vm1 started on alpha", res.stderr
    assert role(c, "alpha") == "Primary" and domains(hv, "alpha") == ["vm1"]
    assert domains(hv, "beta") == []
    text = wait_log(log, r"LOOP 2 ok")
    assert "PEEK:\n" in text and f"WROTE:{marker}" in text

    # A second start, anywhere, is refused while it runs on alpha.
    for args in (["--on", "beta"], ["--on", "alpha"], []):
        res = hvctl(cfg, "guest", "start", "vm1", *args, check=False)
        assert res.returncode == 1 and "already runs on alpha" in res.stderr, res.stderr
    assert domains(hv, "beta") == [] and role(c, "beta") == "Secondary"

    # rblock on alpha restarts under the guest's writes: QEMU's NBD client waits and
    # reconnects (reconnect-delay), the guest sees a stall, not an I/O error.
    c.stop("alpha")
    c.up("alpha")
    c.wait(lambda: c.peer("alpha")["connection"] == "Connected", what="alpha reconnected")
    c.rblock("alpha", "primary", "r0")
    text = wait_log(log, r"GUEST-DONE")
    assert "ERR" not in text, text
    assert len(re.findall(r"LOOP \d+ ok", text)) == LOOP_WRITES
    c.wait(lambda: c.peer("alpha")["unacked_bytes"] == 0, what="writes acked")
    for node in ("alpha", "beta"):  # replicated: the marker is on both disks
        assert c.disk(node).read_bytes()[:len(marker)] == marker.encode()

    st = hvctl_json(cfg, "guest", "status", "vm1")
    assert (st["name"], st["state"], st["node"], st["domain_type"]) == (
        "vm1", "running", "alpha", "qemu")
    assert st["disks"][0]["resource"] == "r0" and st["disks"][0]["role"] == "Primary"
    assert st["disks"][0]["nbd"] == f"nbd://127.0.0.1:{c.ports['alpha']['nbd']}/r0"

    # Move to beta: ACPI shutdown on alpha, r0 handed over, the guest boots on beta and
    # reads back what it wrote on alpha.
    offset = log.stat().st_size
    res = hvctl(cfg, "guest", "move", "vm1", "beta")
    assert res.stdout.startswith("vm1 moved from alpha to beta (shut down (ACPI)"), res.stdout
    assert "POWER-BUTTON" in log.read_text(errors="replace")[:offset + 4096]
    text = wait_log(log, r"PEEK:.*\n", after=offset)
    assert f"PEEK:{marker}" in text
    assert domains(hv, "alpha") == [] and domains(hv, "beta") == ["vm1"]
    assert role(c, "alpha") == "Secondary" and role(c, "beta") == "Primary"
    st = hvctl_json(cfg, "guest", "status", "vm1")
    assert (st["state"], st["node"]) == ("running", "beta")
    assert st["disks"][0]["nbd"] == f"nbd://127.0.0.1:{c.ports['beta']['nbd']}/r0"
    res = hvctl(cfg, "guest", "start", "vm1", "--on", "alpha", check=False)
    assert res.returncode == 1 and "already runs on beta" in res.stderr

    transcript = interactive_console(cfg, "vm1")
    assert "Connected to domain" in transcript and "vm1 on beta" in transcript, transcript

    listing = hvctl(cfg, "guest", "list").stdout
    assert re.search(r"vm1\s+running\s+beta\s+qemu\s+r0\(Primary\)", listing), listing
    nodes = hvctl_json(cfg, "node", "list")
    assert [(n["name"], n["reachable"], n["domain_type"]) for n in nodes] == [
        ("alpha", True, "qemu"), ("beta", True, "qemu")]
    assert nodes[1]["guests"] == {"vm1": "running"}

    # Stop: ACPI, r0 Secondary everywhere; the definition stays where it last ran.
    res = hvctl(cfg, "guest", "stop", "vm1")
    assert res.stdout.strip() == "vm1 shut down (ACPI) on beta; r0 Secondary", res.stdout
    assert role(c, "alpha") == "Secondary" and role(c, "beta") == "Secondary"
    assert hvctl_json(cfg, "guest", "status", "vm1")["state"] == "stopped"
    assert domains(hv, "beta") == ["vm1"]
    assert c.files_identical()
    console = hvctl(cfg, "guest", "console", "vm1", "--log").stdout
    assert console.count("GUEST-START") == 2 and console.count("POWER-BUTTON") == 2
    node = hvctl_json(cfg, "node", "status", "beta")
    assert node["guests"] == {"vm1": "stopped"} and node["domain_type"] == "qemu"
    assert node["rblock"] == {"r0": {"role": "Secondary", "disk": "UpToDate"}}


def test_cli_errors_are_one_line_and_leave_nothing_behind(cluster, libvirt_hosts,
                                                          guest_image, tmp_path) -> None:
    hv = libvirt_hosts
    c: Cluster = cluster(size="16M")
    c.start_fresh()
    c.rblock("alpha", "secondary", "r0")
    guest = f"""
[guest.vm1]
disks = ["r0"]
memory = "128M"
kernel = "{guest_image.kernel}"
initrd = "{guest_image.initrd}"
cmdline = "console=ttyS0 rblock.hold=1"
domain_type = "qemu"
"""
    cfg = hv_config(c, {n: hv[n].uri for n in ("alpha", "beta")}, guest)

    def one_line_error(config: Path, *args: str, status: int = 1) -> str:
        res = hvctl(config, *args, check=False)
        assert res.returncode == status, res.stdout + res.stderr
        assert res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
        return res.stderr

    err = one_line_error(cfg, "guest", "start", "vm2", status=2)
    assert "guest 'vm2' not in" in err and "guests: vm1" in err and "[guest.vm2]" in err
    err = one_line_error(cfg, "guest", "start", "vm1", "--on", "gamma", status=2)
    assert "node 'gamma' not in" in err and "nodes: alpha, beta" in err
    err = one_line_error(cfg, "guest", "move", "vm1", "gamma", status=2)
    assert "node 'gamma' not in" in err

    bad = hv_config(c, {n: hv[n].uri for n in ("alpha", "beta")},
                    guest.replace('disks = ["r0"]', 'disks = ["r7"]'), name="bad.toml")
    err = one_line_error(bad, "guest", "start", "vm1", status=2)
    assert "guest.vm1.disks[0]: resource 'r7' is not in" in err and "add [resource.r7]" in err

    # beta's libvirtd is not reachable: starting there fails before anything changes; starting
    # elsewhere is refused without --force (beta might run it).
    gone = hv_config(c, {"alpha": hv["alpha"].uri,
                         "beta": "qemu:///system?socket=/nonexistent/libvirt-sock"},
                     guest, name="gone.toml")
    err = one_line_error(gone, "guest", "start", "vm1", "--on", "beta", "--force")
    assert "node beta: cannot reach libvirtd at qemu:///system?socket=/nonexistent" in err
    assert "start libvirtd on beta or fix node.beta.libvirt in" in err
    err = one_line_error(gone, "guest", "start", "vm1", "--on", "alpha")
    assert "cannot ask beta whether vm1 runs there" in err and "--force" in err
    assert role(c, "alpha") == "Secondary" and role(c, "beta") == "Secondary"
    assert domains(hv, "alpha") == [] and domains(hv, "beta") == []

    # rblock's control API not reachable: the resource cannot be promoted, nothing defined.
    c.stop("beta")
    err = one_line_error(cfg, "guest", "start", "vm1", "--on", "beta")
    assert "cannot start vm1 on beta: resource r0: cannot reach the node's control API" in err
    assert domains(hv, "alpha") == [] and domains(hv, "beta") == []
    assert role(c, "alpha") == "Secondary"

    res = hvctl(cfg, "guest", "status", "vm1", "--json", check=False)
    assert res.returncode == 0 and '"state": "undefined"' in res.stdout


def test_stop_destroys_a_guest_that_ignores_acpi(cluster, libvirt_hosts, guest_image) -> None:
    hv = libvirt_hosts
    c: Cluster = cluster(size="16M")
    c.start_fresh()
    c.rblock("alpha", "secondary", "r0")
    cfg = hv_config(c, {n: hv[n].uri for n in ("alpha", "beta")}, f"""
[guest.deaf]
disks = ["r0"]
memory = "128M"
kernel = "{guest_image.kernel}"
initrd = "{guest_image.initrd}"
cmdline = "console=ttyS0 acpi=off rblock.hold=1"
domain_type = "qemu"
""", "stop_timeout_s = 2")
    log = c.dir / "hvctl-state" / "console" / "deaf.log"
    hvctl(cfg, "guest", "start", "deaf")
    wait_log(log, "GUEST-DONE")
    res = hvctl(cfg, "guest", "stop", "deaf")
    assert res.stdout.strip() == "deaf did not power off within 2 s; destroyed on alpha; " \
                                 "r0 Secondary", res.stdout
    assert "POWER-BUTTON" not in log.read_text(errors="replace")
    assert role(c, "alpha") == "Secondary"
    assert hvctl_json(cfg, "guest", "status", "deaf")["state"] == "stopped"
