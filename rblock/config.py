"""The cluster configuration: one TOML file, the same on every node.

Theory of operation
-------------------
`load(path)` reads the file with `tomllib`, then checks it in two passes:

1. Each table on its own: `[resource.NAME]`, `[node.NAME]` (with its `disk` and `meta`
   sub-tables). Unknown keys are errors, so a typo (`protocl = "A"`) never passes silently.
2. The cluster as a whole: every disk names a defined resource, every resource has a disk on
   exactly two nodes, no two listen addresses collide, no two disks or metadata files share
   a path on one machine, every node of a resource with `tls = true` has its TLS files.

Peer-link TLS is switched on per resource (`tls = true`, like DRBD's `net { tls yes; }`); the
files are per node, because the node's one replication listener serves all its resources:
`tls_cert` and `tls_key` (the node's identity) and `tls_ca` (the CA the peers' certificates
must be signed by). Whether the files exist and hold what they should is checked by
`rblock up` on the node they belong to (rblock/replica/link.py, `PeerTLS`), not here: the
same file is read on every node, and each machine has only its own files.

The first problem found raises `ConfigError`, whose message always reads
`FILE: key.path: what is wrong; how to fix it`. Everything returned is a frozen dataclass,
with sizes in bytes, times in seconds, and paths absolute (a relative path is taken from the
config file's directory, so every node can be started from any working directory).

`[guest.NAME]` tables and the `[hvctl]` table belong to hvctl and are kept as raw dicts
(hvctl/config.py checks them).

Which file, and which node: both tools read `--config FILE`, else `$RBLOCK_CONFIG`, else
DEFAULT_CONFIG_PATH (`config_source`), and a command that acts as a node defaults to this
host's name when the file has a node of that name (`this_node`). `effective(cfg, node)` is
what one node runs with (`rblock config show`, and what `rblock adjust` compares);
RUNTIME_KEYS are the settings a running node takes without a restart.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rblock.units import format_hostport, parse_hostport, parse_size

BLOCK_SIZE_BYTES = 4096  # a resource's size must be a whole number of blocks
NODES_PER_RESOURCE = 2  # data nodes (with a disk) per resource; a witness has no disk
NAME_LENGTH_MAX = 64
PROTOCOLS = ("A", "B", "C")

PING_INTERVAL_S_DEFAULT = 1.0
PEER_TIMEOUT_S_DEFAULT = 4.0
CONNECT_RETRY_MAX_S_DEFAULT = 5.0
# A peer that answers pings but not a write, flush or read for this long is dropped (DRBD's
# timeout x ko-count): the writes waiting for it then complete without it.
ACK_TIMEOUT_S_DEFAULT = 30.0
AL_EXTENTS_DEFAULT = 1237  # DRBD's default al-extents: 4.8 GiB of 4 MiB extents hot at once
AL_EXTENTS_MIN = 16  # a 32 MiB write (the NBD maximum) touches up to 9 extents at once
AL_EXTENTS_MAX = 2042  # what one activity-log slot holds
RESYNC_RATE_DEFAULT = "200M"
# [node.NAME] idle_poll_us (and rblock serve --idle-poll-us): after a reply or a frame to
# the peer, wait this long for the answer without sleeping (rblock/aio.py, IdlePoller); 0
# turns it off. 100 us by measurement (benchmarks/README.md, "QD1: where the idle wake-up
# goes"): 4k writes at queue depth 1 1.6-1.7x, replicated 2.2x; 50-200 us served alike.
IDLE_POLL_US_DEFAULT = 100
IDLE_POLL_US_MAX = 10_000
META_SUFFIX = ".meta"

# The cluster file of both tools (rblock and hvctl): --config, else $RBLOCK_CONFIG, else this.
CONFIG_ENV = "RBLOCK_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/rblock/cluster.toml"
# The secret of examples/two-nodes.toml: anyone who has read the README knows it, so a node
# using it warns (rblock up, status, config show).
EXAMPLE_SECRET = "change-me"
SECRET_HIDDEN = "(hidden)"  # what `config show` prints instead of a secret
# [resource.NAME] keys a running node takes from `rblock adjust`, and from when; every other
# key (and every [node.NAME] and [cluster] key) needs the node restarted.
RUNTIME_KEYS = {
    "resync_rate": "at once, a running resync included",
    "ping_interval_s": "at once, the current link included",
    "peer_timeout_s": "at once, the current link included",
    "ack_timeout_s": "at once",
    "connect_retry_max_s": "from the next connection attempt",
    "after_sb_0pri": "from the next connect",
    "after_sb_1pri": "from the next connect",
    "secret": "from the next connection (the current link stays up)",
}

TOP_LEVEL_KEYS = ("cluster", "resource", "node", "guest", "hvctl")
CLUSTER_KEYS = ("etcd", "etcd_prefix", "etcd_ca", "etcd_cert", "etcd_key", "lease_ttl_s")
ETCD_PREFIX_DEFAULT = "/rblock"
# The nodes' etcd lease: a dead Primary's key goes after this (plus an etcd election at
# worst); a live node renews it every third of it. etcd's own minimum is 1.5 x its election
# timeout (1.5 s with the defaults).
LEASE_TTL_S_DEFAULT = 5
FENCING_MODES = ("etcd", "none")
# (the same names as rblock/replica/state.py's AFTER_SB_*; config sits below the replica layer)
AFTER_SB_0PRI = ("disconnect", "discard-zero-changes", "discard-least-changes",
                 "discard-younger-primary")
AFTER_SB_1PRI = ("disconnect", "consensus", "discard-secondary")
ON_NO_QUORUM = ("suspend-io", "io-error")
TLS_KEYS = ("tls_cert", "tls_key", "tls_ca")  # per node: all three or none
TLS_EXAMPLES = {"tls_cert": "pki/{node}-cert.pem", "tls_key": "pki/{node}-key.pem",
                "tls_ca": "pki/ca-cert.pem"}
RESOURCE_KEYS = (
    "size", "protocol", "secret", "ping_interval_s", "peer_timeout_s",
    "connect_retry_max_s", "resync_rate", "tls", "ack_timeout_s", "al_extents",
    "fencing", "on_no_quorum", "after_sb_0pri", "after_sb_1pri",
)
NODE_KEYS = ("replication", "control", "nbd", "libvirt", "disk", "meta", *TLS_KEYS,
             "idle_poll_us")
ADDRESS_KEYS = ("replication", "control", "nbd")

# Names become NBD export names, URL path segments of the control API and file names, and
# they must be bare TOML keys (no quoting), so they are kept to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "::1"}


class ConfigError(Exception):
    """A problem in the config file; the message names the file, the key path and the fix."""


@dataclass(frozen=True)
class Address:
    """A TCP listen address, or a unix socket (`unix_path` set, host "" and port 0)."""

    host: str
    port: int
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return format_hostport(self.host, self.port)


@dataclass(frozen=True)
class NodeTLS:
    """A node's peer-link TLS files (absolute paths, on that node's machine)."""

    cert: Path  # this node's certificate (PEM; may hold the chain up to the CA)
    key: Path  # its private key (PEM, unencrypted: the daemon starts unattended)
    ca: Path  # the CA (PEM) every peer's certificate must be signed by


@dataclass(frozen=True)
class NodeConfig:
    name: str
    replication: Address
    control: Address
    nbd: Address
    libvirt: str | None
    disks: dict[str, Path]  # resource name -> backing disk (absolute)
    metas: dict[str, Path]  # resource name -> metadata file (absolute), one per disk
    tls: NodeTLS | None = None  # peer-link TLS files; None: this node has none
    idle_poll_us: int = IDLE_POLL_US_DEFAULT  # busy poll before sleeping; 0: off

    @property
    def diskless(self) -> bool:
        return not self.disks


@dataclass(frozen=True)
class ResourceConfig:
    name: str
    size_bytes: int
    protocol: str
    secret: str = field(repr=False)  # kept out of repr so it never lands in a log line
    ping_interval_s: float = PING_INTERVAL_S_DEFAULT
    peer_timeout_s: float = PEER_TIMEOUT_S_DEFAULT
    connect_retry_max_s: float = CONNECT_RETRY_MAX_S_DEFAULT
    resync_rate_bytes_per_s: int = 200 << 20
    nodes: tuple[str, ...] = ()  # the nodes with a disk for it, in file order
    tls: bool = False  # the peer link runs in TLS, both certificates checked against the CA
    ack_timeout_s: float = ACK_TIMEOUT_S_DEFAULT
    al_extents: int = AL_EXTENTS_DEFAULT  # activity-log extents hot at once (DRBD al-extents)
    fencing: str = "none"  # "etcd": the rules of rblock/replica/fencing.py; "none": DRBD's dont-care
    on_no_quorum: str = "suspend-io"  # single-copy writes wait ("io-error": fail) without etcd
    after_sb_0pri: str = "disconnect"  # automatic split-brain recovery (DRBD's), off by default
    after_sb_1pri: str = "disconnect"


@dataclass(frozen=True)
class EtcdConfig:
    """The [cluster] table: the etcd cluster that arbitrates (fencing, and hvctl's HA)."""

    endpoints: tuple[str, ...]
    prefix: str = ETCD_PREFIX_DEFAULT
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    lease_ttl_s: int = LEASE_TTL_S_DEFAULT


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    resources: dict[str, ResourceConfig]
    nodes: dict[str, NodeConfig]
    guests: dict[str, dict]
    hvctl: dict = field(default_factory=dict)  # the raw [hvctl] table
    etcd: EtcdConfig | None = None  # [cluster] etcd = [...]; None: no arbiter

    def node(self, name: str) -> NodeConfig:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                f"node '{name}' not in {self.path}; nodes: {_names(self.nodes)}"
            ) from None

    def resource(self, name: str) -> ResourceConfig:
        try:
            return self.resources[name]
        except KeyError:
            raise ConfigError(
                f"resource '{name}' not in {self.path}; resources: {_names(self.resources)}"
            ) from None

    def resources_of(self, node: str) -> list[ResourceConfig]:
        """The resources `node` holds a disk for, in file order ([] for a diskless node)."""
        self.node(node)
        return [r for r in self.resources.values() if node in r.nodes]

    def peers(self, resource: str, node: str) -> list[NodeConfig]:
        """The nodes other than `node` that hold a disk for `resource`, in file order.

        For a diskless node (a witness) these are all the resource's data nodes.
        """
        r = self.resource(resource)
        self.node(node)
        return [self.nodes[n] for n in r.nodes if n != node]


