"""rblock.config: the example, every error (key path + fix in the message), path resolution,
and random valid configs written by a tiny TOML writer, loaded back value for value."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rblock.config import (
    Address,
    ClusterConfig,
    ConfigError,
    NodeConfig,
    NodeTLS,
    ResourceConfig,
    load,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "two-nodes.toml"


# -- a tiny TOML writer --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else toml_value(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # repr of a float is valid TOML, inf and nan included
    if isinstance(v, str):
        out = []
        for ch in v:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def dump_toml(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """Scalars of a table first, under its [header], then its sub-tables."""
    lines = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append("[" + ".".join(toml_key(k) for k in prefix) + "]")
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(lines) + "\n" if lines else ""
    for k, v in tables.items():
        text += dump_toml(v, prefix + (k,))
    return text


def test_toml_writer_round_trips():
    import tomllib

    data = {"a": 1, "b": {"c": "x\"\\\n\x7f\u00e9", "d": {"e": 1.5, "f": True}}, "g": {}}
    assert tomllib.loads(dump_toml(data)) == data


# -- helpers -------------------------------------------------------------------------------------


def base() -> dict[str, Any]:
    """The example file as a dict: r0 on alpha and beta."""
    return {
        "resource": {"r0": {"size": "256M", "protocol": "C", "secret": "change-me"}},
        "node": {
            "alpha": {
                "replication": "127.0.0.1:7790", "control": "127.0.0.1:7800",
                "nbd": "127.0.0.1:10809", "libvirt": "qemu:///system",
                "disk": {"r0": "alpha/r0.img"},
            },
            "beta": {
                "replication": "127.0.0.1:7791", "control": "127.0.0.1:7801",
                "nbd": "127.0.0.1:10810",
                "disk": {"r0": "beta/r0.img"},
            },
        },
    }


def write(tmp: Path, data: dict[str, Any] | str, name: str = "cluster.toml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else dump_toml(data))
    return path


def load_dict(tmp: Path, data: dict[str, Any] | str) -> ClusterConfig:
    return load(write(tmp, data))


def error_of(tmp: Path, data: dict[str, Any] | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_dict(tmp, data)
    msg = str(info.value)
    assert msg.startswith(str(tmp / "cluster.toml") + ": "), msg  # always names the file
    return msg


def third_node(d: dict[str, Any], name: str = "gamma", **extra: Any) -> dict[str, Any]:
    d["node"][name] = {"replication": "127.0.0.1:7792", "control": "127.0.0.1:7802",
                       "nbd": "127.0.0.1:10811", **extra}
    return d


# -- the example ---------------------------------------------------------------------------------


def test_example_loads_with_expected_values():
    cfg = load(EXAMPLE)
    here = EXAMPLE.parent
    assert cfg.path == EXAMPLE
    assert list(cfg.resources) == ["r0"]
    assert list(cfg.nodes) == ["alpha", "beta"]
    assert cfg.guests == {}

    r0 = cfg.resource("r0")
    assert r0 == ResourceConfig(
        name="r0", size_bytes=256 << 20, protocol="C", secret="change-me",
        ping_interval_s=1.0, peer_timeout_s=4.0, connect_retry_max_s=5.0,
        resync_rate_bytes_per_s=200 << 20, nodes=("alpha", "beta"),
    )
    assert "change-me" not in repr(r0)  # the secret stays out of logs

    alpha = cfg.node("alpha")
    assert alpha == NodeConfig(
        name="alpha",
        replication=Address("127.0.0.1", 7790), control=Address("127.0.0.1", 7800),
        nbd=Address("127.0.0.1", 10809), libvirt="qemu:///system",
        disks={"r0": here / "alpha" / "r0.img"}, metas={"r0": here / "alpha" / "r0.img.meta"},
    )
    beta = cfg.node("beta")
    assert beta.libvirt is None
    assert str(beta.replication) == "127.0.0.1:7791"
    assert beta.disks == {"r0": here / "beta" / "r0.img"}
    assert beta.metas == {"r0": here / "beta" / "r0.img.meta"}
    assert not alpha.diskless

    assert cfg.resources_of("alpha") == [r0]
    assert [n.name for n in cfg.peers("r0", "alpha")] == ["beta"]
    assert [n.name for n in cfg.peers("r0", "beta")] == ["alpha"]


def test_lookup_errors_list_what_exists():
    cfg = load(EXAMPLE)
    with pytest.raises(ConfigError, match=r"node 'x' not in .*two-nodes.toml; nodes: alpha, beta"):
        cfg.node("x")
    with pytest.raises(ConfigError, match=r"resource 'r9' not in .*; resources: r0"):
        cfg.resource("r9")
    with pytest.raises(ConfigError, match="nodes: alpha, beta"):
        cfg.resources_of("x")
    with pytest.raises(ConfigError, match="resources: r0"):
        cfg.peers("r9", "alpha")


def test_base_dict_is_the_example(tmp_path):
    cfg = load_dict(tmp_path, base())
    ex = load(EXAMPLE)
    assert cfg.resources == ex.resources
    assert cfg.node("alpha").replication == ex.node("alpha").replication


# -- values, defaults, paths ---------------------------------------------------------------------


def test_optional_resource_keys(tmp_path):
    d = base()
    d["resource"]["r0"].update(protocol="a", ping_interval_s=2, peer_timeout_s=7.5,
                               connect_retry_max_s=30, resync_rate="1G", size=8192)
    r0 = load_dict(tmp_path, d).resource("r0")
    assert (r0.protocol, r0.ping_interval_s, r0.peer_timeout_s, r0.connect_retry_max_s) == (
        "A", 2.0, 7.5, 30.0)
    assert isinstance(r0.ping_interval_s, float)
    assert r0.resync_rate_bytes_per_s == 1 << 30
    assert r0.size_bytes == 8192


def test_relative_paths_are_from_the_config_dir_not_the_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "rblock"
    conf_dir.mkdir(parents=True)
    d = base()
    d["node"]["alpha"]["disk"]["r0"] = "../disks/./alpha.img"
    d["node"]["alpha"]["meta"] = {"r0": "meta/alpha.meta"}
    d["node"]["beta"]["disk"]["r0"] = "/dev/vg0/r0"
    d["node"]["alpha"]["control"] = "unix:run/alpha.sock"
    path = write(conf_dir, d)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load(os.path.relpath(path))  # a relative path to the file itself, too
    assert cfg.path == path
    alpha, beta = cfg.node("alpha"), cfg.node("beta")
    assert alpha.disks["r0"] == tmp_path / "etc" / "disks" / "alpha.img"
    assert alpha.metas["r0"] == conf_dir / "meta" / "alpha.meta"
    assert beta.disks["r0"] == Path("/dev/vg0/r0")
    assert beta.metas["r0"] == Path("/dev/vg0/r0.meta")
    assert alpha.control == Address("", 0, str(conf_dir / "run" / "alpha.sock"))
    assert str(alpha.control) == f"unix:{conf_dir}/run/alpha.sock"
    for p in [*alpha.disks.values(), *alpha.metas.values(), *beta.disks.values()]:
        assert p.is_absolute()


def with_tls(d: dict[str, Any], nodes: tuple[str, ...] = ("alpha", "beta")) -> dict[str, Any]:
    """base() with tls = true on r0 and TLS files on NODES (relative paths)."""
    d["resource"]["r0"]["tls"] = True
    for n in nodes:
        d["node"][n].update(tls_cert=f"pki/{n}-cert.pem", tls_key=f"pki/{n}-key.pem",
                            tls_ca="pki/ca-cert.pem")
    return d


def test_tls_is_off_by_default(tmp_path):
    cfg = load_dict(tmp_path, base())
    assert cfg.resource("r0").tls is False
    assert cfg.node("alpha").tls is None


def test_tls_files_are_taken_from_the_config_dir(tmp_path, monkeypatch):
    d = with_tls(base())
    d["node"]["beta"].update(tls_cert="/etc/rblock/beta.pem", tls_key="~/beta.key")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir("/")
    cfg = load_dict(tmp_path, d)
    assert cfg.resource("r0").tls is True
    assert cfg.node("alpha").tls == NodeTLS(cert=tmp_path / "pki" / "alpha-cert.pem",
                                            key=tmp_path / "pki" / "alpha-key.pem",
                                            ca=tmp_path / "pki" / "ca-cert.pem")
    assert cfg.node("beta").tls == NodeTLS(cert=Path("/etc/rblock/beta.pem"),
                                           key=tmp_path / "home" / "beta.key",
                                           ca=tmp_path / "pki" / "ca-cert.pem")


def test_example_tls_lines_work_uncommented(tmp_path):
    """The commented TLS lines of the example are valid as written (README points at them)."""
    text = re.sub(r"(?m)^# (tls_(cert|key|ca) = )", r"\1", EXAMPLE.read_text())
    text = text.replace("# tls = false ", "tls = true ", 1)
    text = text.replace('[node.beta.disk]', 'tls_cert = "pki/beta-cert.pem"\n'
                        'tls_key = "pki/beta-key.pem"\ntls_ca = "pki/ca-cert.pem"\n'
                        '[node.beta.disk]')
    cfg = load_dict(tmp_path, text)
    assert cfg.resource("r0").tls is True
    assert cfg.node("alpha").tls == NodeTLS(cert=tmp_path / "pki" / "alpha-cert.pem",
                                            key=tmp_path / "pki" / "alpha-key.pem",
                                            ca=tmp_path / "pki" / "ca-cert.pem")


def test_tls_files_without_a_tls_resource_are_kept(tmp_path):
    """Files may be set up before TLS is switched on; they are checked by `rblock up` only
    once a resource of the node uses them."""
    d = with_tls(base(), ("alpha",))
    d["resource"]["r0"]["tls"] = False
    cfg = load_dict(tmp_path, d)
    assert cfg.resource("r0").tls is False
    assert cfg.node("alpha").tls is not None and cfg.node("beta").tls is None


def test_tls_files_may_be_shared_by_nodes_on_one_machine(tmp_path):
    d = with_tls(base())
    d["node"]["beta"].update(tls_cert="pki/alpha-cert.pem", tls_key="pki/alpha-key.pem")
    cfg = load_dict(tmp_path, d)
    assert cfg.node("alpha").tls == cfg.node("beta").tls


def test_unix_control_absolute_and_ipv6(tmp_path):
    d = base()
    d["node"]["alpha"]["control"] = "unix:/run/rblock/alpha.sock"
    d["node"]["beta"]["nbd"] = "[::1]:10810"
    cfg = load_dict(tmp_path, d)
    assert cfg.node("alpha").control.unix_path == "/run/rblock/alpha.sock"
    assert cfg.node("beta").nbd == Address("::1", 10810)
    assert str(cfg.node("beta").nbd) == "[::1]:10810"


def test_diskless_witness_and_guests(tmp_path):
    d = third_node(base(), "witness")
    d["guest"] = {"vm1": {"resource": "r0", "memory": "2G", "anything": {"goes": [1, 2]}}}
    cfg = load_dict(tmp_path, d)
    w = cfg.node("witness")
    assert w.diskless and w.disks == {} and w.metas == {}
    assert cfg.resources_of("witness") == []
    assert [n.name for n in cfg.peers("r0", "witness")] == ["alpha", "beta"]
    assert cfg.resource("r0").nodes == ("alpha", "beta")
    assert cfg.guests == {"vm1": {"resource": "r0", "memory": "2G", "anything": {"goes": [1, 2]}}}


def test_nodes_keep_file_order_and_resources_of(tmp_path):
    d = base()
    d["resource"]["r1"] = {"size": "1G", "secret": "s"}
    d = third_node(d, "gamma", disk={"r1": "g/r1.img"})
    d["node"]["alpha"]["disk"]["r1"] = "alpha/r1.img"
    cfg = load_dict(tmp_path, d)
    assert cfg.resource("r1").nodes == ("alpha", "gamma")
    assert [r.name for r in cfg.resources_of("alpha")] == ["r0", "r1"]
    assert [r.name for r in cfg.resources_of("gamma")] == ["r1"]
    assert [n.name for n in cfg.peers("r1", "gamma")] == ["alpha"]


def test_same_disk_path_on_different_machines_is_fine(tmp_path):
    d = base()
    d["node"]["alpha"]["replication"] = "10.0.0.1:7790"
    d["node"]["beta"]["replication"] = "10.0.0.2:7790"  # same port, other host: fine too
    d["node"]["alpha"]["disk"]["r0"] = "/dev/vg0/r0"
    d["node"]["beta"]["disk"]["r0"] = "/dev/vg0/r0"
    cfg = load_dict(tmp_path, d)
    assert cfg.node("alpha").disks == cfg.node("beta").disks


def test_empty_file_is_an_empty_cluster(tmp_path):
    cfg = load_dict(tmp_path, "")
    assert (cfg.resources, cfg.nodes, cfg.guests) == ({}, {}, {})


# -- every error names the key path and the fix --------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file; create it"):
        load(tmp_path / "nope.toml")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)


def test_toml_syntax_error_has_line_and_column(tmp_path):
    msg = error_of(tmp_path, '[resource.r0]\nsize = "256M"\nsecret = change-me\n')
    assert "TOML syntax error" in msg
    assert "line 3" in msg and "column" in msg


def test_not_utf8(tmp_path):
    (tmp_path / "cluster.toml").write_bytes(b'[resource.r0]\nsecret = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load(tmp_path / "cluster.toml")


def mutate(fn):
    d = base()
    fn(d)
    return d


def _set(path: str, value: Any):
    """A mutation setting (or, with value None, deleting) a dotted key of base()."""
    *parents, last = path.split(".")

    def fn(d):
        for p in parents:
            d = d.setdefault(p, {})
        if value is None:
            del d[last]
        else:
            d[last] = value
    return fn


A = "node.alpha"
B = "node.beta"
R = "resource.r0"

ERRORS = [
    # (id, mutation, key path in the message, words of the fix)
    ("top-level typo", _set("nodes", {"gamma": {}}), "nodes: unknown top-level table",
     "did you mean 'node'"),
    ("top-level scalar", _set("version", 2), "version: unknown top-level integer", "valid tables"),
    ("resource not a table", _set("resource", 3), "resource: must be tables", "[resource.NAME]"),
    ("node entry not a table", _set("node.gamma", "x"), "node.gamma: must be a table", "header"),
    ("guest not a table", _set("guest.vm1", 1), "guest.vm1: must be a table", "header"),
    ("bad node name", lambda d: d["node"].update({"al pha": d["node"].pop("alpha")}),
     "node.al pha: name 'al pha' is not allowed", "letters, digits"),
    ("resource key typo", _set(f"{R}.protocl", "A"), f"{R}.protocl: unknown key",
     "did you mean 'protocol'"),
    ("node key typo", _set(f"{A}.replicaton", "127.0.0.1:1"), f"{A}.replicaton: unknown key",
     "valid keys: replication, control, nbd, libvirt, disk, meta, tls_cert, tls_key, tls_ca, idle_poll_us"),
    ("missing size", _set(f"{R}.size", None), f"{R}.size: missing", "add size ="),
    ("missing secret", _set(f"{R}.secret", None), f"{R}.secret: missing", "add secret ="),
    ("empty secret", _set(f"{R}.secret", ""), f"{R}.secret: '' is not a non-empty", "set secret"),
    ("blank secret", _set(f"{R}.secret", "  "), f"{R}.secret:", "set secret"),
    ("secret not a string", _set(f"{R}.secret", 42), f"{R}.secret: 42", "set secret"),
    ("missing replication", _set(f"{A}.replication", None), f"{A}.replication: missing",
     'add replication = "HOST:PORT"'),
    ("missing control", _set(f"{B}.control", None), f"{B}.control: missing", "add control"),
    ("missing nbd", _set(f"{B}.nbd", None), f"{B}.nbd: missing", "add nbd"),
    ("bad size", _set(f"{R}.size", "256X"), f"{R}.size: size '256X'", 'write it like "256M"'),
    ("size float", _set(f"{R}.size", 1.5), f"{R}.size: 1.5 is not a size", "write it like"),
    ("size zero", _set(f"{R}.size", "0"), f"{R}.size: '0' is not positive", "write it like"),
    ("size not 4K", _set(f"{R}.size", "4097"), f"{R}.size: 4097 bytes is not a multiple",
     "set size = 8192"),
    ("size int not 4K", _set(f"{R}.size", 1000), f"{R}.size: 1000 bytes", "set size = 4096"),
    ("bad rate", _set(f"{R}.resync_rate", "fast"), f"{R}.resync_rate: size 'fast'",
     "write it like"),
    ("protocol D", _set(f"{R}.protocol", "D"),
     f"{R}.protocol: 'D' is not one of A, B, C; set protocol = \"C\"", ""),
    ("protocol int", _set(f"{R}.protocol", 3), f"{R}.protocol: 3 is not one of", "set protocol"),
    ("port not a number", _set(f"{A}.nbd", "127.0.0.1:http"), f"{A}.nbd: address",
     'write it like "127.0.0.1:7790"'),
    ("no port", _set(f"{A}.replication", "127.0.0.1"), f"{A}.replication: '127.0.0.1' has no port",
     "write it like"),
    ("port zero", _set(f"{A}.replication", "127.0.0.1:0"), f"{A}.replication:", "has port 0"),
    ("port range", _set(f"{B}.control", "127.0.0.1:70000"), f"{B}.control: address",
     "out of range"),
    ("bare ipv6", _set(f"{B}.nbd", "::1:10810"), f"{B}.nbd:", "needs brackets"),
    ("address not a string", _set(f"{B}.nbd", 10810), f"{B}.nbd: 10810 is not an address",
     "write it like"),
    ("unix nbd", _set(f"{A}.nbd", "unix:/run/x.sock"), f"{A}.nbd: 'unix:/run/x.sock': only "
     "control may be a unix socket", "write it like"),
    ("unix empty", _set(f"{A}.control", "unix:"), f"{A}.control: 'unix:' has no path",
     "write it like"),
    ("libvirt empty", _set(f"{A}.libvirt", ""), f"{A}.libvirt:", "set libvirt"),
    ("disk not a table", _set(f"{A}.disk", "r0.img"), f"{A}.disk: must be a table", "write [node"),
    ("disk path not a string", _set(f"{A}.disk.r0", 1), f"{A}.disk.r0: 1 is not a path",
     "write it like"),
    ("one data node", _set(f"{B}.disk", None),
     f"{R}: has a disk on 1 node (alpha), but a resource needs exactly 2 data nodes for now",
     "under [node.NODE.disk] of one more node (nodes without it: beta)"),
    ("no data node", lambda d: [n.pop("disk") for n in d["node"].values()],
     f"{R}: has a disk on 0 nodes", "one more node"),
    ("three data nodes", lambda d: third_node(d, disk={"r0": "g/r0.img"}),
     f"{R}: has a disk on 3 nodes (alpha, beta, gamma)", "all but two"),
    ("disk for unknown resource", _set(f"{B}.disk.r1", "beta/r1.img"),
     f"{B}.disk.r1: no [resource.r1] in this file (resources: r0)", "add [resource.r1]"),
    ("meta without disk", _set(f"{B}.meta.r1", "x.meta"), f"{B}.meta.r1: node 'beta' has no disk",
     "or remove this line"),
    ("same address two nodes", _set(f"{B}.nbd", "127.0.0.1:10809"),
     f"{B}.nbd: '127.0.0.1:10809' is also {A}.nbd", "different port"),
    ("same address across kinds", _set(f"{B}.control", "127.0.0.1:7790"),
     f"{B}.control: '127.0.0.1:7790' is also {A}.replication", "different port"),
    ("same address one node", _set(f"{A}.nbd", "127.0.0.1:7800"),
     f"{A}.nbd: '127.0.0.1:7800' is also {A}.control", "different port"),
    ("localhost is 127.0.0.1", _set(f"{B}.replication", "localhost:7790"),
     f"{B}.replication: 'localhost:7790' is also {A}.replication", "different port"),
    ("same unix socket", lambda d: (_set(f"{A}.control", "unix:/run/c.sock")(d),
                                    _set(f"{B}.control", "unix:/run/c.sock")(d)),
     f"{B}.control: 'unix:/run/c.sock' is also {A}.control", "another socket path"),
    ("same disk two nodes", _set(f"{B}.disk.r0", "alpha/r0.img"), f"{B}.disk.r0:",
     f"also used by {A}.disk.r0; give each"),
    ("same disk two resources", lambda d: (
        _set("resource.r1", {"size": "1M", "secret": "s"})(d),
        _set(f"{A}.disk.r1", "./alpha/../alpha/r0.img")(d),
        _set(f"{B}.disk.r1", "beta/r1.img")(d)),
     f"{A}.disk.r1:", f"also used by {A}.disk.r0; give each"),
    ("meta is another disk", _set(f"{B}.meta.r0", "alpha/r0.img"), f"{B}.meta.r0:",
     f"also used by {A}.disk.r0"),
    ("loopback hosts are one machine", lambda d: (
        _set(f"{B}.replication", "127.0.0.2:7790")(d),
        _set(f"{B}.disk.r0", "alpha/r0.img")(d)), f"{B}.disk.r0:", "also used by"),
    ("ping zero", _set(f"{R}.ping_interval_s", 0), f"{R}.ping_interval_s: 0 is not a finite, positive",
     "set ping_interval_s = 1.0"),
    ("timeout negative", _set(f"{R}.peer_timeout_s", -4.0), f"{R}.peer_timeout_s: -4.0",
     "set peer_timeout_s = 4.0"),
    ("retry string", _set(f"{R}.connect_retry_max_s", "5"), f"{R}.connect_retry_max_s: '5'",
     "set connect_retry_max_s = 5.0"),
    ("retry bool", _set(f"{R}.connect_retry_max_s", True), f"{R}.connect_retry_max_s: true",
     "set connect_retry_max_s"),
    ("timeout inf", _set(f"{R}.peer_timeout_s", float("inf")), f"{R}.peer_timeout_s: inf",
     "set peer_timeout_s"),
    ("timeout nan", _set(f"{R}.ping_interval_s", float("nan")), f"{R}.ping_interval_s: nan",
     "set ping_interval_s"),
    ("timeout equals ping", _set(f"{R}.peer_timeout_s", 1.0),
     f"{R}.peer_timeout_s: 1 is not more than ping_interval_s (1)", "set peer_timeout_s = 4"),
    ("timeout below ping", lambda d: d["resource"]["r0"].update(ping_interval_s=3,
                                                                peer_timeout_s=2),
     f"{R}.peer_timeout_s: 2 is not more than ping_interval_s (3)", "set peer_timeout_s = 12"),
    # peer-link TLS
    ("tls typo", _set(f"{R}.tsl", True), f"{R}.tsl: unknown key", "did you mean 'tls'"),
    ("tls string", _set(f"{R}.tls", "yes"), f"{R}.tls: 'yes' is not true or false",
     "set tls = true (TLS on the peer link) or remove the line"),
    ("tls integer", _set(f"{R}.tls", 1), f"{R}.tls: 1 is not true or false", "set tls = true"),
    ("tls without any files", _set(f"{R}.tls", True),
     f"{A}.tls_cert: missing; resource r0 has tls = true, so every node of it needs its TLS "
     "files", "add tls_cert, tls_key and tls_ca under [node.alpha], or set tls = false"),
    ("tls files on one node only", lambda d: with_tls(d, ("alpha",)),
     f"{B}.tls_cert: missing; resource r0 has tls = true", "under [node.beta]"),
    ("tls files on a third node only", lambda d: (with_tls(d, ()), third_node(
        d, tls_cert="c", tls_key="k", tls_ca="ca")),
     f"{A}.tls_cert: missing; resource r0 has tls = true", "under [node.alpha]"),
    ("tls_key missing", lambda d: (with_tls(d), d["node"]["beta"].pop("tls_key")),
     f"{B}.tls_key: missing; tls_cert is set, and TLS needs all of tls_cert, tls_key, tls_ca",
     'add tls_key = "pki/beta-key.pem" or remove tls_cert and tls_ca'),
    ("tls_ca alone", _set(f"{A}.tls_ca", "ca.pem"),
     f"{A}.tls_cert: missing; tls_ca is set", 'add tls_cert = "pki/alpha-cert.pem"'),
    ("tls_cert not a string", lambda d: (with_tls(d), _set(f"{A}.tls_cert", 3)(d)),
     f"{A}.tls_cert: 3 is not a path", 'write it like tls_cert = "pki/alpha-cert.pem"'),
    ("tls_key empty", lambda d: (with_tls(d), _set(f"{B}.tls_key", " ")(d)),
     f"{B}.tls_key: ' ' is not a path", 'write it like tls_key = "pki/beta-key.pem"'),
    ("tls_ca table", lambda d: (with_tls(d), _set(f"{A}.tls_ca", {"x": 1})(d)),
     f"{A}.tls_ca: a table is not a path", 'tls_ca = "pki/ca-cert.pem"'),
    ("tls key typo", _set(f"{A}.tls_crt", "x.pem"), f"{A}.tls_crt: unknown key",
     "did you mean 'tls_cert'"),
]


@pytest.mark.parametrize("mutation, key, fix", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_names_key_and_fix(tmp_path, mutation, key, fix):
    d = base()
    mutation(d)
    msg = error_of(tmp_path, d)
    prefix = str(tmp_path / "cluster.toml") + ": "
    assert msg[len(prefix):].startswith(key), msg
    assert fix in msg, msg
    assert "; " in msg, msg  # the fix follows the problem


def test_protocol_message_exactly(tmp_path):
    d = base()
    d["resource"]["r0"]["protocol"] = "D"
    path = write(tmp_path, d)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: resource.r0.protocol: 'D' is not one of A, B, C; " \
                              'set protocol = "C"'


def test_error_ids_are_unique():
    assert len({e[0] for e in ERRORS}) == len(ERRORS)


# -- random valid configs ------------------------------------------------------------------------

NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,15}\Z")
SECRETS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip())
UNITS = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("KiB", 10), ("MiB", 20)]


@st.composite
def sizes(draw, multiple: int = 1) -> tuple[Any, int]:
    """A size as written in the file (int or string) and its value in bytes."""
    suffix, shift = draw(st.sampled_from(UNITS))
    step = max(1, multiple >> shift)
    n = draw(st.integers(1, 4096)) * step
    value = n << shift
    if suffix == "" and draw(st.booleans()):
        return value, value
    return f"{n}{draw(st.sampled_from(['', ' ']))}{suffix}", value


SECONDS = st.floats(min_value=0.001, max_value=1000, allow_nan=False, allow_infinity=False)


@st.composite
def clusters(draw) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config as a dict, what load() must return for it, paths relative to the file)."""
    node_names = draw(st.lists(NAMES, min_size=2, max_size=4, unique=True))
    res_names = draw(st.lists(NAMES, min_size=0, max_size=3, unique=True))
    port = draw(st.integers(1, 60000))
    ports = iter(range(port, port + 100))
    hosts = ["127.0.0.1", "localhost", "[::1]", "10.0.0.1", "node.example"]

    nodes: dict[str, Any] = {}
    expect_nodes: dict[str, Any] = {}
    for n in node_names:
        t: dict[str, Any] = {}
        exp: dict[str, Any] = {"disks": {}, "metas": {}, "libvirt": None, "tls": None}
        for k in ("replication", "control", "nbd"):
            host = draw(st.sampled_from(hosts))
            p = next(ports)
            if k == "control" and draw(st.booleans()):
                t[k] = f"unix:run/{n}.sock"
                exp[k] = ("", 0, f"run/{n}.sock")
            else:
                t[k] = f"{host}:{p}"
                exp[k] = (host.strip("[]"), p, None)
        if draw(st.booleans()):
            t["libvirt"] = exp["libvirt"] = draw(st.sampled_from(
                ["qemu:///system", "qemu+ssh://root@h/system"]))
        if draw(st.booleans()):
            where = draw(st.sampled_from(["pki", "/etc/rblock"]))
            files = (f"{where}/{n}-cert.pem", f"{where}/{n}-key.pem", f"{where}/ca.pem")
            t["tls_cert"], t["tls_key"], t["tls_ca"] = files
            exp["tls"] = files
        nodes[n] = t
        expect_nodes[n] = exp

    resources: dict[str, Any] = {}
    expect_res: dict[str, Any] = {}
    for r in res_names:
        size, size_bytes = draw(sizes(4096))
        t = {"size": size, "secret": draw(SECRETS)}
        exp = {"size_bytes": size_bytes, "secret": t["secret"], "protocol": "C",
               "ping_interval_s": 1.0, "peer_timeout_s": 4.0, "connect_retry_max_s": 5.0,
               "resync_rate_bytes_per_s": 200 << 20, "tls": False}
        if draw(st.booleans()):
            t["protocol"] = draw(st.sampled_from(["A", "B", "C", "a", "b", "c"]))
            exp["protocol"] = t["protocol"].upper()
        if draw(st.booleans()):
            ping = draw(SECONDS)
            timeout = ping + draw(SECONDS)
            if timeout > ping:
                t["ping_interval_s"] = exp["ping_interval_s"] = ping
                t["peer_timeout_s"] = exp["peer_timeout_s"] = timeout
        if draw(st.booleans()):
            t["connect_retry_max_s"] = exp["connect_retry_max_s"] = draw(SECONDS)
        if draw(st.booleans()):
            t["resync_rate"], exp["resync_rate_bytes_per_s"] = draw(sizes())
        resources[r] = t
        expect_res[r] = exp

        holders = draw(st.lists(st.sampled_from(node_names), min_size=2, max_size=2,
                                unique=True))
        exp["nodes"] = tuple(n for n in node_names if n in holders)  # file order
        if all(expect_nodes[n]["tls"] for n in holders) and draw(st.booleans()):
            t["tls"] = exp["tls"] = True
        for n in holders:
            disk = f"{n}/{r}.img" if draw(st.booleans()) else f"/srv/{n}/{r}.img"
            nodes[n].setdefault("disk", {})[r] = disk
            meta = disk + ".meta"
            if draw(st.booleans()):
                meta = f"meta/{n}/{r}"
                nodes[n].setdefault("meta", {})[r] = meta
            expect_nodes[n]["disks"][r] = disk
            expect_nodes[n]["metas"][r] = meta

    data: dict[str, Any] = {}
    if resources or draw(st.booleans()):
        data["resource"] = resources
    data["node"] = nodes
    if draw(st.booleans()):
        data["guest"] = {"vm1": {"resource": "r", "vcpus": 2}}
    return data, {"resources": expect_res, "nodes": expect_nodes}


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_random_valid_configs_round_trip(case):
    data, expect = case
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp)
        cfg = load(write(base_dir, data))

        def absolute(p: str) -> Path:
            return Path(p) if p.startswith("/") else base_dir / p

    assert list(cfg.nodes) == list(expect["nodes"])
    assert list(cfg.resources) == list(expect["resources"])
    for name, exp in expect["resources"].items():
        r = cfg.resource(name)
        assert r.name == name
        for k, v in exp.items():
            assert getattr(r, k) == v, k
        for holder in r.nodes:
            assert [p.name for p in cfg.peers(name, holder)] == [
                n for n in r.nodes if n != holder]
    for name, exp in expect["nodes"].items():
        n = cfg.node(name)
        assert n.libvirt == exp["libvirt"]
        for k in ("replication", "control", "nbd"):
            host, port, unix = exp[k]
            want = Address(host, port, str(absolute(unix)) if unix else None)
            assert getattr(n, k) == want, k
        assert n.disks == {r: absolute(p) for r, p in exp["disks"].items()}
        assert n.metas == {r: absolute(p) for r, p in exp["metas"].items()}
        if exp["tls"] is None:
            assert n.tls is None
        else:
            assert n.tls == NodeTLS(*map(absolute, exp["tls"]))
        assert [r.name for r in cfg.resources_of(name)] == list(exp["disks"])
    assert cfg.guests == data.get("guest", {})


