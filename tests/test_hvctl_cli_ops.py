"""hvctl's command line as an operator meets it: --config before or after the subcommand,
the default config path and its variables, --node from the host's name, --version, help on
every subcommand and option, exit codes (0 done, 1 refused or failed or nothing to do, 2 usage
or config), `node list|status` in words with the reason a node cannot be reached, and
`guest stop|destroy --force`, the flag their refusal names, with its safety checks.

Libvirt is libvirt's test driver (a fake hypervisor, private state per connection); where
rblock matters it is a real two-node cluster (tests/cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nbd
import pytest

from tests.cluster import REPO, Cluster, free_ports
from tests.hvcluster import hv_config, role

NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>
       <cores>2</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
</node>
"""
GUEST = """[guest.vm1]
disks = ["r0"]
memory = "128M"
kernel = "/vmlinuz"
cmdline = "console=ttyS0"
domain_type = "qemu"
"""
GONE = "qemu:///system?socket=/nonexistent/libvirt-sock"  # a libvirtd that is not there
# Nothing in the output of a text command may look like Python: None, dicts, lists, reprs.
PYTHONISMS = ("None", "{", "}", "[", "]", "True", "False", "\\n", "('")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
        status: int | None = None) -> subprocess.CompletedProcess:
    """`python -m hvctl ARGS` with ENV added to a copy of this environment minus the config
    variables; STATUS: the exit status it must have."""
    full = {k: v for k, v in os.environ.items() if k not in ("HVCTL_CONFIG", "RBLOCK_CONFIG")}
    full.update(env or {})
    full["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-m", "hvctl", *args], capture_output=True,
                         text=True, cwd=cwd, env=full, timeout=120)
    if status is not None:
        assert res.returncode == status, (args, res.returncode, res.stdout, res.stderr)
    return res


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one line a refusal prints on stderr."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvctl: "), res.stderr
    return lines[0]


def no_pythonisms(text: str) -> None:
    for bad in PYTHONISMS:
        assert bad not in text, f"{bad!r} in the output:\n{text}"


def lone_config(tmp_path: Path, nodes: dict[str, str | None], etcd: bool = False,
                guests: str = GUEST) -> Path:
    """A cluster file with NODES (name -> libvirt URI or None), r0 on every node but one
    named witness, nothing running: its rblock control ports are free ones."""
    ports = free_ports(3 * len(nodes) + 1)
    text = ""
    if etcd:
        text += f'[cluster]\netcd = ["http://127.0.0.1:{ports.pop()}"]\n'
    text += '[resource.r0]\nsize = "64M"\nsecret = "s"\n'
    for name, uri in nodes.items():
        text += textwrap.dedent(f"""\
            [node.{name}]
            replication = "127.0.0.1:{ports.pop()}"
            control = "127.0.0.1:{ports.pop()}"
            nbd = "127.0.0.1:{ports.pop()}"
            """)
        if uri is not None:
            text += f'libvirt = "{uri}"\n'
        if name != "witness":  # the witness has no disk
            text += f'[node.{name}.disk]\nr0 = "{name}/r0.img"\n'
    path = tmp_path / "cluster.toml"
    path.write_text(f'[hvctl]\nstate_dir = "state"\n{text}\n{guests}')
    return path


def test_every_subcommand_and_option_has_help() -> None:
    from hvctl.cli import build_parser

    def walk(p: argparse.ArgumentParser, path: str) -> int:
        count = 1
        assert p.description and "\n" not in p.description, f"{path}: no one-line description"
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for name, sub in a.choices.items():
                    assert helps.get(name), f"{path} {name}: no help line in {path} -h"
                    count += walk(sub, f"{path} {name}")
            elif not isinstance(a, argparse._HelpAction):
                assert a.help and a.help != argparse.SUPPRESS, \
                    f"{path}: {a.option_strings or a.dest} has no help"
        return count

    assert walk(build_parser(), "hvctl") > 25


