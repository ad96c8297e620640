"""Three simulated hosts of an HA cluster on this machine, all real: alpha and beta (each an
etcd member, an `rblock up` node, a libvirtd and an `hvctl agent`) and a witness (an etcd
member only), each host in its own network namespace (tools/netns_hosts.py) so a cut or a
power loss of one host is silence to the others, as on a real network.

    with HaHosts(Path("build/ha"), guests=GUEST_TOML) as ha:   # etcd, rblock, libvirt up
        ha.start_agents()
        ha.hvctl("ha", "status")
        ha.crash("alpha")            # power cut: silence, every process SIGKILLed
        ha.power_on("alpha")         # the host boots: etcd, rblock, libvirtd, agent again
        ha.net["alpha"].cut(); ha.net["alpha"].heal()

Addresses: host i is 10.88.N.(10+i) (NetHosts). etcd listens on ADDR:2379 (clients) and
ADDR:2380 (peers); rblock's replication on ADDR:7789; its NBD export on 127.0.0.1 inside
the host's namespace (QEMU runs there, with the host's libvirtd); its control API on a unix
socket under the work directory, which the caller reaches from the root namespace (unix
sockets cross network namespaces), as it reaches each libvirtd. One cluster file serves
every process and the caller's `hvctl`.

Every process is started by PID in its host's namespace and killed by PID (NetHost.kill_all
finds whatever runs in the namespace, QEMU included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tools.etcd_local import healthy
from tools.libvirt_hosts import LibvirtHost
from tools.netns_hosts import NetHosts
from tools.procs import stop_by_pid

REPO = Path(__file__).resolve().parent.parent
DATA_HOSTS = ("alpha", "beta")
HOSTS = (*DATA_HOSTS, "witness")
NBD_PORTS = {"alpha": 10809, "beta": 10810}  # on each host's own loopback
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
REPLICATION_PORT = 7789
UP_TIMEOUT_S = 30.0
ETCD_START_TIMEOUT_S = 20.0
WAIT_POLL_S = 0.05
STOP_TIMEOUT_S = 20.0


def guest_toml(kernel: Path, initrd: Path, marker: str, name: str = "vm1", disk: str = "r0",
               memory: str = "128M", extra: str = "") -> str:
    """An HA guest of tools/build_guest.py: at every boot it prints PEEK:<sector 0>, writes
    MARKER there, then W<i> to block 10 every 0.5 s (LOOP i ok once each is done)."""
    return f"""