@settings(max_examples=100, deadline=None)
@given(clusters(), st.sampled_from(["size", "protocol", "secret", "timeouts", "typo", "tls"]))
def test_random_configs_with_one_fault_fail_at_that_key(case, fault):
    data, _ = case
    data = copy.deepcopy(data)
    if not data.get("resource"):
        return
    r = next(iter(data["resource"]))
    t = data["resource"][r]
    key = f"resource.{r}."
    if fault == "size":
        t["size"], key = 4095, key + "size"
    elif fault == "protocol":
        t["protocol"], key = "Z", key + "protocol"
    elif fault == "secret":
        t["secret"], key = "", key + "secret"
    elif fault == "tls":
        t["tls"], key = "on", key + "tls"
    elif fault == "timeouts":
        t["ping_interval_s"], t["peer_timeout_s"], key = 2.0, 2.0, key + "peer_timeout_s"
    else:
        t["sise"], key = "1M", key + "sise"
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ConfigError) as info:
            load(write(Path(tmp), data))
    assert f": {key}: " in str(info.value)


# -- [cluster] and fencing ---------------------------------------------------------------------


def test_fencing_defaults_follow_the_cluster_table(tmp_path):
    assert load_dict(tmp_path, base()).resource("r0").fencing == "none"
    assert load_dict(tmp_path, base()).etcd is None
    d = base()
    d["cluster"] = {"etcd": ["http://10.0.0.1:2379", "https://10.0.0.2:2379/"],
                    "lease_ttl_s": 3, "etcd_ca": "pki/ca.pem"}
    cfg = load_dict(tmp_path, d)
    assert cfg.resource("r0").fencing == "etcd"
    assert cfg.resource("r0").on_no_quorum == "suspend-io"
    assert cfg.etcd.endpoints == ("http://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert cfg.etcd.lease_ttl_s == 3 and cfg.etcd.prefix == "/rblock"
    assert cfg.etcd.ca == tmp_path / "pki" / "ca.pem"
    d["resource"]["r0"].update(fencing="none", on_no_quorum="io-error")
    r0 = load_dict(tmp_path, d).resource("r0")
    assert (r0.fencing, r0.on_no_quorum) == ("none", "io-error")


@pytest.mark.parametrize("cluster, resource, key, fix", [
    ({"etcd": "10.0.0.1:2379"}, {}, "cluster.etcd", "etcd client URLs"),
    ({"etcd": []}, {}, "cluster.etcd", "every member"),
    ({"lease_ttl_s": 5}, {}, "cluster.lease_ttl_s", "set without cluster.etcd"),
    ({"etcd": ["http://a:2379"], "lease_ttl_s": 1}, {}, "cluster.lease_ttl_s",
     "lease_ttl_s = 5"),
    ({"etcd": ["http://a:2379"], "lease_ttl_s": 2.5}, {}, "cluster.lease_ttl_s",
     "whole number"),
    ({"etcd": ["http://a:2379"], "etcd_prefix": "rblock"}, {}, "cluster.etcd_prefix",
     'starting with "/"'),
    ({"etcd": ["http://a:2379"], "etcd_cert": "c.pem"}, {}, "cluster.etcd_key", "both"),
    ({"etcd": ["http://a:2379"], "ectd": 1}, {}, "cluster.ectd",
     "unknown key"),
    (None, {"fencing": "etcd"}, "resource.r0.fencing", "[cluster] etcd"),
    ({"etcd": ["http://a:2379"]}, {"fencing": "dont-care"}, "resource.r0.fencing",
     'fencing = "etcd"'),
    ({"etcd": ["http://a:2379"]}, {"on_no_quorum": "freeze"}, "resource.r0.on_no_quorum",
     '"suspend-io"'),
])
def test_fencing_errors_name_key_and_fix(tmp_path, cluster, resource, key, fix):
    d = base()
    if cluster is not None:
        d["cluster"] = cluster
    d["resource"]["r0"].update(resource)
    msg = error_of(tmp_path, d)
    assert f": {key}: " in msg and fix in msg, msg