def test_version_and_config_before_or_after_the_subcommand(tmp_path: Path) -> None:
    res = run("--version", status=0)
    assert res.stdout.strip().startswith("hvctl ") and res.stdout.strip()[6:7].isdigit()

    (tmp_path / "alpha.xml").write_text(NODE_XML)
    cfg = lone_config(tmp_path, {"alpha": f"test://{tmp_path / 'alpha.xml'}",
                                 "beta": f"test://{tmp_path / 'missing.xml'}",
                                 "witness": None})
    first = run("--config", str(cfg), "node", "list", status=0)
    assert run("node", "list", "--config", str(cfg), status=0).stdout == first.stdout
    assert run("node", "--config", str(cfg), "list", status=0).stdout == first.stdout
    assert run("node", "list", env={"RBLOCK_CONFIG": str(cfg)}, status=0).stdout == first.stdout
    # hvctl's own variable comes first, --config before both.
    assert run("node", "list", env={"HVCTL_CONFIG": str(cfg), "RBLOCK_CONFIG": "/nowhere"},
               status=0).stdout == first.stdout
    line = error_line(run("node", "list", "--config", "/nowhere.toml",
                          env={"RBLOCK_CONFIG": str(cfg)}, status=2))
    assert "/nowhere.toml: no such file" in line, line

    default = Path("/etc/rblock/cluster.toml")
    if not default.exists():
        line = error_line(run("guest", "list", cwd=tmp_path, status=2))
        assert line == ("hvctl: no cluster file: /etc/rblock/cluster.toml (the default) does "
                        "not exist; pass --config FILE or set $RBLOCK_CONFIG"), line
    line = error_line(run("guest", "list", env={"RBLOCK_CONFIG": "/nowhere.toml"}, status=2))
    assert line.startswith("hvctl: no cluster file: /nowhere.toml ($RBLOCK_CONFIG) does not "
                           "exist"), line

    # node list: the table, then why each part that is down is down, in words.
    out = first.stdout
    no_pythonisms(out)
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "LIBVIRT", "TYPE", "GUESTS", "RBLOCK"], out
    assert lines[1].split()[0] == "alpha" and lines[1].split()[2] == "up", out
    assert lines[2].split()[:2] == ["beta", "unreachable"], out
    assert lines[3].split()[:2] == ["witness", "-"], out
    assert any(ln.startswith(f"beta: libvirt unreachable: node beta: cannot reach libvirtd at "
                             f"test://{tmp_path / 'missing.xml'}") and
               "start libvirtd on beta or fix node.beta.libvirt" in ln for ln in lines), out
    assert any(ln.startswith("alpha: rblock unreachable: cannot reach the node's control API "
                             "at 127.0.0.1:") for ln in lines), out

    res = run("--config", str(cfg), "node", "status", "beta", status=0)
    no_pythonisms(res.stdout)
    got = res.stdout.splitlines()
    assert got[0] == "node beta", got
    assert got[1].startswith(f"  libvirt: test://{tmp_path / 'missing.xml'}: unreachable: "
                             "node beta: cannot reach libvirtd"), got
    assert got[2].startswith("  rblock (control 127.0.0.1:") and \
        ": unreachable: cannot reach the node's control API" in got[2], got
    res = run("--config", str(cfg), "node", "status", "alpha", status=0)
    no_pythonisms(res.stdout)
    assert "  guests: none defined here" in res.stdout.splitlines(), res.stdout
    assert "  domain type: unknown (not probed yet)" in res.stdout.splitlines(), res.stdout
    res = run("--config", str(cfg), "node", "status", "witness", status=0)
    assert "  libvirt: none configured" in res.stdout, res.stdout
    assert run("--config", str(cfg), "node", "status", "beta", "--json",
               status=0).stdout.lstrip().startswith("{")


def test_node_defaults_to_this_hosts_name(tmp_path: Path) -> None:
    host = socket.gethostname().split(".")[0]
    if host in ("alpha", "beta") or not host.replace("-", "").isalnum():
        pytest.skip(f"host name {host!r} does not fit this test")
    mine = tmp_path / "mine"
    mine.mkdir()
    cfg = lone_config(mine, {host: "test:///default", "beta": "test:///default"}, etcd=True)
    res = run("--config", str(cfg), "agent", status=1)  # it ran, as this host: etcd is away
    assert f"start etcd or fix [cluster] etcd in {cfg}" in res.stderr, res.stderr
    res = run("--config", str(cfg), "node", "status", status=0)
    assert res.stdout.splitlines()[0] == f"node {host}", res.stdout

    other = tmp_path / "other"
    other.mkdir()
    cfg = lone_config(other, {"alpha": "test:///default", "beta": "test:///default"}, etcd=True)
    line = error_line(run("agent", "--config", str(cfg), status=2))
    assert line == (f"hvctl: agent: no --node given, and this host's name "
                    f"'{socket.gethostname()}' is not a node in {cfg} (nodes: alpha, beta); "
                    "pass --node NAME"), line
    line = error_line(run("node", "status", "--config", str(cfg), status=2))
    assert line.startswith("hvctl: node status: no NODE given, and this host's name"), line
    line = error_line(run("agent", "--node", "gamma", "--config", str(cfg), status=2))
    assert "node 'gamma' is not in" in line and "pass --node with one of them" in line


