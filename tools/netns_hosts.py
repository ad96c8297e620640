"""Simulated hosts on one machine as Linux network namespaces, with real network cuts.

`NetHosts(names)` makes one network namespace per host name, all joined by a Linux bridge
in the root namespace, which also has an address on that network, so the caller (a test,
in the root namespace) reaches every host:

    root namespace:  bridge nh{TAG} 10.88.N.1/24 -- veth nh{TAG}v{i} --+
    netns nh{TAG}-{name}:                lo up, eth0 10.88.N.{10+i}/24 <-+   (host i)

TAG is this process's PID followed by two letters (one per NetHosts made in the process),
so the interface names stay within Linux's 15 characters and two runs never share a name.
N is picked under a lock file (LOCK_PATH): the first /24 of 10.88.0.0/16 that no address
or route of the root namespace overlaps, probing from PID % 256 on.

    from tools.netns_hosts import NetHosts
    with NetHosts(["alpha", "beta", "witness"]) as net:
        beta = net["beta"]
        server = beta.popen(["rblock", "serve", "--listen", f"{beta.address}:10809", ...],
                            log_path)          # runs inside beta's namespace
        beta.cut()                             # beta and its peers hear nothing of each other
        beta.heal()                            # connections carry on (retransmissions)
        beta.crash()                           # power cut: cut, SIGKILL all, fresh namespace
        beta.heal()                            # power back: no process, no socket, RSTs
    # every process of every namespace killed by PID; namespaces, veths, bridge deleted

A process belongs to a host when its /proc/PID/ns/net is the host's namespace (same device
and inode as /run/netns/NAME, remembered when it is made): that finds whatever runs there
however it was started, e.g. a libvirtd started with `LibvirtHost(..., netns=host.netns)`
and the QEMUs it forks. kill_all(), crash() and stop() kill by that PID list (and the PIDs
of the Popens popen() made), never by name. start() first removes the namespaces and links
of earlier runs whose process is dead (`sweep_leftovers()`), their processes killed by PID.

Needs root, `ip` (iproute2) and `nft` (nftables, with the netdev egress hook: Linux >= 5.16,
nft >= 1.0.1); `check_requirements()` raises `NetHostsUnavailable` naming the fix.

What was found on Debian 12 (iproute2 6.1, nftables 1.0.6, kernel 6.18, 2 cores), measured
with the functions below (a Python client with socket timeouts, in a peer's namespace via
`ip netns exec` and in the root namespace):

- The cut. cut() loads a netdev table in the host's namespace that drops every frame on its
  eth0 (ingress and egress hooks; lo is untouched) except ARP. Frames are dropped below the
  IP stack, so the cut host's own senders get no error either: with an inet `output` drop
  rule (tried first) a UDP sendto() inside the cut host failed with EPERM; with the egress
  hook it succeeds and the datagram vanishes, as on a pulled cable.
- From a peer namespace and from the root namespace, a TCP connect to a cut host times out
  (2.00 s with a 2 s timeout), to an open port and to a closed one alike: no RST, no ICMP.
  An established connection's recv() times out (1.00 s with 1 s); the link stays up.
  After heal() the connection carries on: a byte sent 1 s before heal() arrived 0.64-0.66 s
  after it, at TCP's next retransmission (backoff from RTO 200 ms); no reconnect needed.
- ARP is let through on purpose: with `cut(drop_arp=True)` a peer's neighbour entry fails,
  and a connect from a peer without a cached entry fails with EHOSTUNREACH after 3.06 s --
  what a dead host on one LAN gives eventually, but an error, not silence.
- crash() cuts first and kills afterwards, so the kernel's FINs and RSTs for the killed
  processes' sockets are dropped at egress: peers see silence, never a reset. But killing
  is not enough for a power cut: the sockets of killed processes stay in the kernel
  (FIN-WAIT-1, send queue kept) and, after heal(), a peer received the bytes the dead
  process had written during the cut, then a FIN. So crash() then replaces the namespace
  by a fresh one (same name, address and eth0 MAC, cut before eth0 comes up); the old one
  keeps only lo (its veth deleted) until its orphaned sockets die. After heal() a peer's
  next segment gets a RST, as from a rebooted server. crash() takes ~0.1 s.
- A zombie has no /proc/PID/ns/net (ENOENT), so the PID scan skips zombies: an orphan that
  PID 1 is slow to reap does not hold up kill_all().
- `ip netns exec NS CMD` exec's CMD (the Popen's PID is CMD's) in a new mount namespace with
  /sys remounted for NS; libvirt_hosts' `unshare --mount` nests under it. Before its
  setns() that `ip` is in the root namespace, hence kill_all() kills popen()'s PIDs too.
  Unix sockets cross network namespaces: a libvirtd in a host's namespace answers on its
  socket from the root namespace, cut or not.
- `ip netns del` only unmounts /run/netns/NS; the namespace (and its veth end) lives on while
  a process or a socket holds it, which is why stop() kills first and deletes the veth
  explicitly (deleting one end deletes both). A veth end in a namespace being destroyed
  vanishes asynchronously: `ip link del` may find it gone.
- A bridge takes its ports' lowest MAC unless given one: the bridge and every eth0 get fixed
  MACs (derived from their names), so ARP caches stay right across crash().
- br_netfilter is loaded here (net.bridge.bridge-nf-call-iptables = 1): frames crossing the
  bridge also pass the root namespace's iptables/nftables forward hooks; the root ruleset is
  empty, so nothing is filtered there.
- A new bridge port forwards at once (no STP): a connect right after start() works (2 ms).
- Timing (3 hosts): start() 0.05 s, stop() 0.16-0.21 s, cut() and heal() 16-24 ms each (one
  `ip netns exec NS nft -f -`).
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tools.libvirt_hosts import alive  # True while a PID exists and is no zombie

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts the namespaces
LOCK_PATH = Path("/run/lock/netns_hosts.lock")  # serialises subnet choice and sweeps
NAME_PREFIX = "nh"  # of every namespace and link this module makes; the sweep matches it
HOST_IFNAME = "eth0"  # the host's end of its veth, inside its namespace
IFNAME_MAX_CHARS = 15  # Linux IFNAMSIZ - 1
SUBNET_BASE = "10.88"  # hosts live in SUBNET_BASE.N.0/24
SUBNET_PREFIX_BITS = 24
GATEWAY_OCTET = 1  # the bridge's address in the root namespace: SUBNET_BASE.N.1
FIRST_HOST_OCTET = 10  # host i is SUBNET_BASE.N.(10 + i)
MAX_HOSTS = 244  # 10 + 244 = 254, the last unicast address of a /24
CUT_TABLE = "nethosts_cut"  # netdev table of a cut host
CUT_PRIORITY = -500  # before any other netdev chain a test might add

KILL_TIMEOUT_S = 10.0  # for every process of a namespace to vanish after SIGKILL
COMMAND_TIMEOUT_S = 10.0  # one `ip` or `nft` command
LOCK_TIMEOUT_S = 30.0  # another run's start() or stop() holds the lock for ~0.1 s
POLL_PERIOD_S = 0.02

# Program -> Debian package that has it.
TOOLS = {"ip": "iproute2", "nft": "nftables"}
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_SEQ = itertools.count()  # per-process NetHosts number -> the two letters of the tag
_TAG_RE = r"(?P<pid>\d+)[a-z]{2}"
_NETNS_RE = re.compile(rf"^{NAME_PREFIX}{_TAG_RE}-.+$")
_LINK_RE = re.compile(rf"^{NAME_PREFIX}{_TAG_RE}(?P<veth>v\d+)?$")
_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class NetHostsUnavailable(RuntimeError):
    """This machine cannot make network namespaces here (not root, a tool missing)."""


class NetHostsError(RuntimeError):
    """A command failed, or a process survived SIGKILL."""


def check_requirements() -> None:
    """Raise NetHostsUnavailable, naming the fix, when NetHosts cannot run here."""
    if os.geteuid() != 0:
        raise NetHostsUnavailable(
            "network-namespace hosts need root (ip netns, veth, bridge, nftables); run as root"
        )
    missing = {t: p for t, p in TOOLS.items() if shutil.which(t, path=TOOL_PATH) is None}
    if missing:
        raise NetHostsUnavailable(
            f"{', '.join(missing)} not found; install the Debian packages "
            f"{' '.join(sorted(set(missing.values())))} (apt-get install -y "
            f"{' '.join(sorted(set(missing.values())))})"
        )


def _run(
    argv: list[str], input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run an `ip`/`nft` command; raise NetHostsError with its stderr if CHECK and it fails."""
    env = {"PATH": TOOL_PATH, "LC_ALL": "C"}
    try:
        done = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise NetHostsError(f"`{' '.join(argv)}` did not finish in {COMMAND_TIMEOUT_S} s") from exc
    if check and done.returncode != 0:
        raise NetHostsError(
            f"`{' '.join(argv)}` failed with status {done.returncode}: {done.stderr.strip()}"
        )
    return done


