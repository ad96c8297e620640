"""hvctl's HA commands refuse bad input with one line naming the thing and the fix, and
the agent refuses to start without etcd (no libvirt needed for any of this)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.cluster import REPO, free_ports

CLUSTER = textwrap.dedent("""\
    [cluster]
    etcd = ["http://127.0.0.1:{etcd}"]
    [resource.r0]
    size = "64M"
    secret = "s"
    [node.alpha]
    replication = "127.0.0.1:{p0}"
    control = "127.0.0.1:{p1}"
    nbd = "127.0.0.1:{p2}"
    libvirt = "test:///default"
    [node.alpha.disk]
    r0 = "a/r0.img"
    [node.beta]
    replication = "127.0.0.1:{p3}"
    control = "127.0.0.1:{p4}"
    nbd = "127.0.0.1:{p5}"
    libvirt = "test:///default"
    [node.beta.disk]
    r0 = "b/r0.img"
    [guest.vm1]
    disks = ["r0"]
    ha = "started"
    """)


def config(tmp_path: Path, etcd: bool = True) -> Path:
    ports = free_ports(7)
    text = CLUSTER.format(etcd=ports[0], **{f"p{i}": p for i, p in enumerate(ports[1:])})
    if not etcd:
        text = text.split("[resource.r0]", 1)[1]
        text = "[resource.r0]" + text
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def hvctl(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvctl", "--config", str(cfg), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def one_line(res: subprocess.CompletedProcess, status: int) -> str:
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvctl: "), res.stderr
    return lines[0]


def test_agent_with_etcd_unreachable_says_so(tmp_path):
    cfg = config(tmp_path)
    res = hvctl(cfg, "agent", "--node", "alpha")
    assert res.returncode == 1, res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("hvctl: etcd")]
    assert len(err) == 1 and "etcd unreachable at http://127.0.0.1:" in err[0], res.stderr
    assert f"start etcd or fix [cluster] etcd in {cfg}" in err[0]


def test_agent_unknown_node_and_no_etcd(tmp_path):
    cfg = config(tmp_path)
    line = one_line(hvctl(cfg, "agent", "--node", "gamma"), 2)  # usage: exit 2
    assert "node 'gamma' is not in" in line and "nodes: alpha, beta" in line
    cfg = config(tmp_path, etcd=False)
    line = one_line(hvctl(cfg, "agent", "--node", "alpha"), 2)  # config: exit 2
    assert "no [cluster] etcd: HA needs the etcd cluster" in line, line


def test_ha_commands_without_etcd_answering(tmp_path):
    cfg = config(tmp_path)
    for args in (["ha", "status"], ["ha", "log"], ["ha", "what-if", "alpha"],
                 ["node", "maintenance", "alpha", "on"]):
        line = one_line(hvctl(cfg, *args), 1)
        assert "etcd" in line and ("is etcd up" in line or "no etcd endpoint" in line), line
    line = one_line(hvctl(cfg, "ha", "what-if", "gamma"), 2)
    assert "gamma" in line and "nodes: alpha, beta" in line, line


def test_watchdog_is_armed_petted_and_disarmed(tmp_path):
    """On a plain file (no watchdog device here): what the agent writes to it."""
    from hvctl.ha.watchdog import Watchdog, device_for

    assert device_for("off") is None and device_for("/dev/x") == "/dev/x"
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    w = Watchdog(str(dev), 4)  # a file has no timeout ioctl: logged, not raised
    w.pet()
    w.pet()
    w.close()
    assert dev.read_bytes() == b"\0\0V"
