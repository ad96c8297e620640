"""The `rblock` command as an operator meets it (issue 12): which file and node, --version,
help on everything, exit codes (0 done, 1 refused, failed or nothing to do, 2 usage or
config), `config show`, `adjust`, status that says why a peer is not connected (and for how
long), events that start with the current state and carry timestamps, output cut by its
reader, `serve`'s URI and TLS files reported in words.

Real processes throughout: `rblock` runs as `python -m rblock`, nodes as real `rblock up`
(tests/cluster.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from rblock.cli import build_parser
from tests.cluster import REPO, Cluster
from tests.conftest import make_image
from tests.test_replication_admin import collect, reader, write_through

pytestmark = pytest.mark.slow

KiB = 1024
MiB = 1024 * KiB
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def rblock(*args, env: dict | None = None, timeout_s: float = 60,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RBLOCK_CONFIG"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "rblock", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s, env=environ)


def code(res: subprocess.CompletedProcess, expected: int) -> subprocess.CompletedProcess:
    assert res.returncode == expected, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    if expected:
        assert res.stderr.startswith("rblock"), res.stderr
    return res


def text(c: Cluster, node: str) -> str:
    return code(c.rblock(node, "status", check=False), 0).stdout


# --- the parser ----------------------------------------------------------------------------


def _parsers(p: argparse.ArgumentParser, path: str = "rblock"):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_subcommand_and_option_has_help():
    top = build_parser()
    listed = {}
    for a in top._actions:
        if isinstance(a, argparse._SubParsersAction):
            listed = {c.dest: c.help for c in a._choices_actions}
    for path, p in _parsers(top):
        assert p.description, f"{path} has no description"
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:
                    assert choice.help, f"{path} {choice.dest}: no one-line help"
                continue
            assert a.help and a.help != argparse.SUPPRESS, f"{path} {a.option_strings or a.dest}"
    assert set(listed) >= {"serve", "create-md", "up", "status", "events", "config", "adjust",
                           "primary", "secondary", "connect", "disconnect", "verify",
                           "invalidate", "detach", "attach", "inject-fault", "splitbrain"}
    force = next(a for a in dict(_parsers(top))["rblock primary"]._actions
                 if "--force" in a.option_strings).help
    for overridden in ("fresh data", "Inconsistent", "Outdated", "split brain"):
        assert overridden in force, force
    for kept in ("Primary", "resync", "missing disk", "fencing", "--ignore-fencing"):
        assert kept in force, force


def test_version_is_the_package_version():
    res = code(rblock("--version"), 0)
    assert res.stdout.strip() == f"rblock {metadata.version('rblock')}", res.stdout


# --- which file, which node --------------------------------------------------------------------


def _config(tmp_path: Path, secret: str = "s3cret-for-tests", names=("alpha", "beta")) -> Path:
    a, b = names
    path = tmp_path / "cluster.toml"
    path.write_text(f"""
[resource.r0]
size = "16M"
secret = "{secret}"

[node.{a}]
replication = "127.0.0.1:7790"
control = "127.0.0.1:7800"
nbd = "127.0.0.1:10809"
[node.{a}.disk]
r0 = "{a}/r0.img"