def test_exit_codes_and_commands_that_did_nothing(tmp_path: Path) -> None:
    """2 for usage and config, 1 refused or nothing to do, with the reason."""
    (tmp_path / "alpha.xml").write_text(NODE_XML)
    (tmp_path / "beta.xml").write_text(NODE_XML)
    cfg = lone_config(tmp_path, {"alpha": f"test://{tmp_path / 'alpha.xml'}",
                                 "beta": f"test://{tmp_path / 'beta.xml'}"})
    c = str(cfg)
    assert run("guest", "frobnicate", "vm1", "--config", c).returncode == 2  # argparse
    line = error_line(run("guest", "stop", "vm9", "--config", c, status=2))
    assert "guest 'vm9' not in" in line, line
    line = error_line(run("ha", "status", "--config", c, status=2))
    assert "no [cluster] etcd: HA needs the etcd cluster" in line, line
    line = error_line(run("node", "maintenance", "alpha", "on", "--config", c, status=2))
    assert "no [cluster] etcd" in line, line
    line = error_line(run("agent", "--node", "alpha", "--config", c, status=2))
    assert "no [cluster] etcd" in line, line

    # Nothing to do is not success: it says so, exit 1.
    line = error_line(run("guest", "stop", "vm1", "--config", c, status=1))
    assert line.startswith("hvctl: vm1 is not running; it is not defined on any node; "
                           "nothing to stop; rblock on alpha does not answer: r0 there is "
                           "untouched"), line
    line = error_line(run("guest", "destroy", "vm1", "--config", c, status=1))
    assert "nothing to destroy" in line, line
    line = error_line(run("guest", "undefine", "vm1", "--config", c, status=1))
    assert line == "hvctl: vm1 is not defined on any node; nothing to undefine", line
    res = run("guest", "undefine", "vm1", "--json", "--config", c, status=1)
    assert res.stdout.startswith('{"ok": false, "error": "vm1 is not defined'), res.stdout

    empty = lone_config(tmp_path, {"alpha": None, "beta": None}, guests="")
    res = run("guest", "list", "--config", str(empty), status=0)
    assert res.stdout.strip() == (f"no guests in {empty}; describe one in a [guest.NAME] "
                                  "table"), res.stdout
    line = error_line(run("node", "probe", "--config", str(empty), status=2))
    assert "no node in" in line and "has a libvirt URI" in line, line


def test_force_is_refused_for_guests_the_agents_run(tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    """With agents running they decide; --force would do nothing, so it is a usage error."""
    from hvctl import cli
    from hvctl.ha.ops import HaView

    async def running(self) -> bool:  # noqa: ANN001
        return True

    monkeypatch.setattr(HaView, "agents_running", running)
    cfg = lone_config(tmp_path, {"alpha": "test:///default", "beta": "test:///default"},
                      etcd=True, guests=GUEST + 'ha = "started"\n')
    for args in (["guest", "stop", "vm1", "--force"], ["guest", "destroy", "vm1", "--force"],
                 ["guest", "start", "vm1", "--force"]):
        assert cli.main(["--config", str(cfg), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hvctl: --force is for guests hvctl runs itself; the HA agents "
                              'run vm1 (ha = "started")'), err
    asyncio.set_event_loop(None)


def test_stop_force_forgets_the_guest_on_an_unreachable_node_only(cluster, tmp_path) -> None:
    """vm1 last ran on beta (r0 is Primary there) and beta's libvirtd is gone. Without --force:
    refused, naming the flag. With it: refused while a QEMU (an NBD client) holds r0 on beta,
    nothing changed; once none does, r0 is made Secondary there; then there is nothing left
    to stop, and it says so."""
    c: Cluster = cluster(size="16M")
    c.start_fresh(primary="beta")
    (tmp_path / "alpha.xml").write_text(NODE_XML)
    cfg = hv_config(c, {"alpha": f"test://{tmp_path / 'alpha.xml'}",
                        "beta": GONE}, GUEST)
    line = error_line(run("guest", "stop", "vm1", "--config", str(cfg), status=1))
    assert line.startswith("hvctl: cannot stop vm1: it runs on no node that answers, and beta "
                           f"cannot be asked (node beta: cannot reach libvirtd at {GONE}: "), line
    assert line.endswith("bring beta back, or pass --force if you are sure vm1 is not running "
                         "there (its disks are then made Secondary wherever no QEMU holds "
                         "them)"), line
    assert role(c, "beta") == "Primary"

    h = nbd.NBD()
    h.connect_uri(c.nbd_uri("beta"))  # returns once the handshake is done: a client counted
    try:
        line = error_line(run("guest", "destroy", "vm1", "--force", "--config", str(cfg),
                              status=1))
        assert line == ("hvctl: not forgetting vm1 on beta: r0 is Primary there with 1 NBD "
                        "client(s) attached, so vm1 may still run on beta; stop it there, or "
                        "bring beta's libvirtd back and run 'hvctl guest stop vm1' again; "
                        "nothing was changed"), line
        assert role(c, "beta") == "Primary"
    finally:
        h.shutdown()
    res = run("guest", "stop", "vm1", "--force", "--config", str(cfg), status=0)
    assert res.stdout.strip() == ("vm1 is not running; it is not defined on any node (not "
                                  "asked: beta, which you said is down); r0 made Secondary on "
                                  "beta"), res.stdout
    assert role(c, "beta") == "Secondary" and role(c, "alpha") == "Secondary"
    line = error_line(run("guest", "stop", "vm1", "--force", "--config", str(cfg), status=1))
    assert line.endswith("nothing to stop"), line
    # The start refusal's --force exists too, and starts it (alpha's test driver).
    line = error_line(run("guest", "start", "vm1", "--on", "alpha", "--config", str(cfg),
                          status=1))
    assert line.endswith("or pass --force if you are sure vm1 is not running on beta"), line