def _netns_id(netns: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the namespace mounted at /run/netns/NETNS, None if not there."""
    try:
        st = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(ns_id: tuple[int, int]) -> list[int]:
    """Every live process (not zombie) whose network namespace is NS_ID, except ourselves."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, or a zombie (it has no namespaces left)
            continue
        if (st.st_dev, st.st_ino) == ns_id:
            found.append(int(entry.name))
    return found


def _kill_netns(ns_id: tuple[int, int], what: str, timeout_s: float) -> None:
    """SIGKILL every process in NS_ID until none is left; NetHostsError after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    while pids := pids_in_netns(ns_id):
        if time.monotonic() >= deadline:
            raise NetHostsError(f"{what}: processes {pids} survive SIGKILL for {timeout_s} s")
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_PERIOD_S)


def _mac(name: str) -> str:
    """A stable, locally administered unicast MAC address for the interface NAME."""
    digest = hashlib.blake2b(name.encode(), digest_size=5).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest))


def _link_exists(ifname: str) -> bool:
    return Path(f"/sys/class/net/{ifname}").exists()  # our /sys: the root namespace's links


def _remove_netns(netns: str) -> None:
    """Kill what runs in NETNS, then unmount it; no error if it is not there."""
    ns_id = _netns_id(netns)
    if ns_id is not None:
        _kill_netns(ns_id, f"netns {netns}", KILL_TIMEOUT_S)
    if (NETNS_DIR / netns).exists():
        _run(["ip", "netns", "del", netns])


def _remove_link(ifname: str) -> None:
    """Delete IFNAME; no error if it is not there, or vanishes meanwhile (the veth end of a
    namespace being destroyed goes away asynchronously)."""
    if _link_exists(ifname):
        done = _run(["ip", "link", "del", ifname], check=False)
        if done.returncode != 0 and _link_exists(ifname):
            raise NetHostsError(f"`ip link del {ifname}` failed: {done.stderr.strip()}")


def sweep_leftovers() -> list[str]:
    """Remove the namespaces and links of earlier runs whose process is gone (a SIGKILLed
    test): their processes are killed by PID first. Returns what was removed."""
    removed = []
    if NETNS_DIR.is_dir():
        for entry in sorted(os.listdir(NETNS_DIR)):
            match = _NETNS_RE.match(entry)
            if match and not alive(int(match["pid"])):
                _remove_netns(entry)
                removed.append(f"netns {entry}")
    stale = [
        match
        for match in map(_LINK_RE.match, sorted(os.listdir("/sys/class/net")))
        if match and not alive(int(match["pid"]))
    ]
    # Root-side veths before bridges; deleting a veth end removes the end in the namespace.
    for match in sorted(stale, key=lambda m: m["veth"] is None):
        _remove_link(match[0])
        removed.append(f"link {match[0]}")
    return removed


@contextmanager
def _locked(timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold LOCK_PATH exclusively: one run at a time picks a subnet or sweeps."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise NetHostsError(
                        f"lock {LOCK_PATH} held for more than {timeout_s} s by another run"
                    ) from None
                time.sleep(POLL_PERIOD_S)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of the root namespace: addresses and routes of all tables."""
    used = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for addr in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for route in json.loads(
        _run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"
    ):
        dst = route.get("dst", "default")
        if dst != "default":
            with suppress(ValueError):
                used.append(ipaddress.ip_network(dst, strict=False))
    return used


def _free_subnet(base: str, start: int) -> ipaddress.IPv4Network:
    """The first BASE.N.0/24, N = START, START+1, ... mod 256, that nothing uses."""
    used = _used_networks()
    for k in range(256):
        net = ipaddress.ip_network(f"{base}.{(start + k) % 256}.0/{SUBNET_PREFIX_BITS}")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetHostsError(f"no free /24 in {base}.0.0/16; remove some of its addresses")


class NetHost:
    """One simulated host: a network namespace with one address. Made by NetHosts."""

    def __init__(self, name: str, netns: str, veth: str, mac: str) -> None:
        self.name = name
        self.netns = netns
        self.address = ""  # set by NetHosts.start()
        self.veth = veth  # the root-side end, a port of the bridge
        self.mac = mac  # of the host's eth0: the same after crash(), as a real NIC's
        self._bridge = ""
        self._prefix_len = 0
        self._ns_id: tuple[int, int] | None = None  # set once the namespace exists
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"NetHost({self.name!r}, netns={self.netns!r}, address={self.address!r})"

    # --- processes -----------------------------------------------------------------------

    def argv(self, cmd: list[str]) -> list[str]:
        """CMD run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def popen(self, cmd: list[str], log_path: Path | str, **kw: Any) -> subprocess.Popen:
        """Start CMD in this host's namespace, in its own session (a Ctrl-C at the caller's
        terminal does not reach it), stdout and stderr appended to LOG_PATH. KW go to Popen.
        kill_all() and stop() kill it (by PID) and reap it."""
        self._require_started()
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self.argv(cmd), stdout=log, stderr=subprocess.STDOUT, **kw)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every live process in this host's network namespace, whoever started it."""
        if self._ns_id is None:
            return []
        return pids_in_netns(self._ns_id)

    def kill_all(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every process in the namespace until none is left (a process may fork
        meanwhile), and reap the ones popen() started. NetHostsError if some survive
        TIMEOUT_S."""
        deadline = time.monotonic() + timeout_s
        while True:
            # popen()'s own children by PID too: `ip netns exec` is in the root namespace
            # until its setns(); poll() reaps, so a PID we signal is never a reused one.
            mine = {proc.pid for proc in self._procs if proc.poll() is None}
            pids = sorted(mine.union(self.pids()))
            if not pids:
                break
            if time.monotonic() >= deadline:
                raise NetHostsError(
                    f"host {self.name} (netns {self.netns}): processes {pids} survive "
                    f"SIGKILL for {timeout_s} s"
                )
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(POLL_PERIOD_S)
        self._procs = []

    def _require_started(self) -> None:
        if self._ns_id is None:
            raise NetHostsError(f"host {self.name}: not started (no netns {self.netns})")

    # --- the network cut -----------------------------------------------------------------

    def cut(self, drop_arp: bool = False) -> None:
        """Cut the host off: drop every frame on its eth0, both ways, below the IP stack.
        Peers and the host itself see silence (no RST, no ICMP, no local error); the link
        stays up; ARP still gets through unless DROP_ARP (then a peer's new connects fail
        with EHOSTUNREACH after ~3 s). Idempotent; a second cut replaces the first."""
        self._require_started()
        keep = "" if drop_arp else "meta protocol arp accept"
        chains = "".join(
            f"  chain cut_{hook} {{\n"
            f'    type filter hook {hook} device "{HOST_IFNAME}" priority {CUT_PRIORITY};\n'
            f"    policy drop;\n    {keep}\n  }}\n"
            for hook in ("ingress", "egress")
        )
        # One transaction: make the table if missing, delete it, load the new one.
        script = (
            f"table netdev {CUT_TABLE} {{}}\ndelete table netdev {CUT_TABLE}\n"
            f"table netdev {CUT_TABLE} {{\n{chains}}}\n"
        )
        _run(self.argv(["nft", "-f", "-"]), input=script)

    def heal(self) -> None:
        """Undo cut(): delete the table. Idempotent."""
        self._require_started()
        script = f"table netdev {CUT_TABLE} {{}}\ndelete table netdev {CUT_TABLE}\n"
        _run(self.argv(["nft", "-f", "-"]), input=script)

    @property
    def cut_active(self) -> bool:
        """Whether the cut table is loaded, as the kernel says."""
        if self._ns_id is None:
            return False
        done = _run(self.argv(["nft", "list", "tables", "netdev"]))
        return f"table netdev {CUT_TABLE}" in done.stdout.splitlines()

    def crash(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """Power cut: cut() first, so the kernel's FINs and RSTs for the killed sockets never
        leave, then kill_all(), then replace the namespace by a fresh one (same name, address
        and MAC, cut) so that no kernel state survives: the killed processes' sockets would
        otherwise linger in FIN-WAIT-1 and, after heal(), deliver data written during the cut
        and a FIN. The host stays cut and empty; heal() is "power back"."""
        self.cut()
        self.kill_all(timeout_s)
        self._destroy()
        self._create(cut=True)

    # --- the namespace -------------------------------------------------------------------

    def _create(self, cut: bool = False) -> None:
        """Make the namespace, its veth on the bridge and its address; with CUT, load the
        cut before eth0 comes up, so nothing gets through in between."""
        _run(["ip", "netns", "add", self.netns])
        self._ns_id = _netns_id(self.netns)
        assert self._ns_id is not None, self.netns
        _run(["ip", "link", "add", self.veth, "type", "veth",
              "peer", "name", HOST_IFNAME, "address", self.mac, "netns", self.netns])  # fmt: skip
        _run(["ip", "link", "set", self.veth, "master", self._bridge, "up"])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.netns, "addr", "add", f"{self.address}/{self._prefix_len}",
              "dev", HOST_IFNAME])  # fmt: skip
        if cut:
            self.cut()
        _run(["ip", "-n", self.netns, "link", "set", HOST_IFNAME, "up"])

    def _destroy(self) -> None:
        """Kill what runs in the namespace, delete the veth (both ends at once: a namespace
        still held by an orphaned socket keeps only lo), then the namespace's name."""
        try:
            self.kill_all()
        finally:
            _remove_link(self.veth)
            _remove_netns(self.netns)
            self._ns_id = None


class NetHosts:
    """Hosts as network namespaces on one bridge; a context manager, or start()/stop()."""

    def __init__(self, names: Iterable[str], subnet_base: str = SUBNET_BASE) -> None:
        """NAMES: the hosts, in address order. SUBNET_BASE: "A.B"; the hosts get A.B.N.0/24."""
        names = list(names)
        if not names or len(names) > MAX_HOSTS:
            raise ValueError(f"need 1 to {MAX_HOSTS} host names, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be distinct: {names}")
        for name in names:
            if not _HOST_NAME_RE.match(name):
                raise ValueError(f"host name {name!r}: use letters, digits, '_', '.', '-'")
        self.subnet_base = subnet_base
        seq = next(_SEQ) % (26 * 26)
        self.tag = (
            f"{os.getpid()}{string.ascii_lowercase[seq // 26]}{string.ascii_lowercase[seq % 26]}"
        )
        self.bridge = f"{NAME_PREFIX}{self.tag}"
        self.hosts: dict[str, NetHost] = {}
        for i, name in enumerate(names):
            veth = f"{NAME_PREFIX}{self.tag}v{i}"
            assert len(veth) <= IFNAME_MAX_CHARS, veth
            netns = f"{NAME_PREFIX}{self.tag}-{name}"
            self.hosts[name] = NetHost(name, netns, veth, _mac(netns))
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""  # the root namespace's address on the hosts' network

    def __repr__(self) -> str:
        return f"NetHosts({list(self.hosts)}, bridge={self.bridge!r}, subnet={self.subnet})"

    def __getitem__(self, name: str) -> NetHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"host {name!r} not found; hosts: {', '.join(self.hosts)}") from None

    def __iter__(self) -> Iterator[NetHost]:
        return iter(self.hosts.values())

    def start(self) -> None:
        """Make the bridge, then every host's namespace, veth and address. On failure, remove
        what was made and raise. Removes leftovers of earlier runs that died first."""
        check_requirements()
        if self.subnet is not None:
            raise NetHostsError(f"{self!r}: already started")
        try:
            with _locked():
                sweep_leftovers()
                self._remove_own_leftovers()
                self.subnet = _free_subnet(self.subnet_base, os.getpid() % 256)
                self._make()
        except BaseException as exc:
            try:
                self.stop()
            except Exception as stop_exc:
                exc.add_note(f"while cleaning up: {stop_exc}")
            raise

    def _remove_own_leftovers(self) -> None:
        """Our names, left by an earlier run with our PID (reused) that was SIGKILLed."""
        for host in self.hosts.values():
            _remove_link(host.veth)
            _remove_netns(host.netns)
        _remove_link(self.bridge)

    def _make(self) -> None:
        assert self.subnet is not None
        base = str(self.subnet.network_address).rsplit(".", 1)[0]
        prefix = self.subnet.prefixlen
        self.gateway = f"{base}.{GATEWAY_OCTET}"
        # A fixed MAC: a bridge otherwise takes its ports' lowest, which changes with them.
        _run(["ip", "link", "add", self.bridge, "address", _mac(self.bridge), "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i, host in enumerate(self.hosts.values()):
            host.address = f"{base}.{FIRST_HOST_OCTET + i}"
            host._bridge, host._prefix_len = self.bridge, prefix
            host._create()

    def stop(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """Kill every process of every host by PID, delete the namespaces, veths and the
        bridge. Idempotent; works after a start() that failed half way. Raises NetHostsError
        (after doing all it can) if a process survives or a deletion fails."""
        errors = []
        for host in self.hosts.values():
            try:
                host.kill_all(timeout_s)
            except NetHostsError as exc:
                errors.append(str(exc))
            # The veth first: deleting it removes both ends at once.
            for remove, what in ((_remove_link, host.veth), (_remove_netns, host.netns)):
                try:
                    remove(what)
                except NetHostsError as exc:
                    errors.append(str(exc))
            host._ns_id = None
        try:
            _remove_link(self.bridge)
        except NetHostsError as exc:
            errors.append(str(exc))
        self.subnet = None
        if errors:
            raise NetHostsError("; ".join(errors))

    def __enter__(self) -> NetHosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
