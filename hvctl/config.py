"""hvctl's part of the cluster file: the `[hvctl]` table and the guests.

The cluster file is rblock's (rblock/config.py reads resources and nodes); hvctl adds:

    [hvctl]                      # optional
    guests = "guests"            # also read every guests/NAME.toml (the keys of [guest.NAME])
    domain_type = "auto"         # auto (probe each node), kvm or qemu (TCG)
    stop_timeout_s = 60          # ACPI shutdown wait before a guest is destroyed
    state_dir = "hvctl-state"    # console logs and the probe cache (default ~/.cache/hvctl)
    probe_kernel = "/vmlinuz"    # the kernel the KVM probe boots on each node
    watchdog = "auto"            # the HA agent arms /dev/watchdog if it exists; "off"; a path

    [guest.vm1]
    disks = ["r0"]               # rblock resources, attached as vda, vdb, ...
    memory = "512M"
    vcpus = 1
    kernel = "boot/vmlinuz"      # optional: direct kernel boot (else BIOS boots vda)
    initrd = "boot/initrd.img"
    cmdline = "console=ttyS0"
    console_log = "logs/vm1.log" # serial console log on the node that runs it
    node = "alpha"               # preferred node for `start` without --on
    network = { type = "user" }  # or { type = "bridge", source = "br0" } / "network"
    graphics = "vnc"             # a VGA display and VNC on the node's replication address,
                                 # for the web page's screen; "none" (the default)
    ha = "started"               # HA: keep it running (hvctl agent); "stopped", or
                                 # "disabled" (the default: not managed by HA)
    prefer = ["alpha"]           # HA: nodes to place it on first, in order
    max_restart = 1              # HA: restarts on the same node after a failure
    max_relocate = 1             # HA: other nodes tried after that, then state error

Errors read like rblock's: `FILE: guest.vm1.disks[0]: what is wrong; how to fix it`.
Paths are absolute in the result; relative ones are taken from the directory of the file that
holds them (the cluster file, or the guest file).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rblock.config import (
    _NAME,
    NAME_LENGTH_MAX,
    ClusterConfig,
    ConfigError,
    _a,
    _kind,
    _show,
    _valid_keys,
)
from rblock.config import load as load_cluster
from rblock.units import parse_size

DOMAIN_TYPES = ("auto", "kvm", "qemu")
NETWORK_TYPES = ("user", "bridge", "network")
NIC_MODELS = ("virtio", "e1000", "rtl8139")
GRAPHICS = ("none", "vnc")
# A VNC server without a password must listen on one address, never on all of them.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MEMORY_DEFAULT = "512M"
MEMORY_MIN_BYTES = 16 << 20
VCPUS_MAX = 256
STOP_TIMEOUT_S_DEFAULT = 60.0
PROBE_KERNEL_DEFAULT = "/vmlinuz"
RECONNECT_DELAY_S_DEFAULT = 30  # QEMU retries the NBD export this long before failing I/O
HVCTL_KEYS = ("guests", "domain_type", "stop_timeout_s", "state_dir", "probe_kernel",
              "watchdog")
GUEST_KEYS = ("disks", "memory", "vcpus", "kernel", "initrd", "cmdline", "console_log", "node",
              "network", "domain_type", "stop_timeout_s", "reconnect_delay_s", "ha", "prefer",
              "max_restart", "max_relocate", "graphics")
HA_MODES = ("disabled", "started", "stopped")
MAX_RESTART_DEFAULT = 1
MAX_RELOCATE_DEFAULT = 1
RETRIES_MAX = 100
NETWORK_KEYS = ("type", "source", "model", "mac")
# Stable identities: the same guest gets the same UUID and MAC on every node, so moving it
# changes nothing the guest OS can see.
GUEST_UUID_NAMESPACE = uuid.UUID("5b0f3c7e-8a51-4f0e-9d3c-7f2b6c1e4a90")
MAC_PREFIX = "52:54:00"  # QEMU's locally administered range


@dataclass(frozen=True)
class Network:
    type: str
    source: str | None
    model: str
    mac: str


@dataclass(frozen=True)
class Graphics:
    """A guest's display: a VGA card and a VNC server (no password: the web page's one-time
    tickets are the access control) listening on the address of the node that runs it, the
    host of node.NAME.replication, which the web server reaches."""

    type: str  # "vnc"
    listen: tuple[tuple[str, str], ...]  # (node, address) for every node that may run it

    def address(self, node: str) -> str:
        return dict(self.listen)[node]


@dataclass(frozen=True)
class GuestConfig:
    name: str
    disks: tuple[str, ...]  # resource names, in target order (vda, vdb, ...)
    memory_bytes: int
    vcpus: int
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    console_log: Path
    node: str | None  # preferred node
    network: Network | None
    domain_type: str  # auto, kvm, qemu
    stop_timeout_s: float
    reconnect_delay_s: int
    source: Path  # the file it came from
    ha: str = "disabled"  # started, stopped, disabled
    prefer: tuple[str, ...] = ()
    max_restart: int = MAX_RESTART_DEFAULT
    max_relocate: int = MAX_RELOCATE_DEFAULT
    graphics: Graphics | None = None

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(GUEST_UUID_NAMESPACE, self.name))


@dataclass(frozen=True)
class HvConfig:
    cluster: ClusterConfig
    guests: dict[str, GuestConfig]
    domain_type: str
    stop_timeout_s: float
    state_dir: Path
    probe_kernel: str
    watchdog: str = "auto"

    @property
    def path(self) -> Path:
        return self.cluster.path

    def guest(self, name: str) -> GuestConfig:
        try:
            return self.guests[name]
        except KeyError:
            known = ", ".join(self.guests) or "(none)"
            raise ConfigError(f"guest '{name}' not in {self.path}; guests: {known}; add a "
                              f"[guest.{name}] table to define it") from None

    def hv_node(self, name: str) -> str:
        """The node's libvirt URI; ConfigError naming the fix if it has none."""
        node = self.cluster.node(name)
        if node.libvirt is None:
            raise ConfigError(f"{self.path}: node.{name}.libvirt: missing, so hvctl cannot run "
                              f"guests there; add libvirt = \"qemu:///system\" to [node.{name}]")
        return node.libvirt

    def hv_nodes(self) -> list[str]:
        """Nodes with a libvirt URI, in file order."""
        return [n for n, c in self.cluster.nodes.items() if c.libvirt is not None]

    def nodes_for(self, guest: GuestConfig) -> list[str]:
        """Nodes that can run GUEST: a libvirt URI and a disk for every one of its resources."""
        return [n for n in self.hv_nodes()
                if all(r in self.cluster.nodes[n].disks for r in guest.disks)]