[guest.{name}]
disks = ["{disk}"]
memory = "{memory}"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 panic=-1 quiet rblock.peek=1 rblock.write={marker} rblock.loop=100000 rblock.hold=1"
ha = "started"        # hvctl's agents keep it running somewhere
prefer = ["alpha"]
{extra}"""


class HaHosts:
    def __init__(self, workdir: Path, guests: str, size: str = "64M",
                 lease_ttl_s: int = 5, extra_cluster: str = "",
                 resources: tuple[str, ...] = ("r0",),
                 resync_rates: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # libvirt-qemu reads nothing here, but root-only dirs
        self.guests = guests
        self.size = size
        self.lease_ttl_s = lease_ttl_s
        self.extra_cluster = extra_cluster
        self.resources = resources
        self.resync_rates = resync_rates or {}  # resource -> rate ("400M" if not given)
        self.net = NetHosts(HOSTS)
        self.libvirt: dict[str, LibvirtHost] = {}
        self.etcd: dict[str, subprocess.Popen] = {}
        self.rblock_procs: dict[str, subprocess.Popen] = {}
        self.agents: dict[str, subprocess.Popen] = {}
        self.config = self.dir / "cluster.toml"
        self._logn: dict[str, int] = {}

    # --- whole cluster ------------------------------------------------------------------------

    def __enter__(self) -> HaHosts:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.net.start()
        self.config.write_text(self._config_text())
        for h in HOSTS:
            self.start_etcd(h)
        self.wait_etcd(HOSTS)
        for h in DATA_HOSTS:
            self.rblock(h, "create-md")
            self.start_rblock(h)
            self.start_libvirt(h)
        self.wait(lambda: self.res("alpha")["peers"][0]["connection"] == "Connected",
                  "alpha and beta connected")
        for r in self.resources:
            self.rblock("alpha", "primary", r, "--force")
        self.wait(lambda: all(self._in_sync(h, r) for h in DATA_HOSTS
                              for r in self.resources), "resources in sync", timeout_s=60)
        for r in self.resources:
            self.rblock("alpha", "secondary", r)

    def stop(self) -> None:
        for h in list(self.agents):
            self.stop_agent(h)
        for h, lv in self.libvirt.items():
            try:
                lv.stop()
            except Exception as e:  # noqa: BLE001 -- stop the rest whatever happens
                print(f"libvirt host {h}: {e}", file=sys.stderr)
        for p in self.rblock_procs.values():
            stop_by_pid(p, 15, STOP_TIMEOUT_S)
        # etcd: SIGKILL. A member that is Raft leader hands its leadership over on SIGTERM
        # and waits for members that are already gone: ~19 s per cluster here, for data
        # directories that are thrown away.
        for p in self.etcd.values():
            stop_by_pid(p, 9, STOP_TIMEOUT_S)
        self.net.stop()

    # --- the cluster file ---------------------------------------------------------------------

    def addr(self, host: str) -> str:
        return self.net[host].address

    def etcd_url(self, host: str) -> str:
        return f"http://{self.addr(host)}:{ETCD_CLIENT_PORT}"

    def control_socket(self, host: str) -> Path:
        return self.dir / f"{host}-control.sock"

    def disk(self, host: str, resource: str = "r0") -> Path:
        return self.dir / host / f"{resource}.img"

    def _config_text(self) -> str:
        eps = ", ".join(f'"{self.etcd_url(h)}"' for h in HOSTS)
        lines = [f'[cluster]\netcd = [{eps}]\nlease_ttl_s = {self.lease_ttl_s}\n'
                 f'{self.extra_cluster}\n',
                 '[hvctl]\nstate_dir = "hvctl-state"\ndomain_type = "qemu"\n'
                 'stop_timeout_s = 10\n',
                 *(f'[resource.{r}]\nsize = "{self.size}"\nsecret = "ha-test-secret"\n'
                   f'resync_rate = "{self.resync_rates.get(r, "400M")}"\n'
                   for r in self.resources)]
        for h in DATA_HOSTS:
            (self.dir / h).mkdir(exist_ok=True)
            lines.append(f'[node.{h}]\nreplication = "{self.addr(h)}:{REPLICATION_PORT}"\n'
                         f'control = "unix:{self.control_socket(h)}"\n'
                         f'nbd = "127.0.0.1:{NBD_PORTS[h]}"\n'
                         f'libvirt = "{self._libvirt(h).uri}"\n'
                         f'[node.{h}.disk]\n' +
                         "".join(f'{r} = "{h}/{r}.img"\n' for r in self.resources))
        lines.append(self.guests)
        return "\n".join(lines)

    def _libvirt(self, host: str) -> LibvirtHost:
        if host not in self.libvirt:
            self.libvirt[host] = LibvirtHost(host, self.dir / "libvirt",
                                             netns=self.net[host].netns)
        return self.libvirt[host]

    # --- processes ----------------------------------------------------------------------------

    def _log(self, what: str) -> Path:
        n = self._logn.get(what, 0)
        self._logn[what] = n + 1
        return self.dir / f"{what}-{n}.log"

    def log_text(self, what: str) -> str:
        n = self._logn.get(what, 0)
        return "".join((self.dir / f"{what}-{i}.log").read_text(errors="replace")
                       for i in range(n))

    def start_etcd(self, host: str) -> None:
        a = self.addr(host)
        initial = ",".join(f"{h}=http://{self.addr(h)}:{ETCD_PEER_PORT}" for h in HOSTS)
        data = self.dir / f"etcd-{host}"
        self.etcd[host] = self.net[host].popen(
            [shutil.which("etcd") or "etcd", "--name", host, "--data-dir", str(data),
             "--listen-client-urls", f"http://{a}:{ETCD_CLIENT_PORT}",
             "--advertise-client-urls", f"http://{a}:{ETCD_CLIENT_PORT}",
             "--listen-peer-urls", f"http://{a}:{ETCD_PEER_PORT}",
             "--initial-advertise-peer-urls", f"http://{a}:{ETCD_PEER_PORT}",
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--heartbeat-interval", "100", "--election-timeout", "1000",
             "--pre-vote"],
            self._log(f"etcd-{host}"))

    def wait_etcd(self, hosts: tuple[str, ...]) -> None:
        self.wait(lambda: all(healthy(self.etcd_url(h)) for h in hosts),
                  f"etcd healthy on {', '.join(hosts)}", timeout_s=ETCD_START_TIMEOUT_S)

    def rblock(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rblock", args[0], "--config", str(self.config),
               "--node", host, *args[1:]]
        res = subprocess.run(self.net[host].argv(cmd), capture_output=True, text=True,
                             cwd=REPO, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"rblock {' '.join(args)} on {host} failed "
                                 f"({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def start_rblock(self, host: str) -> None:
        out = self._log(f"rblock-{host}.out")
        # rblock up prints "ready" on stdout: keep stdout apart from the log
        with out.open("wb") as o, self._log(f"rblock-{host}").open("wb") as e:
            proc = subprocess.Popen(self.net[host].argv(
                [sys.executable, "-m", "rblock", "up", "--config", str(self.config),
                 "--node", host]), stdout=o, stderr=e, stdin=subprocess.DEVNULL, cwd=REPO,
                start_new_session=True)
        self.rblock_procs[host] = proc
        self.wait(lambda: "ready" in out.read_text().splitlines() or proc.poll() is not None,
                  f"rblock up {host}", timeout_s=UP_TIMEOUT_S)
        if proc.poll() is not None:
            raise AssertionError(f"rblock up {host} exited {proc.returncode}: "
                                 f"{self.log_text(f'rblock-{host}')}")

    def start_libvirt(self, host: str) -> None:
        self._libvirt(host).start()

    def start_agents(self) -> None:
        for h in DATA_HOSTS:
            self.start_agent(h)

    def start_agent(self, host: str) -> subprocess.Popen:
        self.agents[host] = self.net[host].popen(
            [sys.executable, "-m", "hvctl", "--config", str(self.config), "agent", "--node",
             host], self._log(f"agent-{host}"), cwd=REPO)
        return self.agents[host]

    def stop_agent(self, host: str) -> int:
        p = self.agents.pop(host)
        return stop_by_pid(p, 15, STOP_TIMEOUT_S)[0]

    def kill_agent(self, host: str) -> None:
        stop_by_pid(self.agents.pop(host), 9, STOP_TIMEOUT_S)

    # --- host failures ------------------------------------------------------------------------

    def crash(self, host: str) -> None:
        """Power cut: the host's traffic dropped, then every process of it SIGKILLed."""
        self.net[host].crash()
        for procs in (self.agents, self.rblock_procs, self.etcd):
            p = procs.pop(host, None)
            if p is not None:
                p.wait(STOP_TIMEOUT_S)
        if host in self.libvirt:
            self.libvirt[host].crash()

    def power_on(self, host: str, agent: bool = True) -> None:
        """The host boots again: network, etcd, rblock, libvirtd, the agent."""
        self.net[host].heal()
        self.start_etcd(host)
        if host in DATA_HOSTS:
            self.start_rblock(host)
            self.libvirt[host].start()
            if agent:
                self.start_agent(host)

    # --- looking ------------------------------------------------------------------------------

    def hvctl(self, *args: str, check: bool = True,
              timeout_s: float = 180) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "hvctl", "--config", str(self.config),
                              *args], capture_output=True, text=True, cwd=REPO,
                             timeout=timeout_s)
        if check and res.returncode != 0:
            raise AssertionError(f"hvctl {' '.join(args)} failed ({res.returncode}): "
                                 f"{res.stderr}{res.stdout}")
        return res

    def status(self, host: str) -> dict:
        return json.loads(self.rblock(host, "status", "--json").stdout)

    def res(self, host: str, resource: str = "r0") -> dict:
        return next(r for r in self.status(host)["resources"] if r["name"] == resource)

    def _in_sync(self, host: str, resource: str = "r0") -> bool:
        from rblock.control_client import in_sync

        return in_sync(self.res(host, resource))

    def domain_state(self, host: str, name: str) -> str:
        """running, stopped, ... or "none" (not defined) or "down" (libvirtd not there)."""
        import libvirt

        import hvctl.virt  # noqa: F401 -- its error handler keeps libvirt off stderr

        lv = self.libvirt.get(host)
        if lv is None or not lv.running:
            return "down"
        try:
            conn = libvirt.open(lv.uri)
        except libvirt.libvirtError:
            return "down"
        try:
            dom = conn.lookupByName(name)
            return "running" if dom.isActive() else "stopped"
        except libvirt.libvirtError:
            return "none"
        finally:
            conn.close()

    def console(self, guest: str) -> Path:
        return self.dir / "hvctl-state" / "console" / f"{guest}.log"

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> float:
        """Seconds until COND() holds; AssertionError naming WHAT after TIMEOUT_S."""
        t0 = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - t0 < timeout_s:
            try:
                if cond():
                    return time.monotonic() - t0
            except (AssertionError, OSError, ValueError, KeyError, StopIteration,
                    IndexError) as e:
                last = e
            time.sleep(WAIT_POLL_S)
        raise AssertionError(f"{what}: not after {timeout_s:g} s" +
                             (f" (last error: {last})" if last else ""))