[node.{b}]
replication = "127.0.0.1:7791"
control = "127.0.0.1:7801"
nbd = "127.0.0.1:10810"
[node.{b}.disk]
r0 = "{b}/r0.img"
""")
    return path


def test_config_and_node_go_before_or_after_the_command(tmp_path):
    cfg = _config(tmp_path)
    for args in (["--config", cfg, "--node", "alpha", "config", "show", "--json"],
                 ["config", "show", "--json", "--config", cfg, "--node", "alpha"],
                 ["--config", cfg, "config", "show", "--node", "alpha", "--json"]):
        out = json.loads(code(rblock(*args), 0).stdout)
        assert out["node"] == "alpha" and out["config"] == str(cfg), out
    # $RBLOCK_CONFIG, and --config over it
    out = json.loads(code(rblock("config", "show", "--json", "--node", "beta",
                                 env={"RBLOCK_CONFIG": str(cfg)}), 0).stdout)
    assert out["node"] == "beta"
    res = code(rblock("config", "show", "--node", "beta", "--config", tmp_path / "nope.toml",
                      env={"RBLOCK_CONFIG": str(cfg)}), 2)
    assert "nope.toml: no such file" in res.stderr, res.stderr
    # neither: the default path, said so when it is missing
    if not Path("/etc/rblock/cluster.toml").exists():
        res = code(rblock("status", "--node", "alpha"), 2)
        assert res.stderr.strip() == (
            "rblock: no cluster file: /etc/rblock/cluster.toml (the default) does not exist; "
            "pass --config FILE or set $RBLOCK_CONFIG"), res.stderr
    res = code(rblock("status", "--node", "alpha", env={"RBLOCK_CONFIG": str(tmp_path / "x")}),
               2)
    assert "($RBLOCK_CONFIG) does not exist" in res.stderr, res.stderr
    # a node that is not in the file: a usage error naming the nodes
    res = code(rblock("status", "--config", cfg, "--node", "gamma"), 2)
    assert "node 'gamma' not in" in res.stderr and "nodes: alpha, beta" in res.stderr
    # a resource that is not in the file, or not on this node
    res = code(rblock("primary", "r9", "--config", cfg, "--node", "alpha"), 2)
    assert "resource 'r9' not in" in res.stderr and "resources: r0" in res.stderr, res.stderr
    # usage errors of argparse are 2 as well
    for args in (["primary", "--config", cfg], ["frobnicate"]):
        res = rblock(*args)
        assert res.returncode == 2 and "usage: rblock" in res.stderr, res


def test_node_defaults_to_the_host_name(tmp_path):
    host = socket.gethostname().split(".", 1)[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", host):
        pytest.skip(f"host name {host!r} cannot be a node name")
    cfg = _config(tmp_path, names=(host, "zz-other"))
    out = json.loads(code(rblock("config", "show", "--json", "--config", cfg), 0).stdout)
    assert out["node"] == host, out
    # not in the file: the usage error says so and names the nodes
    (tmp_path / "o").mkdir()
    other = _config(tmp_path / "o", names=("alpha", "beta"))
    res = code(rblock("config", "show", "--config", other), 2)
    assert res.stderr.strip() == (
        f"rblock: no --node given, and this host's name '{socket.gethostname()}' is not a node "
        f"in {other} (nodes: alpha, beta); pass --node NAME"), res.stderr


# --- config show ---------------------------------------------------------------------------------


def test_config_show_fills_in_defaults_resolves_paths_hides_secrets(tmp_path):
    cfg = _config(tmp_path)
    res = code(rblock("config", "show", "--config", cfg, "--node", "alpha"), 0)
    assert "s3cret-for-tests" not in res.stdout + res.stderr
    shown = tomllib.loads(res.stdout)  # the text is TOML, keyed as the file is
    r0 = shown["resource"]["r0"]
    assert r0 == {"size": "16M", "protocol": "C", "secret": "(hidden)",
                  "ping_interval_s": 1.0, "peer_timeout_s": 4.0, "connect_retry_max_s": 5.0,
                  "resync_rate": "200M", "tls": False, "ack_timeout_s": 30.0,
                  "al_extents": 1237, "fencing": "none", "on_no_quorum": "suspend-io",
                  "after_sb_0pri": "disconnect", "after_sb_1pri": "disconnect"}, r0
    alpha = shown["node"]["alpha"]
    assert alpha["disk"] == {"r0": str(tmp_path / "alpha" / "r0.img")}, alpha
    assert alpha["meta"] == {"r0": str(tmp_path / "alpha" / "r0.img.meta")}, alpha
    assert shown["node"]["beta"] == {"replication": "127.0.0.1:7791",
                                     "control": "127.0.0.1:7801", "nbd": "127.0.0.1:10810"}
    assert "# on nodes alpha, beta" in res.stdout and "[node.alpha]  # this node" in res.stdout
    js = json.loads(code(rblock("config", "show", "--json", "--config", cfg, "--node",
                                "alpha"), 0).stdout)
    assert js["resources"]["r0"]["size"] == 16 * MiB and js["resources"]["r0"]["secret"] == \
        "(hidden)"
    assert js["resources"]["r0"]["nodes"] == ["alpha", "beta"] and js["warnings"] == []
    # from another working directory: the same absolute paths
    res2 = code(rblock("config", "show", "--config", cfg, "--node", "alpha", cwd=tmp_path), 0)
    assert res2.stdout == res.stdout


def test_example_secret_draws_a_warning(tmp_path, cluster):
    cfg = _config(tmp_path, secret="change-me")
    res = code(rblock("config", "show", "--config", cfg, "--node", "alpha"), 0)
    assert 'rblock: warning: resource r0: secret is "change-me", the example\'s' in res.stderr
    assert 'secret = "(hidden)"  # WARNING: "change-me"' in res.stdout, res.stdout
    js = json.loads(code(rblock("config", "show", "--json", "--config", cfg, "--node",
                                "alpha"), 0).stdout)
    assert "change-me" in js["warnings"][0] and "openssl rand" in js["warnings"][0]
    c = cluster(size="16M", secret="change-me")
    res = code(c.rblock("alpha", "create-md", check=False), 0)
    assert 'warning: resource r0: secret is "change-me"' in res.stderr, res.stderr
    c.up("alpha")
    assert re.search(r'WARNING resource r0: secret is "change-me", the example\'s: anyone who '
                     r"has read the README can pose as a peer; set secret", c.log("alpha"))
    assert 'secret:"change-me", the example\'s' in text(c, "alpha")


# --- operations: exit codes, no-ops, status reasons ------------------------------------------------


def test_refusals_and_no_ops_exit_1_and_status_says_why_not_connected(cluster):
    c = cluster(size="16M")
    c.create_md()
    c.up("beta")  # beta waits: alpha (first by name) dials
    st = text(c, "beta")
    assert re.search(r"alpha connection:Connecting \(waiting for alpha, for \d+(\.\d)?s\)", st)
    assert "alpha dials this node, and has not connected since" in st, st
    c.up("alpha")
    c.wait(lambda: c.peer("alpha")["connection"] == "Connected", what="connected")
    st = text(c, "alpha")
    assert st.startswith("r0 role:Secondary disk:Inconsistent size:16.0MiB protocol:C tls:off")
    assert "out-of-sync:0B " in st, st

    res = code(c.rblock("alpha", "primary", "r0", check=False), 1)
    assert "the first promotion of fresh data needs --force" in res.stderr
    assert code(c.rblock("alpha", "primary", "r0", "--force", check=False), 0).stdout == \
        "r0: forced: first promotion of fresh data\n"
    res = code(c.rblock("alpha", "primary", "r0", check=False), 1)
    assert res.stderr == "rblock: r0 is already Primary on alpha; nothing done\n", res.stderr
    assert res.stdout == ""
    res = code(c.rblock("beta", "secondary", "r0", check=False), 1)
    assert res.stderr == "rblock: r0 is already Secondary on beta; nothing done\n"
    res = code(c.rblock("beta", "primary", "r0", check=False), 1)  # refused: alpha is Primary
    assert "peer alpha is Primary" in res.stderr
    res = code(c.rblock("alpha", "connect", "r0", check=False), 1)
    assert res.stderr == "rblock: r0 on alpha is already Connected to beta; nothing done\n"
    c.wait_synced()

    code(c.rblock("alpha", "disconnect", "r0", check=False), 0)
    res = code(c.rblock("alpha", "disconnect", "r0", check=False), 1)
    assert res.stderr == "rblock: r0 on alpha is already StandAlone; nothing done\n"
    st = text(c, "alpha")
    assert "beta connection:StandAlone (disconnected by the operator) role:Unknown" in st, st
    assert "    'rblock disconnect' on alpha; 'rblock connect r0' connects again" in st, st
    c.wait(lambda: c.peer("beta")["connection"] == "Connecting", what="beta Connecting")
    st = text(c, "beta")
    assert re.search(r"alpha connection:Connecting \(disconnected by the peer, for \d+", st), st
    assert re.search(r"disconnected by the peer \d+(\.\d)?s ago: 'rblock disconnect' on alpha",
                     st), st
    assert "alpha dials this node" in st, st
    res = code(c.rblock("beta", "connect", "r0", check=False), 1)  # it is Connecting already
    assert res.stderr == ("rblock: r0 on beta is already Connecting to alpha (it is not "
                          "StandAlone); nothing done\n")

    write_through(c, "alpha", 64 * KiB, os.urandom(12 * KiB))  # beta misses 12 KiB
    st = text(c, "alpha")
    assert "out-of-sync:12KiB " in st, st  # exact, not 0.0MiB
    code(c.rblock("alpha", "connect", "r0", check=False), 0)
    c.wait_synced()

    code(c.rblock("beta", "inject-fault", "r0", "--reads", check=False), 0)
    res = code(c.rblock("beta", "inject-fault", "r0", "--reads", check=False), 1)
    assert res.stderr == "rblock: the disk of r0 on beta already fails reads; nothing done\n"
    code(c.rblock("beta", "inject-fault", "r0", "--clear", check=False), 0)
    res = code(c.rblock("beta", "inject-fault", "r0", "--clear", check=False), 1)
    assert res.stderr == "rblock: no faults are injected on r0 on beta; nothing done\n"
    code(c.rblock("beta", "inject-fault", "r0", check=False), 2)  # usage: what to fail

    port = c.ports["beta"]["replication"]
    assert c.stop("beta") == 0
    c.wait(lambda: (c.peer("alpha")["connect_failure"] or {}).get("kind") == "peer unreachable",
           what="alpha finds beta unreachable")
    st = text(c, "alpha")
    assert re.search(r"beta connection:Connecting \(peer unreachable, for \d+", st), st
    assert re.search(rf"peer unreachable since \d+(\.\d)?s ago \(\d+ attempts, the last "
                     rf"\d+(\.\d)?s ago\): cannot connect to beta at 127\.0\.0\.1:{port}: "
                     rf"connection refused \(is 'rblock up' running there\?\)", st), st
    peer = c.peer("alpha")
    assert peer["dialer"] == "alpha" and peer["tls_version"] is None, peer
    assert peer["connection_for_s"] >= 0 and peer["connect_failure"]["attempts"] >= 1, peer
    assert c.res("alpha")["tls"] is False
    res = code(c.rblock("beta", "status", check=False), 1)  # its daemon is not running
    assert "cannot reach the node's control API" in res.stderr and "rblock up" in res.stderr
    res = code(c.rblock("beta", "create-md", check=False), 1)  # refused: it has metadata
    assert "already exists" in res.stderr and "--force" in res.stderr, res.stderr
    res = code(c.rblock("beta", "splitbrain", "export", "r0", "7", "--out", c.dir / "x.img",
                        check=False), 1)
    res = code(c.rblock("beta", "splitbrain", "export", "r0", check=False), 2)  # no id
    assert "needs the snapshot's id" in res.stderr, res.stderr


def test_adjust_applies_run_time_settings_and_names_the_rest(cluster):
    c = cluster(size="16M")
    c.start_fresh()
    cfg = c.configs["alpha"]
    res = code(c.rblock("alpha", "adjust", check=False), 1)
    assert res.stderr == (f"rblock: the node already runs with {cfg} as it is; nothing "
                          f"done\n"), res.stderr
    original = cfg.read_text()
    cfg.write_text(original.replace('resync_rate = "400M"', 'resync_rate = "8M"')
                   .replace("peer_timeout_s = 2.0", "peer_timeout_s = 3.0")
                   .replace('protocol = "C"', 'protocol = "B"'))
    res = code(c.rblock("alpha", "adjust", check=False), 0)
    assert res.stdout.splitlines() == [
        "resource.r0.peer_timeout_s: 2.0 -> 3.0: applied, at once, the current link included",
        "resource.r0.resync_rate: 400M/s -> 8M/s: applied, at once, a running resync "
        "included",
        "resource.r0.protocol: C -> B: not applied, takes a restart of the node (stop 'rblock "
        "up' and start it again)"], res.stdout
    # applied: a resync now runs at 8 MiB/s (16 MiB: about 2 s, not a blink)
    code(c.rblock("alpha", "invalidate", "r0", check=False), 0)  # alpha is Primary: live
    c.wait(lambda: c.peer("alpha")["replication"] != "Established", timeout_s=10,
           what="resync started")
    t0 = time.monotonic()
    c.wait_synced(timeout_s=60)
    assert time.monotonic() - t0 > 1.0, "the resync ran faster than the adjusted rate"
    # again: only the restart-needing change is left, so nothing is applied (exit 1)
    res = code(c.rblock("alpha", "adjust", "--json", check=False), 1)
    out = json.loads(res.stdout)
    assert out["applied"] == [] and out["config"] == str(cfg), out
    assert out["restart"] == [{"key": "resource.r0.protocol", "old": "C", "new": "B"}], out
    assert "nothing applied" in res.stderr and "resync_rate" in res.stderr, res.stderr
    # a secret change is applied and never shown (and the others go back)
    cfg.write_text(original.replace('secret = "test-secret"', 'secret = "new-secret-xyz"'))
    res = code(c.rblock("alpha", "adjust", check=False), 0)
    assert res.stdout.splitlines() == [
        "resource.r0.secret: changed: applied, from the next connection (the current link "
        "stays up)",
        "resource.r0.peer_timeout_s: 3.0 -> 2.0: applied, at once, the current link included",
        "resource.r0.resync_rate: 8M/s -> 400M/s: applied, at once, a running resync "
        "included"], res.stdout
    assert "new-secret" not in res.stdout + res.stderr + c.log("alpha")
    # a file that does not load: a config error (the CLI reads it first), nothing changed
    good = c.dir / "good-copy.toml"
    good.write_text(original)
    cfg.write_text(original.replace('protocol = "C"', 'protocol = "Q"'))
    res = code(c.rblock("alpha", "adjust", check=False), 2)
    assert "resource.r0.protocol: 'Q' is not one of A, B, C" in res.stderr, res.stderr
    # ... and the node, when only its own copy is wrong
    res = code(rblock("adjust", "--config", good, "--node", "alpha"), 2)
    assert "resource.r0.protocol: 'Q' is not one of A, B, C" in res.stderr, res.stderr
    assert "nothing was changed" in res.stderr, res.stderr
    st = json.loads(code(rblock("status", "--json", "--config", good, "--node", "alpha"),
                         0).stdout)
    assert st["resources"][0]["protocol"] == "C"


def test_wrong_secret_shown_beside_connecting_on_both_nodes(cluster):
    c = cluster(size="16M", secrets={"beta": "another-secret"})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    for node, other in (("alpha", "beta"), ("beta", "alpha")):
        c.wait(lambda n=node: (c.peer(n)["connect_failure"] or {}).get("kind") ==
               "wrong secret", timeout_s=15, what=f"{node} sees the wrong secret")
        st = text(c, node)
        assert re.search(rf"{other} connection:Connecting \(wrong secret, for \d+", st), st
        assert "does not know the shared secret; set the same secret on both nodes" in st, st


# --- TLS -------------------------------------------------------------------------------------------


def openssl(*args: object) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"openssl {args}: {proc.stderr}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed (make test installs it)")
    from tests.test_replication_tls import make_ca, make_cert

    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    files = {n: make_cert(d, n, "ca") for n in ("alpha", "beta")}
    files["mallory"] = make_cert(d, "mallory", "rogue")
    both = d / "rogue-and-ca.pem"  # mallory starts (its own CA) and trusts the cluster's
    both.write_bytes((d / "rogue-cert.pem").read_bytes() + (d / "ca-cert.pem").read_bytes())
    files["mallory-trusting-both"] = files["mallory"]._replace(ca=both)
    return files


def test_tls_refused_shown_beside_connecting(cluster, pki):
    # beta's certificate is signed by another CA: alpha refuses it
    c = cluster(size="16M", tls={"alpha": pki["alpha"], "beta": pki["mallory-trusting-both"]})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    for node in ("alpha", "beta"):
        c.wait(lambda n=node: (c.peer(n)["connect_failure"] or {}).get("kind") ==
               "TLS refused", timeout_s=20, what=f"{node} shows the TLS refusal")
    st = text(c, "alpha")
    assert re.search(r"beta connection:Connecting \(TLS refused, for \d+", st), st
    assert "protocol:C tls:on" in st, st
    assert "TLS handshake with beta" in st or "not signed by the CA" in st, st
    st = text(c, "beta")
    assert "TLS refused" in st and "a connection from 127.0.0.1" in st, st


def test_tls_on_one_node_only_shown_beside_connecting(cluster, pki):
    c = cluster(size="16M", tls={"alpha": pki["alpha"], "beta": None})  # beta: plain
    c.create_md()
    c.up("alpha")
    c.up("beta")
    for node in ("alpha", "beta"):
        c.wait(lambda n=node: (c.peer(n)["connect_failure"] or {}).get("kind") ==
               "TLS refused", timeout_s=20, what=f"{node} shows the TLS mismatch")
    assert "tls = true" in text(c, "beta"), text(c, "beta")
    assert "TLS refused" in text(c, "alpha")


def test_tls_link_shows_its_version(cluster, pki):
    c = cluster(size="16M", tls={"alpha": pki["alpha"], "beta": pki["beta"]})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    c.wait(lambda: c.peer("alpha")["connection"] == "Connected", what="connected")
    assert "protocol:C tls:TLSv1.3" in text(c, "alpha")
    assert c.peer("beta")["tls_version"] == "TLSv1.3"


# --- split brain and unrelated data ------------------------------------------------------------------


def test_split_brain_and_unrelated_data_beside_standalone(cluster):
    c = cluster(size="16M")
    c.create_md()
    # Two histories that never met: each node promoted alone on fresh data.
    for node in ("alpha", "beta"):
        c.up(node)
        code(c.rblock(node, "primary", "r0", "--force", check=False), 0)
        code(c.rblock(node, "secondary", "r0", check=False), 0)
        assert c.stop(node) == 0
    c.up("alpha")
    c.up("beta")
    c.wait(lambda: c.peer("alpha")["connection"] == "StandAlone", what="refused")
    st = text(c, "alpha")
    assert "beta connection:StandAlone (unrelated data) role:Unknown" in st, st
    assert ("unrelated data: the nodes share no generation (rule no-match); keep one node's "
            "data: 'rblock connect r0 --discard-my-data' on the node whose changes") in st, st
    # resolve, then make a split brain: both write while disconnected
    code(c.rblock("beta", "connect", "r0", "--discard-my-data", check=False), 0)
    code(c.rblock("alpha", "connect", "r0", check=False), 0)
    c.wait_synced()
    code(c.rblock("alpha", "primary", "r0", check=False), 0)
    code(c.rblock("alpha", "disconnect", "r0", check=False), 0)
    c.wait(lambda: c.res("beta")["disk"] == "Outdated", what="beta Outdated")
    code(c.rblock("beta", "primary", "r0", "--force", check=False), 0)
    for node in ("alpha", "beta"):
        write_through(c, node, 0, os.urandom(64 * KiB))
    code(c.rblock("alpha", "connect", "r0", check=False), 0)
    for node in ("alpha", "beta"):
        c.wait(lambda n=node: c.peer(n)["split_brain"], what=f"{node} sees the split brain")
        st = text(c, node)
        other = "beta" if node == "alpha" else "alpha"
        assert f"{other} connection:StandAlone (split brain) role:Unknown" in st, st
        assert "split brain: both nodes wrote since they parted" in st, st
        assert "'rblock splitbrain list r0' there" in st, st


# --- events ---------------------------------------------------------------------------------------------


def _events(c: Cluster, node: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rblock", "events", *extra, "--config",
                             str(c.configs[node]), "--node", node], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def _stop(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err


def test_events_start_with_the_state_and_carry_timestamps(cluster):
    c = cluster(size="16M")
    c.start_fresh()
    pt, pj = _events(c, "alpha"), _events(c, "alpha", "--json")
    try:
        qt, qj = reader(pt), reader(pj)
        first = collect(qt, lambda ls: any(" exists -" in x for x in ls))
        assert re.fullmatch(rf"{TIMESTAMP} r0 exists role:Primary disk:UpToDate protocol:C "
                            r"beta connection:Connected peer-role:Secondary "
                            r"replication:Established peer-disk:UpToDate out-of-sync:0B\n",
                            first[0]), first
        assert re.fullmatch(rf"{TIMESTAMP} exists -\n", first[1]), first
        jfirst = [json.loads(x) for x in collect(qj, lambda ls: len(ls) >= 2)]
        assert [(e["what"], e["resource"]) for e in jfirst] == [("exists", "r0"),
                                                               ("exists", "-")], jfirst
        assert jfirst[0]["status"]["role"] == "Primary" and jfirst[0]["time"] > 0
        code(c.rblock("alpha", "disconnect", "r0", check=False), 0)
        later = collect(qt, lambda ls: any("connection Connected -> StandAlone" in x
                                           for x in ls))
        line = next(x for x in later if "connection Connected -> StandAlone" in x)
        assert re.fullmatch(rf"{TIMESTAMP} r0 connection Connected -> StandAlone\n", line), line
        assert all(re.match(TIMESTAMP, x) for x in later), later
        jl = [json.loads(x) for x in collect(qj, lambda ls: any(
            '"StandAlone"' in x for x in ls))]
        assert any(e["what"] == "connection" and e["new"] == "StandAlone" for e in jl), jl
    finally:
        for p in (pt, pj):
            err = _stop(p)
            assert "Traceback" not in err, err
        assert pt.returncode == 0 and pj.returncode == 0, (pt.returncode, pj.returncode)


def test_output_cut_short_by_its_reader_is_no_error(cluster, tmp_path):
    c = cluster(size="16M")
    c.create_md("alpha")
    c.up("alpha")
    args = f"--config {c.configs['alpha']} --node alpha"
    py = f"{sys.executable} -m rblock"
    for cmd in (f"{py} status {args}", f"{py} status --json {args}",
                f"{py} config show {args}", f"{py} splitbrain list r0 {args}"):
        # `true` reads nothing and exits at once: every write of rblock meets a closed pipe
        res = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | true"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (cmd, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    # events: head takes the first line and leaves; rblock notices with no event to write
    t0 = time.monotonic()
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {py} events {args} | head -1"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert re.fullmatch(rf"{TIMESTAMP} r0 exists role:Secondary .*\n", res.stdout), res.stdout
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert time.monotonic() - t0 < 20


# --- serve -------------------------------------------------------------------------------------------


def test_serve_on_all_addresses_prints_a_uri_a_client_can_dial(rblock_serve, tmp_path):
    img = make_image(tmp_path / "disk.img", MiB)
    srv = rblock_serve(img, "--listen", "0.0.0.0:0")
    host = socket.gethostname()
    assert re.fullmatch(rf"nbd://{re.escape(host)}:\d+/disk", srv.uri), srv.uri
    port = int(srv.uri.rsplit(":", 1)[1].split("/")[0])
    log = srv.log()
    assert f"listening on all addresses (0.0.0.0:{port})" in log, log
    assert f"nbd://127.0.0.1:{port}/disk" in log, log
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # it does listen
        assert s.recv(8) == b"NBDMAGIC"
    assert srv.stop() == 0


def _bad_tls(tmp_path: Path, pki) -> dict[str, tuple[list, str, str]]:
    good = pki["alpha"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    enc = tmp_path / "encrypted-key.pem"
    openssl("pkey", "-in", good.key, "-out", enc, "-aes256", "-passout", "pass:x")
    return {  # case: (cert, key, ca), which file, the words
        "swapped": ((good.key, good.cert, None), "cert", "holds a private key, not a "
                    "certificate (the two files swapped?)"),
        "not PEM": ((garbage, good.key, None), "cert", "is not a certificate: it is not PEM"),
        "other key": ((good.cert, pki["beta"].key, None), "key", "is not the key of the "
                      "certificate"),
        "encrypted": ((good.cert, enc, None), "key", "is encrypted with a passphrase"),
        "missing": ((good.cert, tmp_path / "nope.pem", None), "key", "cannot read"),
        "ca is a key": ((good.cert, good.key, good.key), "ca", "holds no usable CA "
                        "certificate: it holds a private key"),
    }


def test_serve_reports_bad_tls_files_in_words(tmp_path, pki):
    img = make_image(tmp_path / "disk.img", MiB)
    for case, ((cert, key, ca), which, words) in _bad_tls(tmp_path, pki).items():
        args = ["serve", img, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key]
        if ca:
            args += ["--tls-ca", ca]
        res = code(rblock(*args, timeout_s=30), 2)
        assert res.stderr.startswith(f"rblock serve: --tls-{which}: "), (case, res.stderr)
        assert words in res.stderr, (case, res.stderr)
        assert "_ssl.c" not in res.stderr and "PEM lib" not in res.stderr, (case, res.stderr)
        assert "ready" not in res.stdout


def test_up_reports_bad_peer_tls_files_in_words(tmp_path, pki):
    for case, ((cert, key, ca), which, words) in _bad_tls(tmp_path, pki).items():
        files = pki["alpha"]._replace(cert=cert, key=key, ca=ca or pki["alpha"].ca)
        c = Cluster(tmp_path / case.replace(" ", "-"), size="16M",
                    tls={"alpha": files, "beta": pki["beta"]})
        c.create_md("alpha")
        res = code(c.rblock("alpha", "up", check=False, timeout_s=30), 2)
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"rblock: {c.configs['alpha']}: node.alpha.tls_{which}: "), \
            (case, last)
        assert words in last and "_ssl.c" not in last, (case, last)