def load(path: str | Path) -> HvConfig:
    """The cluster file with hvctl's tables checked; raises ConfigError naming key and fix."""
    cluster = load_cluster(path)
    return _Loader(cluster).load()


def mac_for(name: str) -> str:
    digest = hashlib.sha256(b"hvctl-mac:" + name.encode()).digest()
    return MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:3])


class _Loader:
    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.base = cluster.path.parent

    def fail(self, file: Path, key: str, text: str) -> ConfigError:
        return ConfigError(f"{file}: {key}: {text}")

    def load(self) -> HvConfig:
        top = self.cluster.path
        hv = self.cluster.hvctl
        for k in hv:
            if k not in HVCTL_KEYS:
                raise self.fail(top, f"hvctl.{k}", "unknown key" + _valid_keys(k, HVCTL_KEYS,
                                                                               "keys"))
        domain_type = self.choice(top, "hvctl.domain_type", hv.get("domain_type", "auto"),
                                  DOMAIN_TYPES)
        stop_timeout_s = self.seconds(top, "hvctl.stop_timeout_s",
                                      hv.get("stop_timeout_s", STOP_TIMEOUT_S_DEFAULT))
        state_dir = (self.path(top, "hvctl.state_dir", hv["state_dir"], self.base)
                     if "state_dir" in hv else _default_state_dir())
        watchdog = hv.get("watchdog", "auto")
        if not isinstance(watchdog, str) or not (watchdog in ("auto", "off") or
                                                 watchdog.startswith("/")):
            raise self.fail(top, "hvctl.watchdog", f"{_show(watchdog)} is not \"auto\", "
                            "\"off\" or a device path; set watchdog = \"auto\"")
        probe_kernel = hv.get("probe_kernel", PROBE_KERNEL_DEFAULT)
        if not isinstance(probe_kernel, str) or not probe_kernel.startswith("/"):
            raise self.fail(top, "hvctl.probe_kernel", f"{_show(probe_kernel)} is not an "
                            f"absolute path on the nodes; set probe_kernel = "
                            f"\"{PROBE_KERNEL_DEFAULT}\"")

        tables: dict[str, tuple[Path, str, dict[str, Any]]] = {
            name: (top, f"guest.{name}", t) for name, t in self.cluster.guests.items()}
        if "guests" in hv:
            gdir = self.path(top, "hvctl.guests", hv["guests"], self.base)
            if not gdir.is_dir():
                raise self.fail(top, "hvctl.guests", f"'{gdir}' is not a directory; create it "
                                "(one NAME.toml per guest) or remove the line")
            for f in sorted(gdir.glob("*.toml")):
                name = f.stem
                if name in tables:
                    raise self.fail(f, name, f"guest '{name}' is also defined in "
                                    f"{tables[name][0]}; keep one of the two")
                tables[name] = (f, "", self.read_guest_file(f))

        defaults = {"domain_type": domain_type, "stop_timeout_s": stop_timeout_s}
        guests = {name: self.guest(name, file, key, t, defaults, state_dir)
                  for name, (file, key, t) in tables.items()}
        return HvConfig(self.cluster, guests, domain_type, stop_timeout_s, state_dir,
                        probe_kernel, watchdog)

    def read_guest_file(self, f: Path) -> dict[str, Any]:
        try:
            return tomllib.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise self.fail(f, "file", f"not UTF-8 (byte {e.start}); save it as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise self.fail(f, "file", f"TOML syntax error: {e}; fix the file there") from None
        except OSError as e:
            raise self.fail(f, "file", f"cannot read: {e.strerror}; fix its permissions") \
                from None

    # -- one guest -----------------------------------------------------------------------------

    def guest(self, name: str, file: Path, key: str, t: dict[str, Any], defaults: dict,
              state_dir: Path) -> GuestConfig:
        if not _NAME.match(name) or len(name) > NAME_LENGTH_MAX:
            raise self.fail(file, key or "file name", f"guest name '{name}' is not allowed; use up to "
                            f"{NAME_LENGTH_MAX} letters, digits, '-' and '_', starting with a "
                            "letter or digit")
        base = file.parent
        for k in t:
            if k not in GUEST_KEYS:
                raise self.fail(file, f"{_p(key)}{k}", "unknown key" + _valid_keys(k, GUEST_KEYS,
                                                                                "keys"))
        disks = self.disks(file, key, t)
        memory = t.get("memory", MEMORY_DEFAULT)
        if isinstance(memory, bool) or not isinstance(memory, (int, str)):
            raise self.fail(file, f"{_p(key)}memory", f"{_show(memory)} is not a size; write it "
                            'like "512M" or "2G"')
        try:
            memory_bytes = parse_size(memory) if isinstance(memory, str) else memory
        except ValueError as e:
            raise self.fail(file, f"{_p(key)}memory", f"{e}; write it like \"512M\"") from None
        if memory_bytes < MEMORY_MIN_BYTES:
            raise self.fail(file, f"{_p(key)}memory", f"{_show(memory)} is less than "
                            f"{MEMORY_MIN_BYTES >> 20} MiB, too little to boot; set "
                            f"memory = \"{MEMORY_DEFAULT}\"")
        vcpus = t.get("vcpus", 1)
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= VCPUS_MAX:
            raise self.fail(file, f"{_p(key)}vcpus", f"{_show(vcpus)} is not a whole number from 1 "
                            f"to {VCPUS_MAX}; set vcpus = 1")

        kernel = initrd = cmdline = None
        if "kernel" in t:
            kernel = self.path(file, f"{_p(key)}kernel", t["kernel"], base)
        for k in ("initrd", "cmdline"):
            if k in t and kernel is None:
                raise self.fail(file, f"{_p(key)}{k}", "only used with direct kernel boot; add "
                                f"kernel = \"PATH\" or remove {k}")
        if "initrd" in t:
            initrd = self.path(file, f"{_p(key)}initrd", t["initrd"], base)
        if "cmdline" in t:
            cmdline = t["cmdline"]
            if not isinstance(cmdline, str):
                raise self.fail(file, f"{_p(key)}cmdline", f"{_show(cmdline)} is not a string; "
                                'write it like cmdline = "console=ttyS0"')

        console_log = (self.path(file, f"{_p(key)}console_log", t["console_log"], base)
                       if "console_log" in t else state_dir / "console" / f"{name}.log")

        node = t.get("node")
        if node is not None:
            if not isinstance(node, str) or node not in self.cluster.nodes:
                raise self.fail(file, f"{_p(key)}node", f"{_show(node)} is not a node of "
                                f"{self.cluster.path} (nodes: {', '.join(self.cluster.nodes)}); "
                                "set node to one of them or remove the line")
            missing = [r for r in disks if r not in self.cluster.nodes[node].disks]
            if missing:
                raise self.fail(file, f"{_p(key)}node", f"node '{node}' has no disk for "
                                f"{', '.join(missing)}; pick a node that holds every disk of "
                                "the guest")

        holders = [n for n, c in self.cluster.nodes.items() if all(r in c.disks for r in disks)]
        if not holders:
            raise self.fail(file, f"{_p(key)}disks", f"no node holds all of {', '.join(disks)}; "
                            "a guest runs where all its disks are, so keep its resources on "
                            "the same nodes")

        domain_type = self.choice(file, f"{_p(key)}domain_type",
                                  t.get("domain_type", defaults["domain_type"]), DOMAIN_TYPES)
        stop_timeout_s = self.seconds(file, f"{_p(key)}stop_timeout_s",
                                      t.get("stop_timeout_s", defaults["stop_timeout_s"]))
        reconnect = t.get("reconnect_delay_s", RECONNECT_DELAY_S_DEFAULT)
        if isinstance(reconnect, bool) or not isinstance(reconnect, int) or reconnect < 0:
            raise self.fail(file, f"{_p(key)}reconnect_delay_s", f"{_show(reconnect)} is not a "
                            f"whole number of seconds >= 0; set reconnect_delay_s = "
                            f"{RECONNECT_DELAY_S_DEFAULT}")
        network = self.network(file, f"{_p(key)}network", t["network"], name) \
            if "network" in t else None
        ha = self.choice(file, f"{_p(key)}ha", t.get("ha", "disabled"), HA_MODES)
        prefer = self.prefer(file, f"{_p(key)}prefer", t.get("prefer", []), disks)
        max_restart = self.count(file, f"{_p(key)}max_restart",
                                 t.get("max_restart", MAX_RESTART_DEFAULT), MAX_RESTART_DEFAULT)
        max_relocate = self.count(file, f"{_p(key)}max_relocate",
                                  t.get("max_relocate", MAX_RELOCATE_DEFAULT),
                                  MAX_RELOCATE_DEFAULT)
        graphics = self.graphics(file, f"{_p(key)}graphics", t.get("graphics", "none"),
                                 holders)
        return GuestConfig(name=name, disks=disks, memory_bytes=memory_bytes, vcpus=vcpus,
                           kernel=kernel, initrd=initrd, cmdline=cmdline,
                           console_log=console_log, node=node, network=network,
                           domain_type=domain_type, stop_timeout_s=stop_timeout_s,
                           reconnect_delay_s=reconnect, source=file, ha=ha, prefer=prefer,
                           max_restart=max_restart, max_relocate=max_relocate,
                           graphics=graphics)

    def graphics(self, file: Path, key: str, value: Any, holders: list[str]
                 ) -> Graphics | None:
        if self.choice(file, key, value, GRAPHICS) == "none":
            return None
        listen = []
        for n in holders:
            host = self.cluster.nodes[n].replication.host
            if host in WILDCARD_HOSTS:
                raise self.fail(file, key, f"node {n} replicates on {_show(host)}, every "
                                "address, but VNC (no password) must listen on the node's "
                                f"own address only; set node.{n}.replication to that "
                                "address, or graphics = \"none\"")
            listen.append((n, host))
        return Graphics(value, tuple(listen))

    def prefer(self, file: Path, key: str, value: Any, disks: tuple[str, ...]
               ) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(file, key, f"{_show(value)} is not a list of node names; write "
                            'it like prefer = ["alpha"]')
        nodes = self.cluster.nodes
        for i, n in enumerate(value):
            if n not in nodes:
                raise self.fail(file, f"{key}[{i}]", f"'{n}' is not a node of "
                                f"{self.cluster.path} (nodes: {', '.join(nodes)}); fix the "
                                "name or remove it")
            missing = [r for r in disks if r not in nodes[n].disks]
            if missing:
                holders = [m for m, c in nodes.items() if all(r in c.disks for r in disks)]
                raise self.fail(file, f"{key}[{i}]", f"node '{n}' holds no replica of "
                                f"{', '.join(missing)}, so the guest cannot run there; "
                                f"prefer one of {', '.join(holders)}, or add a disk for "
                                f"{', '.join(missing)} to [node.{n}.disk]")
            if nodes[n].libvirt is None:
                raise self.fail(file, f"{key}[{i}]", f"node '{n}' has no libvirt URI, so "
                                f"no guest runs there; add libvirt = \"qemu:///system\" to "
                                f"[node.{n}] or remove it from prefer")
        if len(set(value)) != len(value):
            raise self.fail(file, key, "a node is listed twice; list each once")
        return tuple(value)

    def count(self, file: Path, key: str, value: Any, default: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 0 <= value <= RETRIES_MAX:
            raise self.fail(file, key, f"{_show(value)} is not a whole number from 0 to "
                            f"{RETRIES_MAX}; set {key.rsplit('.', 1)[-1]} = {default}")
        return value

    def disks(self, file: Path, key: str, t: dict[str, Any]) -> tuple[str, ...]:
        if "disks" not in t:
            raise self.fail(file, f"{_p(key)}disks", 'missing; add disks = ["r0"] (the rblock '
                            "resources the guest uses, in order vda, vdb, ...)")
        disks = t["disks"]
        if disks == []:
            raise self.fail(file, f"{_p(key)}disks", 'is empty; list the rblock resources the '
                            'guest uses, like disks = ["r0"]')
        if not isinstance(disks, list):
            raise self.fail(file, f"{_p(key)}disks", f"{_show(disks)} is not a non-empty list of "
                            'resource names; write it like disks = ["r0"]')
        seen: set[str] = set()
        for i, r in enumerate(disks):
            k = f"{_p(key)}disks[{i}]"
            if not isinstance(r, str):
                raise self.fail(file, k, f"{_show(r)} is not a resource name; write it like "
                                '"r0"')
            if r not in self.cluster.resources:
                raise self.fail(file, k, f"resource '{r}' is not in {self.cluster.path} "
                                f"(resources: {', '.join(self.cluster.resources) or '(none)'}); "
                                f"add [resource.{r}] there or fix the name")
            if r in seen:
                raise self.fail(file, k, f"resource '{r}' is listed twice; a resource is one "
                                "disk of one guest")
            seen.add(r)
        return tuple(disks)

    def network(self, file: Path, key: str, t: Any, guest: str) -> Network:
        if not isinstance(t, dict):
            raise self.fail(file, key, f"must be a table, not {_a(_kind(t))}; write it like "
                            'network = { type = "user" }')
        for k in t:
            if k not in NETWORK_KEYS:
                raise self.fail(file, f"{_p(key)}{k}", "unknown key" + _valid_keys(k, NETWORK_KEYS,
                                                                                "keys"))
        ntype = self.choice(file, f"{_p(key)}type", t.get("type", "user"), NETWORK_TYPES)
        source = t.get("source")
        if ntype == "user" and source is not None:
            raise self.fail(file, f"{_p(key)}source", "a user-mode network has no source; remove "
                            "it or set type = \"bridge\"")
        if ntype != "user" and (not isinstance(source, str) or not source):
            what = "bridge" if ntype == "bridge" else "libvirt network"
            raise self.fail(file, f"{_p(key)}source", f"missing or empty; name the {what}, like "
                            f"source = \"{'br0' if ntype == 'bridge' else 'default'}\"")
        model = self.choice(file, f"{_p(key)}model", t.get("model", "virtio"), NIC_MODELS)
        mac = t.get("mac", mac_for(guest))
        if not isinstance(mac, str) or not _is_mac(mac):
            raise self.fail(file, f"{_p(key)}mac", f"{_show(mac)} is not a MAC address; write it "
                            f"like \"{mac_for(guest)}\" or remove it (derived from the name)")
        return Network(ntype, source, model, mac.lower())

    # -- values --------------------------------------------------------------------------------

    def choice(self, file: Path, key: str, value: Any, valid: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in valid:
            raise self.fail(file, key, f"{_show(value)} is not one of {', '.join(valid)}; set "
                            f"{key.rsplit('.', 1)[-1]} = \"{valid[0]}\"")
        return value

    def seconds(self, file: Path, key: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value != value or value <= 0 or value == float("inf"):
            raise self.fail(file, key, f"{_show(value)} is not a finite, positive number of "
                            f"seconds; set {key.rsplit('.', 1)[-1]} = {STOP_TIMEOUT_S_DEFAULT:g}")
        return float(value)

    def path(self, file: Path, key: str, value: Any, base: Path) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(file, key, f"{_show(value)} is not a path; write it like "
                            f"{key.rsplit('.', 1)[-1]} = \"PATH\"")
        return Path(os.path.normpath(base / Path(value).expanduser()))


def _p(key: str) -> str:
    """Key path prefix: "guest.vm1." in the cluster file, "" at the top of a guest file."""
    return f"{key}." if key else ""


def _default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hvctl"


def _is_mac(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                   for p in parts)