def load(path: str | Path) -> ClusterConfig:
    """Read and check the cluster config at `path`; raises ConfigError naming key and fix."""
    return _Loader(Path(path)).load()


@dataclass(frozen=True)
class ConfigSource:
    path: str
    origin: str  # "--config", "$RBLOCK_CONFIG" or "the default": said when the file is missing


def config_source(given: str | None, environ: Mapping[str, str] | None = None) -> ConfigSource:
    """The cluster file a command reads: GIVEN (--config), else $RBLOCK_CONFIG, else
    DEFAULT_CONFIG_PATH."""
    env = os.environ if environ is None else environ
    if given:
        return ConfigSource(given, "--config")
    if env.get(CONFIG_ENV):
        return ConfigSource(env[CONFIG_ENV], f"${CONFIG_ENV}")
    return ConfigSource(DEFAULT_CONFIG_PATH, "the default")


def load_from(src: ConfigSource) -> ClusterConfig:
    """`load`, with a missing file that nobody named on the command line said so."""
    if src.origin != "--config" and not Path(src.path).expanduser().exists():
        raise ConfigError(f"no cluster file: {src.path} ({src.origin}) does not exist; pass "
                          f"--config FILE or set ${CONFIG_ENV}")
    return load(src.path)


def this_node(cfg: ClusterConfig, given: str | None = None, hostname: str | None = None) -> str:
    """The node a command acts as: GIVEN (--node), checked; else this host's name, or the
    part before its first dot, if the file has a node of that name; else ConfigError."""
    if given:
        cfg.node(given)
        return given
    host = socket.gethostname() if hostname is None else hostname
    for name in (host, host.split(".", 1)[0]):
        if name in cfg.nodes:
            return name
    raise ConfigError(f"no --node given, and this host's name '{host}' is not a node in "
                      f"{cfg.path} (nodes: {_names(cfg.nodes)}); pass --node NAME")


def format_size(n: int) -> str:
    """Bytes as the config file writes them: "256M" when exact, else the number."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def effective(cfg: ClusterConfig, node: str, hide_secrets: bool = True) -> dict[str, Any]:
    """What NODE runs with, defaults filled in and paths absolute, keyed as the file is
    (`rblock config show --json`; `rblock adjust` compares two of them): [cluster], the
    node's resources, the node and the peers of its resources. Sizes are bytes."""
    me = cfg.node(node)
    mine = cfg.resources_of(node)
    out: dict[str, Any] = {"node": node, "config": str(cfg.path), "cluster": None,
                           "resources": {}, "nodes": {}}
    if cfg.etcd is not None:
        e = cfg.etcd
        out["cluster"] = {"etcd": list(e.endpoints), "etcd_prefix": e.prefix,
                          "etcd_ca": _path(e.ca), "etcd_cert": _path(e.cert),
                          "etcd_key": _path(e.key), "lease_ttl_s": e.lease_ttl_s}
    for r in mine:
        out["resources"][r.name] = {
            "size": r.size_bytes, "protocol": r.protocol,
            "secret": SECRET_HIDDEN if hide_secrets else r.secret,
            "ping_interval_s": r.ping_interval_s, "peer_timeout_s": r.peer_timeout_s,
            "connect_retry_max_s": r.connect_retry_max_s,
            "resync_rate": r.resync_rate_bytes_per_s, "tls": r.tls,
            "ack_timeout_s": r.ack_timeout_s, "al_extents": r.al_extents,
            "fencing": r.fencing, "on_no_quorum": r.on_no_quorum,
            "after_sb_0pri": r.after_sb_0pri, "after_sb_1pri": r.after_sb_1pri,
            "nodes": list(r.nodes)}
    shown = [me] + [p for r in mine for p in cfg.peers(r.name, node)]
    for n in shown:
        if n.name in out["nodes"]:
            continue
        t: dict[str, Any] = {"replication": str(n.replication), "control": str(n.control),
                             "nbd": str(n.nbd)}
        if n is me:
            if n.libvirt is not None:
                t["libvirt"] = n.libvirt
            if n.tls is not None:
                t.update(tls_cert=str(n.tls.cert), tls_key=str(n.tls.key), tls_ca=str(n.tls.ca))
            t["idle_poll_us"] = n.idle_poll_us
            t["disk"] = {r: str(p) for r, p in n.disks.items()}
            t["meta"] = {r: str(p) for r, p in n.metas.items()}
        out["nodes"][n.name] = t
    return out


def config_warnings(cfg: ClusterConfig, node: str) -> list[str]:
    """What in NODE's configuration is set but unsafe, in words (each with its fix)."""
    return [f"resource {r.name}: secret is \"{EXAMPLE_SECRET}\", the example's: anyone who "
            f"has read the README can pose as a peer; set secret to a long random string "
            f"(the same on both nodes, e.g. from 'openssl rand -hex 32') in {cfg.path}"
            for r in cfg.resources_of(node) if r.secret == EXAMPLE_SECRET]


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _names(d: dict) -> str:
    return ", ".join(d) if d else "(none)"


class _Loader:
    def __init__(self, path: Path) -> None:
        self.shown = str(path)  # as the user wrote it, so they recognise it in the message
        self.path = Path(os.path.abspath(path.expanduser()))
        self.base = self.path.parent

    def fail(self, key: str | None, text: str) -> ConfigError:
        where = f"{key}: " if key else ""
        return ConfigError(f"{self.shown}: {where}{text}")

    # -- whole file --------------------------------------------------------------------------

    def load(self) -> ClusterConfig:
        data = self.read()
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(key, f"unknown top-level {_kind(data[key])}" + _valid_keys(
                    key, TOP_LEVEL_KEYS, "tables",
                    "[cluster], [resource.NAME], [node.NAME], [guest.NAME], [hvctl]"))
        etcd = self.cluster(data.get("cluster", {}))
        resource_tables = self.group(data, "resource")
        node_tables = self.group(data, "node")
        guest_tables = self.group(data, "guest")

        partial = {name: self.resource_fields(name, t, etcd is not None)
                   for name, t in resource_tables.items()}
        nodes = {name: self.node(name, t) for name, t in node_tables.items()}
        self.check_disks(partial, nodes)
        self.check_addresses(nodes)
        self.check_paths(nodes)

        resources = {}
        for name, fields in partial.items():
            holders = tuple(n for n, node in nodes.items() if name in node.disks)
            self.check_holders(name, holders, nodes)
            if fields["tls"]:
                self.check_tls_files(name, holders, nodes)
            resources[name] = ResourceConfig(name=name, nodes=holders, **fields)
        guests = {name: dict(t) for name, t in guest_tables.items()}
        hvctl = data.get("hvctl", {})
        if not isinstance(hvctl, dict):
            raise self.fail("hvctl", f"must be a table, not {_a(_kind(hvctl))}; write it as an "
                            "[hvctl] header with keys below it")
        return ClusterConfig(self.path, resources, nodes, guests, dict(hvctl), etcd)

    # -- [cluster] ---------------------------------------------------------------------------

    def cluster(self, t: Any) -> EtcdConfig | None:
        if not isinstance(t, dict):
            raise self.fail("cluster", f"must be a table, not {_a(_kind(t))}; write it as a "
                            "[cluster] header with keys below it")
        self.check_keys("cluster", t, CLUSTER_KEYS)
        if "etcd" not in t:
            for k in CLUSTER_KEYS:
                if k in t:
                    raise self.fail(f"cluster.{k}", 'set without cluster.etcd; add etcd = '
                                    '["http://HOST:2379", ...] (every member) or remove it')
            return None
        eps = t["etcd"]
        if isinstance(eps, str):
            eps = [eps]
        if (not isinstance(eps, list) or not eps
                or not all(isinstance(e, str) and re.match(r"^https?://[^/\s]+/?$", e)
                           for e in eps)):
            raise self.fail("cluster.etcd", f"{_show(t['etcd'])} is not a list of etcd client "
                            'URLs; set etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", '
                            '"http://10.0.0.3:2379"] (every member of the etcd cluster)')
        prefix = t.get("etcd_prefix", ETCD_PREFIX_DEFAULT)
        if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.strip() != prefix:
            raise self.fail("cluster.etcd_prefix", f"{_show(prefix)} is not a key prefix "
                            f'starting with "/"; set etcd_prefix = "{ETCD_PREFIX_DEFAULT}"')
        files: dict[str, Path | None] = {}
        for k in ("etcd_ca", "etcd_cert", "etcd_key"):
            v = t.get(k)
            if v is not None and (not isinstance(v, str) or not v):
                raise self.fail(f"cluster.{k}", f"{_show(v)} is not a file path; set {k} = "
                                f'"pki/etcd-{k[5:]}.pem" or remove it')
            files[k] = self.resolve(v) if v else None
        if (files["etcd_cert"] is None) != (files["etcd_key"] is None):
            missing = "etcd_key" if files["etcd_key"] is None else "etcd_cert"
            raise self.fail(f"cluster.{missing}", "missing; a client certificate needs both "
                            "etcd_cert and etcd_key (or neither)")
        ttl = t.get("lease_ttl_s", LEASE_TTL_S_DEFAULT)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 2 <= ttl <= 600:
            raise self.fail("cluster.lease_ttl_s", f"{_show(ttl)} is not a whole number of "
                            f"seconds from 2 to 600 (etcd leases are whole seconds); set "
                            f"lease_ttl_s = {LEASE_TTL_S_DEFAULT}")
        return EtcdConfig(tuple(e.rstrip("/") for e in eps), prefix.rstrip("/") or "/",
                          files["etcd_ca"], files["etcd_cert"], files["etcd_key"], ttl)

    def read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise self.fail(None, "no such file; create it (see examples/two-nodes.toml) "
                            "or give the right path") from None
        except IsADirectoryError:
            raise self.fail(None, "is a directory; give the path of the TOML file") from None
        except OSError as e:
            raise self.fail(None, f"cannot read: {e.strerror}; fix its permissions") from None
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise self.fail(None, f"not UTF-8 (byte {e.start}); save the file as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            # tomllib's message ends with "(at line L, column C)"
            raise self.fail(None, f"TOML syntax error: {e}; fix the file there") from None

    def group(self, data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
        """`[kind.NAME]` tables, checking that each is a table with a usable name."""
        tables = data.get(kind, {})
        if not isinstance(tables, dict):
            raise self.fail(kind, f"must be tables [{kind}.NAME], not {_a(_kind(tables))}; "
                            f"write [{kind}.NAME] headers")
        for name, table in tables.items():
            key = f"{kind}.{name}"
            if not isinstance(table, dict):
                raise self.fail(key, f"must be a table, not {_a(_kind(table))}; "
                                f"write it as a [{key}] header with keys below it")
            if kind != "guest":
                self.check_name(key, name)
        return tables

    def check_name(self, key: str, name: str) -> None:
        if not _NAME.match(name) or len(name) > NAME_LENGTH_MAX:
            raise self.fail(key, f"name '{name}' is not allowed; use up to {NAME_LENGTH_MAX} "
                            "letters, digits, '-' and '_', starting with a letter or digit")

    def check_keys(self, key: str, table: dict[str, Any], valid: tuple[str, ...]) -> None:
        for k in table:
            if k not in valid:
                raise self.fail(f"{key}.{k}", "unknown key" + _valid_keys(k, valid, "keys"))

    # -- [resource.NAME] ---------------------------------------------------------------------

    def resource_fields(self, name: str, t: dict[str, Any], has_etcd: bool) -> dict[str, Any]:
        key = f"resource.{name}"
        self.check_keys(key, t, RESOURCE_KEYS)
        if "size" not in t:
            raise self.fail(f"{key}.size", 'missing; add size = "256M" (a multiple of 4K)')
        size_bytes = self.size(f"{key}.size", t["size"])
        if size_bytes % BLOCK_SIZE_BYTES:
            up = -(-size_bytes // BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES
            raise self.fail(f"{key}.size", f"{size_bytes} bytes is not a multiple of the "
                            f"{BLOCK_SIZE_BYTES}-byte block size; set size = {up}")

        protocol = t.get("protocol", "C")
        if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
            raise self.fail(f"{key}.protocol", f"{_show(protocol)} is not one of "
                            f'{", ".join(PROTOCOLS)}; set protocol = "C"')

        if "secret" not in t:
            raise self.fail(f"{key}.secret", "missing; add secret = \"...\" (the same long "
                            "random string for every node; the peer link is signed with it)")
        secret = t["secret"]
        if not isinstance(secret, str) or not secret.strip():
            raise self.fail(f"{key}.secret", f"{_show(secret)} is not a non-empty string; "
                            "set secret = \"...\" to a long random string")

        ping = self.seconds(key, t, "ping_interval_s", PING_INTERVAL_S_DEFAULT)
        timeout = self.seconds(key, t, "peer_timeout_s", PEER_TIMEOUT_S_DEFAULT)
        retry = self.seconds(key, t, "connect_retry_max_s", CONNECT_RETRY_MAX_S_DEFAULT)
        if timeout <= ping:
            raise self.fail(f"{key}.peer_timeout_s", f"{timeout:g} is not more than "
                            f"ping_interval_s ({ping:g}), so a healthy peer would be dropped; "
                            f"set peer_timeout_s = {4 * ping:g} (a few pings)")
        rate = self.size(f"{key}.resync_rate", t.get("resync_rate", RESYNC_RATE_DEFAULT))
        if rate <= 0:
            raise self.fail(f"{key}.resync_rate", f'{rate} bytes/s would never finish a resync; '
                            f'set resync_rate = "{RESYNC_RATE_DEFAULT}"')
        tls = t.get("tls", False)
        if not isinstance(tls, bool):
            raise self.fail(f"{key}.tls", f"{_show(tls)} is not true or false; set tls = true "
                            "(TLS on the peer link) or remove the line")
        # By default well above the peer timeout, whatever it is set to.
        ack = self.seconds(key, t, "ack_timeout_s", max(ACK_TIMEOUT_S_DEFAULT, 2 * timeout))
        if ack <= timeout:
            raise self.fail(f"{key}.ack_timeout_s", f"{ack:g} is not more than peer_timeout_s "
                            f"({timeout:g}); a slow but live peer would be dropped before a "
                            f"dead one is noticed; set ack_timeout_s = {max(30, 2 * timeout):g}")
        al = t.get("al_extents", AL_EXTENTS_DEFAULT)
        if (isinstance(al, bool) or not isinstance(al, int)
                or not AL_EXTENTS_MIN <= al <= AL_EXTENTS_MAX):
            raise self.fail(f"{key}.al_extents", f"{_show(al)} is not a whole number from "
                            f"{AL_EXTENTS_MIN} to {AL_EXTENTS_MAX} (4 MiB extents kept hot "
                            f"in the activity log); set al_extents = {AL_EXTENTS_DEFAULT}")
        fencing = t.get("fencing", "etcd" if has_etcd else "none")
        if fencing not in FENCING_MODES:
            raise self.fail(f"{key}.fencing", f"{_show(fencing)} is not one of "
                            f'{", ".join(FENCING_MODES)}; set fencing = "etcd" (needs '
                            f'[cluster] etcd) or "none"')
        if fencing == "etcd" and not has_etcd:
            raise self.fail(f"{key}.fencing", '"etcd" needs the etcd cluster: add [cluster] '
                            'etcd = ["http://HOST:2379", ...], or set fencing = "none"')
        noq = t.get("on_no_quorum", "suspend-io")
        if noq not in ON_NO_QUORUM:
            raise self.fail(f"{key}.on_no_quorum", f"{_show(noq)} is not one of "
                            f'{", ".join(ON_NO_QUORUM)}; set on_no_quorum = "suspend-io" '
                            f"(writes wait for etcd) or \"io-error\" (they fail)")
        sb = {}
        for k, allowed in (("after_sb_0pri", AFTER_SB_0PRI), ("after_sb_1pri", AFTER_SB_1PRI)):
            v = t.get(k, "disconnect")
            if v not in allowed:
                raise self.fail(f"{key}.{k}", f"{_show(v)} is not one of {', '.join(allowed)}; "
                                f'set {k} = "disconnect" (an operator resolves split brains) '
                                f"or one of the others (README, Split brain)")
            sb[k] = v
        return dict(size_bytes=size_bytes, protocol=protocol.upper(), secret=secret,
                    ping_interval_s=ping, peer_timeout_s=timeout, connect_retry_max_s=retry,
                    resync_rate_bytes_per_s=rate, tls=tls, ack_timeout_s=ack, al_extents=al,
                    fencing=fencing, on_no_quorum=noq, **sb)

    def size(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(key, f"{_show(value)} is not a size; write it like \"256M\"")
        try:
            n = parse_size(str(value)) if isinstance(value, str) else value
        except ValueError as e:
            raise self.fail(key, f"{e}; write it like \"256M\" or \"1G\"") from None
        if n <= 0:
            raise self.fail(key, f"{_show(value)} is not positive; write it like \"256M\"")
        return n

    def seconds(self, key: str, t: dict[str, Any], name: str, default: float) -> float:
        value = t.get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{key}.{name}", f"{_show(value)} is not a finite, positive number "
                            f"of seconds; set {name} = {default}")
        return float(value)

    # -- [node.NAME] -------------------------------------------------------------------------

    def node(self, name: str, t: dict[str, Any]) -> NodeConfig:
        key = f"node.{name}"
        self.check_keys(key, t, NODE_KEYS)
        addresses = {}
        for k in ADDRESS_KEYS:
            if k not in t:
                raise self.fail(f"{key}.{k}", f'missing; add {k} = "HOST:PORT"')
            addresses[k] = self.address(f"{key}.{k}", t[k], unix_ok=(k == "control"))
        libvirt = t.get("libvirt")
        if libvirt is not None and (not isinstance(libvirt, str) or not libvirt.strip()):
            raise self.fail(f"{key}.libvirt", f"{_show(libvirt)} is not a libvirt URI; "
                            'set libvirt = "qemu:///system" or remove the line')
        disks = self.path_table(f"{key}.disk", t.get("disk", {}))
        metas = self.path_table(f"{key}.meta", t.get("meta", {}))
        for r in metas:
            if r not in disks:
                raise self.fail(f"{key}.meta.{r}", f"node '{name}' has no disk for '{r}' "
                                f"(disks: {_names(disks)}); add [{key}.disk] {r} = \"...\" "
                                "or remove this line")
        metas = {r: metas.get(r, Path(str(p) + META_SUFFIX)) for r, p in disks.items()}
        poll_us = t.get("idle_poll_us", IDLE_POLL_US_DEFAULT)
        if (not isinstance(poll_us, int) or isinstance(poll_us, bool)
                or not 0 <= poll_us <= IDLE_POLL_US_MAX):
            raise self.fail(f"{key}.idle_poll_us", f"{_show(poll_us)} is not a whole number "
                            f"of microseconds from 0 (off) to {IDLE_POLL_US_MAX}; set "
                            f"idle_poll_us = {IDLE_POLL_US_DEFAULT}")
        return NodeConfig(name=name, libvirt=libvirt, disks=disks, metas=metas,
                          tls=self.node_tls(name, t), idle_poll_us=poll_us, **addresses)

    def node_tls(self, name: str, t: dict[str, Any]) -> NodeTLS | None:
        key = f"node.{name}"
        given = [k for k in TLS_KEYS if k in t]
        if not given:
            return None
        paths = {}
        for k in given:
            value = t[k]
            if not isinstance(value, str) or not value.strip():
                raise self.fail(f"{key}.{k}", f"{_show(value)} is not a path; write it like "
                                f'{k} = "{TLS_EXAMPLES[k].format(node=name)}"')
            paths[k] = self.resolve(value)
        for k in TLS_KEYS:
            if k not in paths:
                raise self.fail(f"{key}.{k}", f"missing; {given[0]} is set, and TLS needs all "
                                f"of {', '.join(TLS_KEYS)}: add {k} = "
                                f'"{TLS_EXAMPLES[k].format(node=name)}" or remove '
                                f"{' and '.join(given)}")
        return NodeTLS(cert=paths["tls_cert"], key=paths["tls_key"], ca=paths["tls_ca"])

    def address(self, key: str, value: Any, *, unix_ok: bool) -> Address:
        example = '"127.0.0.1:7790"' + (' or "unix:/run/rblock.sock"' if unix_ok else "")
        if not isinstance(value, str):
            raise self.fail(key, f"{_show(value)} is not an address; write it like {example}")
        text = value.strip()
        if text.startswith("unix:"):
            if not unix_ok:
                raise self.fail(key, f"'{text}': only control may be a unix socket; "
                                'write it like "127.0.0.1:7790"')
            if not text[5:]:
                raise self.fail(key, "'unix:' has no path; write it like "
                                '"unix:/run/rblock.sock"')
            return Address("", 0, str(self.resolve(text[5:])))
        if text.count(":") > 1 and not text.startswith("["):
            raise self.fail(key, f"'{text}' is ambiguous (an IPv6 address needs brackets); "
                            'write it like "[::1]:7790"')
        try:
            host, port = parse_hostport(text, 0)
        except ValueError as e:
            raise self.fail(key, f"{e}; write it like {example}") from None
        if port == 0:
            what = "port 0 (any free port)" if text.endswith(":0") else "no port"
            raise self.fail(key, f"'{text}' has {what}, but every node must know where the "
                            f"others listen; write it like {example}")
        return Address(host, port)

    def path_table(self, key: str, t: Any) -> dict[str, Path]:
        if not isinstance(t, dict):
            raise self.fail(key, f"must be a table of RESOURCE = \"PATH\", not {_a(_kind(t))}; "
                            f"write [{key}] with lines like r0 = \"disks/r0.img\"")
        out = {}
        for r, p in t.items():
            if not isinstance(p, str) or not p.strip():
                raise self.fail(f"{key}.{r}", f"{_show(p)} is not a path; "
                                f'write it like {r} = "disks/{r}.img"')
            out[r] = self.resolve(p)
        return out

    def resolve(self, p: str) -> Path:
        """A path from the file: absolute, relative ones taken from the file's directory."""
        return Path(os.path.normpath(self.base / Path(p).expanduser()))

    # -- the cluster as a whole --------------------------------------------------------------

    def check_disks(self, resources: dict[str, Any], nodes: dict[str, NodeConfig]) -> None:
        for node in nodes.values():
            for r in node.disks:
                if r not in resources:
                    raise self.fail(f"node.{node.name}.disk.{r}", f"no [resource.{r}] in this "
                                    f"file (resources: {_names(resources)}); add [resource.{r}] "
                                    "or remove this line")

    def check_holders(self, name: str, holders: tuple[str, ...],
                      nodes: dict[str, NodeConfig]) -> None:
        if len(holders) == NODES_PER_RESOURCE:
            return
        on = f"{len(holders)} node{'s' if len(holders) != 1 else ''}"
        if holders:
            on += f" ({', '.join(holders)})"
        if len(holders) < NODES_PER_RESOURCE:
            others = [n for n in nodes if n not in holders]
            fix = (f"add {name} = \"PATH\" under [node.NODE.disk] of one more node"
                   + (f" (nodes without it: {', '.join(others)})" if others else ""))
        else:
            fix = f"remove {name} from the [node.NODE.disk] tables of all but two"
        raise self.fail(f"resource.{name}", f"has a disk on {on}, but a resource needs "
                        f"exactly {NODES_PER_RESOURCE} data nodes for now; {fix}")

    def check_tls_files(self, name: str, holders: tuple[str, ...],
                        nodes: dict[str, NodeConfig]) -> None:
        for n in holders:
            if nodes[n].tls is None:
                raise self.fail(f"node.{n}.tls_cert", f"missing; resource {name} has tls = "
                                f"true, so every node of it needs its TLS files: add tls_cert, "
                                f"tls_key and tls_ca under [node.{n}], or set tls = false in "
                                f"[resource.{name}]")

    def check_addresses(self, nodes: dict[str, NodeConfig]) -> None:
        """No two listen addresses alike, among all nodes' replication/control/nbd.

        Nodes may share a machine (tests, demos): then they differ by port.
        """
        seen: dict[tuple[str, ...], str] = {}
        for node in nodes.values():
            for k in ADDRESS_KEYS:
                a: Address = getattr(node, k)
                ident = (("unix", a.unix_path) if a.unix_path is not None
                         else ("tcp", _host_key(a.host), str(a.port)))
                key = f"node.{node.name}.{k}"
                if ident in seen:
                    fix = ("use another socket path" if a.unix_path is not None
                           else "give each a different port")
                    raise self.fail(key, f"'{a}' is also {seen[ident]}; {fix}")
                seen[ident] = key

    def check_paths(self, nodes: dict[str, NodeConfig]) -> None:
        """No two disks or metadata files share a path on one machine.

        Nodes are taken to be on one machine when their replication hosts are the same (any
        loopback address counts as one machine). Two nodes on different machines may well
        use the same path, like /dev/vg0/r0 on both.
        """
        seen: dict[tuple[str, Path], str] = {}
        for node in nodes.values():
            machine = _machine_key(node.replication.host)
            for table, paths in (("disk", node.disks), ("meta", node.metas)):
                for r, p in paths.items():
                    key = f"node.{node.name}.{table}.{r}"
                    if (machine, p) in seen:
                        raise self.fail(key, f"'{p}' is also used by {seen[(machine, p)]}; "
                                        "give each disk and metadata file its own path")
                    seen[(machine, p)] = key


def _host_key(host: str) -> str:
    host = host.lower()
    return "127.0.0.1" if host == "localhost" else host


def _machine_key(host: str) -> str:
    host = host.lower()
    if host in _LOOPBACK_NAMES or host.startswith("127."):
        return "loopback"
    return host


def _kind(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "float"}.get(type(value), "value")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _a(_kind(value))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _valid_keys(key: str, valid: tuple[str, ...], what: str, shown: str | None = None) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"; {hint}valid {what}: {shown or ', '.join(valid)}"
