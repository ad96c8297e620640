"""Simulated hypervisor hosts: several libvirtd instances on one machine.

Each `LibvirtHost` is its own `virtlogd` + `libvirtd` pair in a private mount namespace
(`unshare --mount --propagation private`) where these directories are bind mounts of
per-host directories under BASE_DIR/NAME:

    /run/libvirt        BASE_DIR/NAME/run     sockets, pidfiles, live domain state
    /var/lib/libvirt    BASE_DIR/NAME/lib     per-domain dirs (monitor, master key)
    /var/log/libvirt    BASE_DIR/NAME/log     QEMU's per-domain logs: log/qemu/DOMAIN.log
    /var/cache/libvirt  BASE_DIR/NAME/cache   QEMU capabilities cache
    /etc/libvirt        BASE_DIR/NAME/etc     libvirtd.conf, qemu.conf, virtlogd.conf written
                                              here, and the host's persistent domain XML

so each host has its own domains, sockets and logs. Clients connect to
`qemu:///system?socket=BASE_DIR/NAME/run/libvirt-sock` (`LibvirtHost.uri`). The daemons log
warnings and errors to BASE_DIR/NAME/{libvirtd,virtlogd}.log, the host's init (below) to
BASE_DIR/NAME/init.log. Persistent domain definitions survive stop()/start(), as on a
rebooted server; run/ is emptied at every start().

    from tools.libvirt_hosts import hosts
    with hosts(Path("build/hosts"), ["node-a", "node-b"]) as hv:
        conn = hv["node-a"].connect()           # a libvirt.virConnect; close it when done
        conn.defineXML(domain_xml).create()
        conn.close()
        hv["node-b"].crash()                    # power loss: SIGKILL all of node-b at once
    # every domain destroyed; no daemon or QEMU of either host left

Needs root (mount namespaces, qemu:///system), the Debian packages libvirt-daemon-system,
libvirt-clients, qemu-system-x86, util-linux (`unshare`) and the Python module `libvirt`
(libvirt-python); `check_requirements()` raises `LibvirtHostUnavailable` naming the fix
otherwise. Probing whether KVM works is not done here (hvctl does it).

Network. By default every host shares the caller's network namespace. With `netns=NAME` (a
namespace under /run/netns, e.g. `tools.netns_hosts.NetHost.netns`) the init is started as
`ip netns exec NAME unshare ...`, so libvirtd and the QEMUs it starts live in that network
namespace (a network cut of the namespace cuts the host's guests too); the unix socket still
answers from the caller's namespace.

Processes. A host is a tree: `unshare` exec's this file as the host's *init* (`--init`),
which makes the bind mounts, becomes a child subreaper (prctl), starts virtlogd, waits for
its socket, starts libvirtd, reports both PIDs on stdout and reaps every child until
SIGTERM, when it stops libvirtd, then virtlogd, then SIGKILLs what is left. libvirtd
double-forks QEMU, so QEMU is re-parented to this init and reaped at once. The caller owns
only the init (own session: a Ctrl-C at the caller's terminal does not reach the host).

What was found on Debian 12 (libvirt 9.0, QEMU 7.2, no systemd, cgroup v1, 2 cores):

- Reaping: on this machine PID 1 reaps orphans lazily, up to ~2 s after they exit. libvirt
  waits for a killed QEMU's PID to vanish, so without our subreaper every destroy and every
  guest power-off cost 1.4-1.8 s more (boot-to-shutoff 3.8-4.5 s instead of 2.6-2.7 s).
- A process belongs to a host when /proc/PID/root/run/libvirt is the host's run/ directory
  (same device and inode): that finds QEMU too, which libvirt starts in a child mount
  namespace of libvirtd's. stop() kills what it finds so as the last resort (after
  destroying domains through libvirt, the init's orderly stop, and the QEMUs named in
  run/qemu/*.pid); start() kills what an earlier run left when its owner was SIGKILLed.
- Mounts: the namespace dies with its last process and nothing leaks into the caller's
  namespace, except the empty directory /run/libvirt, created once as the mount point.
- Stale state: run/ (sockets, pidfiles) is deleted before each start; a libvirtd whose
  pidfile is still locked by a leftover would refuse to start, hence the kill above.
- Start time: a fresh host probes QEMU's capabilities (qemu-system-x86_64 and -i386) in
  ~1.3 s (~8 s before the subreaper: the probe QEMUs are orphans too); with the
  capabilities cache shared between hosts (`caps_cache`, default
  build/libvirt-qemu-caps) a host answers `virsh version` 0.18-0.2 s after start() begins.
  stop() takes ~0.1 s without guests.
- Networks and firewall: we never copy /etc/libvirt. Debian's networks/default.xml is a NAT
  bridge (virbr0 + dnsmasq + firewall rules) that the first host to autostart it would
  create in the *shared* network namespace, colliding with the next host. Our hosts have
  no networks and no nwfilters: `nft list ruleset` stays empty and no virbr0 appears.
  Guests use no NIC or user-mode networking. libvirtd.log shows harmless errors at start:
  no D-Bus system bus (firewalld support off), dmidecode cannot read /dev/mem.
- cgroups: without systemd libvirt makes cgroup v1 directories
  machine/qemu-ID-NAME.libvirt-qemu; domain IDs restart at 1 in every libvirtd, so hosts
  running guests of the same name would share and delete each other's cgroups. qemu.conf
  sets `cgroup_controllers = [ ]`.
- Each host has its own `host_uuid` (derived from its directory) so libvirt does not see
  two hosts as one machine (it refuses a migration to the "same host").
- Files and users: QEMU runs as libvirt-qemu. By default libvirt chowns a guest's kernel
  and initrd to libvirt-qemu and back to root when it stops, which races between hosts
  sharing the files (seen: one host's guest ending chowned the files back under another's
  running guest). qemu.conf sets `dynamic_ownership = 0`, so libvirt changes no file's
  owner: a guest's kernel and initrd must be world-readable and every parent directory
  traversable (o+x). A pytest tmp_path (0700) is not: createXML fails with "qemu: could not
  open kernel file '...': Permission denied". tools/build_guest.py writes files that work.
- Serial console `<serial type='file'>`: libvirt opens the file itself as root and passes
  QEMU the descriptor (`-add-fd ... -chardev file,path=/dev/fdset/0,append=on`), so the log
  may live in any directory root can write, a 0700 tmp_path included; created if missing,
  appended to, owned by root.
- Powering off: without `<features><acpi/></features>` libvirt runs QEMU with -no-acpi;
  the guest's poweroff then only halts ("reboot: System halted") and the domain stays
  running forever. With ACPI it shuts off ("reboot: Power down").
- Boot time through libvirt (TCG, busybox initramfs, NBD disk from `rblock serve`, write a
  sector, power off): create() returns after 0.25-0.35 s, the domain is shut off 2.6-2.7 s
  after create() began. destroy() of a running guest: 0.2 s (1.6-1.8 s without subreaper).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt

# Mount point inside the host's namespace -> subdirectory of the host directory.
PRIVATE_DIRS: dict[str, str] = {
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
    "/etc/libvirt": "etc",
}
DAEMONS = ("virtlogd", "libvirtd")  # start order; stopped in reverse
# Program -> Debian package that has it.
TOOLS = {
    "unshare": "util-linux",
    "mount": "mount",
    "virsh": "libvirt-clients",
    "virtlogd": "libvirt-daemon-system",
    "libvirtd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
}

HOST_START_TIMEOUT_S = 60.0  # generous: ~1.3 s cold, ~0.2 s with the caps cache, 2 cores
HOST_STOP_TIMEOUT_S = 15.0  # per daemon, then SIGKILL
POLL_PERIOD_S = 0.02
# Limit for one `virsh version`: a daemon that accepts but never answers must not hang us.
PROBE_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
DAEMON_LOG_LEVEL = 3  # 1 debug, 2 info, 3 warning, 4 error
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
INIT_MOUNT_FAILED = 97  # the init's exit status when a bind mount fails
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts named network namespaces

# libvirtd probes each QEMU binary and caches the result in cache/qemu/capabilities/. An entry
# records what it depends on (QEMU and libvirtd ctimes, kernel, microcode) and libvirt
# re-probes when one changed, so sharing entries between hosts of one machine is safe.
CAPS_SUBDIR = Path("cache/qemu/capabilities")
DEFAULT_CAPS_CACHE = Path(__file__).resolve().parent.parent / "build" / "libvirt-qemu-caps"

# The daemons read LIBVIRT_LOG_* and friends from the environment: give them a clean one.
DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class LibvirtHostUnavailable(RuntimeError):
    """This machine cannot run simulated hosts (not root, a package missing)."""


class LibvirtHostError(RuntimeError):
    """A host failed to start or stop; the message carries the tail of its logs."""


def check_requirements() -> None:
    """Raise LibvirtHostUnavailable, naming the fix, when hosts cannot run here."""
    if os.geteuid() != 0:
        raise LibvirtHostUnavailable(
            "simulated libvirt hosts need root (mount namespaces, qemu:///system); run as root"
        )
    missing = {
        tool: package
        for tool, package in TOOLS.items()
        if shutil.which(tool, path=DAEMON_ENV["PATH"]) is None
    }
    if missing:
        raise LibvirtHostUnavailable(
            f"{', '.join(missing)} not found; install the Debian packages "
            f"{' '.join(sorted(set(missing.values())))} (`make deps` does)"
        )
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        raise LibvirtHostUnavailable(
            f"Python module libvirt not importable ({exc}); install libvirt-python "
            "(`make venv` does; it builds against Debian's libvirt-dev)"
        ) from exc


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def alive(pid: int) -> bool:
    """True while PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    end = stat.rindex(b")")
    return stat[end + 2 : end + 3] != b"Z"


def _wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until no PID is alive; return those still alive at the deadline."""
    left = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in left if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_PERIOD_S)


def _kill(pids: Iterable[int], timeout_s: float) -> list[int]:
    """SIGKILL PIDS; return those still alive after TIMEOUT_S."""
    pids = list(pids)
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return _wait_gone(pids, timeout_s)


class LibvirtHost:
    """One simulated hypervisor: virtlogd + libvirtd in a private mount namespace."""

    def __init__(
        self,
        name: str,
        base_dir: Path,
        caps_cache: Path | None = DEFAULT_CAPS_CACHE,
        netns: str | None = None,
    ) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"host name {name!r}: need a plain directory name")
        self.name = name
        self.base_dir = Path(base_dir).resolve()
        for mount_point in PRIVATE_DIRS:
            if self.base_dir.is_relative_to(mount_point):
                raise ValueError(
                    f"base_dir {self.base_dir} is under {mount_point}, which each host "
                    "replaces by its own directory; choose another base_dir"
                )
        self.dir = self.base_dir / name
        self.caps_cache = caps_cache
        self.netns = netns  # network namespace (/run/netns/NETNS) of the host, None: ours
        self._init: subprocess.Popen | None = None
        self._probe_error = ""

    def __repr__(self) -> str:
        return f"LibvirtHost({self.name!r}, {str(self.dir)!r}, pids={self.pids})"

    # --- paths ---------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        """libvirtd's own log (warnings and errors)."""
        return self.dir / "libvirtd.log"

    def domain_log_path(self, domain: str) -> Path:
        """QEMU's command line and stderr for DOMAIN (/var/log/libvirt/qemu/ in the host)."""
        return self.dir / "log" / "qemu" / f"{domain}.log"

    # --- processes -----------------------------------------------------------------------

    def _reported(self) -> tuple[dict[str, int], dict[str, int]]:
        """(started, exited) as the init reports them: daemon -> PID, daemon -> status."""
        started: dict[str, int] = {}
        exited: dict[str, int] = {}
        with suppress(FileNotFoundError):
            for line in (self.dir / "init.out").read_text().splitlines():
                match line.split():
                    case ["started", daemon, pid]:
                        started[daemon] = int(pid)
                        exited.pop(daemon, None)  # restarted (restart_libvirtd)
                    case ["exited", daemon, status]:
                        exited[daemon] = int(status)
        return started, exited

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running processes of this host started by this object:
        "init", "virtlogd", "libvirtd"."""
        if self._init is None or self._init.poll() is not None:
            return {}
        started, exited = self._reported()
        found = {"init": self._init.pid}
        found.update((d, pid) for d, pid in started.items() if d not in exited and alive(pid))
        return found

    @property
    def running(self) -> bool:
        return set(self.pids) == {"init", *DAEMONS}

    def qemu_pids(self) -> list[int]:
        """Live QEMU processes named by the pidfiles libvirt keeps in run/qemu/."""
        found = []
        for pidfile in sorted((self.run_dir / "qemu").glob("*.pid")):
            with suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                # A stale pidfile's PID may have been reused by an unrelated process.
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu") and alive(pid):
                    found.append(pid)
        return found

    def processes(self) -> list[int]:
        """Every live process that sees this host's run/ as /run/libvirt: the init, the
        daemons, QEMU."""
        try:
            st = self.run_dir.stat()
        except FileNotFoundError:
            return []
        me = os.getpid()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:  # resolved in that process's mount namespace
                seen = os.stat(f"/proc/{entry.name}/root/run/libvirt")
            except OSError:  # gone, a zombie, or no /run/libvirt where it looks
                continue
            if (seen.st_dev, seen.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(entry.name))
        return found

    # --- start ---------------------------------------------------------------------------

    def start(self, timeout_s: float = HOST_START_TIMEOUT_S) -> None:
        """Start the host's init, virtlogd and libvirtd; return once libvirtd answers
        `virsh version`. On failure, stop what was started and raise LibvirtHostError."""
        check_requirements()
        if self._init is not None:
            raise LibvirtHostError(f"host {self.name}: already started, pids {self.pids}")
        if self.netns is not None and shutil.which("ip", path=DAEMON_ENV["PATH"]) is None:
            raise LibvirtHostUnavailable("ip not found; install the Debian package iproute2")
        if self.netns is not None and not (NETNS_DIR / self.netns).exists():
            raise LibvirtHostError(
                f"host {self.name}: network namespace {self.netns!r} not found in {NETNS_DIR}; "
                "create it first (tools/netns_hosts.py NetHosts does)"
            )
        deadline = time.monotonic() + timeout_s
        self._kill_leftovers()
        self._prepare_dirs()
        try:
            self._start_init()
            self._wait_ready(deadline)
        except BaseException:
            with suppress(LibvirtHostError):
                self.stop()
            raise
        self._share_caps()

    def _kill_leftovers(self) -> None:
        """Kill the processes of an earlier run in this directory whose owner died."""
        left = _kill(self.processes(), HOST_STOP_TIMEOUT_S)
        if left:
            raise LibvirtHostError(
                f"host {self.name}: processes {left} of an earlier run in {self.dir} "
                "survive SIGKILL"
            )

    def _prepare_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Sockets and pidfiles of a killed run would make the daemons refuse to start or make
        # us talk to a dead socket. run/ holds nothing else (it is a tmpfs on a real host).
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        for sub in PRIVATE_DIRS.values():
            (self.dir / sub).mkdir(exist_ok=True)
            # As Debian's package has them; libvirtd makes its qemu/ subdirectories itself.
            (self.dir / sub).chmod(0o755)
        for name in ("init.out", "init.log", "libvirtd.log", "virtlogd.log"):
            (self.dir / name).unlink(missing_ok=True)
        self._write_configs()
        self._seed_caps()

    def _write_configs(self) -> None:
        etc = self.dir / "etc"
        header = f"# Written by tools/libvirt_hosts.py for the simulated host {self.name}.\n"
        host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"file://{self.dir}")
        files = {
            "libvirtd.conf": [
                f'log_outputs = "{DAEMON_LOG_LEVEL}:file:{self.log_path}"',
                f'host_uuid = "{host_uuid}"',
                # Root only (0700) and no polkit, which would need a D-Bus system bus.
                'unix_sock_ro_perms = "0700"',
                'unix_sock_rw_perms = "0700"',
                'auth_unix_ro = "none"',
                'auth_unix_rw = "none"',
            ],
            "virtlogd.conf": [
                f'log_outputs = "{DAEMON_LOG_LEVEL}:file:{self.dir / "virtlogd.log"}"',
            ],
            "qemu.conf": [
                # Domain IDs restart at 1 in every libvirtd: cgroup names would collide.
                "cgroup_controllers = [ ]",
                # Hosts share files (kernel, initrd): no chown to libvirt-qemu and back to
                # root under another host's running guest. Guest files must be world-readable.
                "dynamic_ownership = 0",
            ],
        }
        for name, lines in files.items():
            (etc / name).write_text(header + "\n".join(lines) + "\n")

    def _seed_caps(self) -> None:
        """Copy the shared QEMU capabilities cache entries this host lacks."""
        if self.caps_cache is None or not self.caps_cache.is_dir():
            return
        mine = self.dir / CAPS_SUBDIR
        mine.mkdir(parents=True, exist_ok=True)
        for src in self.caps_cache.glob("*.xml"):
            if not (mine / src.name).exists():
                shutil.copy2(src, mine / src.name)

    def _share_caps(self) -> None:
        """Publish this host's newer cache entries, atomically: other hosts may read them."""
        if self.caps_cache is None:
            return
        self.caps_cache.mkdir(parents=True, exist_ok=True)
        for src in (self.dir / CAPS_SUBDIR).glob("*.xml"):
            dst = self.caps_cache / src.name
            if dst.exists() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
                continue
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)

    def _start_init(self) -> None:
        mounts: list[str] = []
        for mount_point, sub in PRIVATE_DIRS.items():
            mounts += [str(self.dir / sub), mount_point]
        argv = [
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-I", str(Path(__file__).resolve()), "--init", str(self.run_dir),
            *mounts,
        ]  # fmt: skip
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with (self.dir / "init.out").open("wb") as out, (self.dir / "init.log").open("wb") as log:
            self._init = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log, cwd="/",
                env=DAEMON_ENV, start_new_session=True,
            )  # fmt: skip

    def _wait_ready(self, deadline: float) -> None:
        """Wait for the socket, then for an answer (it exists before the drivers are up)."""
        self._wait_for("libvirtd socket", self.socket.exists, deadline)
        self._wait_for("libvirtd answer", lambda: self._answers(deadline), deadline)

    def _answers(self, deadline: float) -> bool:
        timeout_s = min(PROBE_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
        with suppress(subprocess.TimeoutExpired):
            probe = subprocess.run(
                ["virsh", "-c", self.uri, "version"], capture_output=True, timeout=timeout_s
            )
            if probe.returncode == 0:
                return True
            self._probe_error = probe.stderr.decode(errors="replace").strip()
        return False

    def _wait_for(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll READY() until DEADLINE; fail early, with the logs, if a daemon exits."""
        assert self._init is not None
        while not ready():
            _, exited = self._reported()
            if exited or self._init.poll() is not None:
                status = ", ".join(f"{d} exited with status {s}" for d, s in exited.items())
                raise self._failure(status or f"init exited with status {self._init.poll()}")
            if time.monotonic() >= deadline:
                raise self._failure(f"no {what} in time {self._probe_error}".rstrip())
            time.sleep(POLL_PERIOD_S)

    def _failure(self, what: str) -> LibvirtHostError:
        parts = [f"host {self.name} ({self.dir}): {what}"]
        for name in ("init.log", "libvirtd.log", "virtlogd.log"):
            path = self.dir / name
            if path.exists() and path.stat().st_size:
                parts.append(f"--- tail of {path}:\n{_tail(path)}")
        return LibvirtHostError("\n".join(parts))

    # --- use -----------------------------------------------------------------------------

    def connect(self) -> libvirt.virConnect:
        """A read-write libvirt connection to this host; the caller closes it."""
        import libvirt

        return libvirt.open(self.uri)

    # --- stop ----------------------------------------------------------------------------

    def stop(self, timeout_s: float = HOST_STOP_TIMEOUT_S) -> None:
        """Destroy every running domain, stop the daemons, kill any QEMU left; idempotent.

        Raises LibvirtHostError if a process of the host survives SIGKILL.
        """
        if "libvirtd" in self.pids:
            self._destroy_domains(timeout_s)
        if self._init is not None:
            if self._init.poll() is None:
                self._init.terminate()  # stops libvirtd, virtlogd, then kills the rest
                try:
                    self._init.wait(len(DAEMONS) * timeout_s + 5)
                except subprocess.TimeoutExpired:
                    self._init.kill()
                    self._init.wait()
            self._init = None
        # Last resort: QEMUs libvirt did not destroy, daemons of a killed init.
        left = _kill({*self.qemu_pids(), *self.processes()}, timeout_s)
        if left:
            raise LibvirtHostError(f"host {self.name}: processes {left} survive SIGKILL")

    def restart_libvirtd(self, timeout_s: float = HOST_START_TIMEOUT_S) -> None:
        """Restart libvirtd alone (SIGTERM, then started again by the host's init), as
        `systemctl restart libvirtd` after an update: running guests keep running and the
        new libvirtd reconnects to their QEMUs."""
        if self._init is None or self._init.poll() is not None:
            raise LibvirtHostError(f"host {self.name} is not running")
        old = self.pids.get("libvirtd")
        os.kill(self._init.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = self._reported()[0].get("libvirtd")
            if new not in (None, old) and self.socket.exists() and self._answers(deadline):
                return
            time.sleep(POLL_PERIOD_S)
        raise self._failure("libvirtd restart")

    def crash(self) -> None:
        """Power loss: SIGKILL every process of the host at once, guests included. Domain
        state stays as a killed host leaves it (stale run/, persistent definitions)."""
        left = _kill(self.processes(), HOST_STOP_TIMEOUT_S)
        if self._init is not None:
            self._init.wait()
            self._init = None
        if left:
            raise LibvirtHostError(f"host {self.name}: processes {left} survive SIGKILL")

    def _destroy_domains(self, timeout_s: float) -> None:
        """Destroy the running domains through libvirt, in a thread: a wedged libvirtd may
        accept the connection and never answer, and libvirt's client calls have no timeout.
        Whatever fails here, the init's stop and the sweeps in stop() catch the QEMUs."""

        def destroy_all() -> None:
            import libvirt

            with suppress(libvirt.libvirtError):
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                        with suppress(libvirt.libvirtError):  # it may have shut off meanwhile
                            dom.destroy()
                finally:
                    conn.close()

        worker = threading.Thread(target=destroy_all, name=f"destroy-{self.name}", daemon=True)
        worker.start()
        worker.join(timeout_s)

    def __enter__(self) -> LibvirtHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def hosts(
    base_dir: Path,
    names: Iterable[str],
    timeout_s: float = HOST_START_TIMEOUT_S,
    caps_cache: Path | None = DEFAULT_CAPS_CACHE,
    netns: dict[str, str] | None = None,
) -> Iterator[dict[str, LibvirtHost]]:
    """Start one LibvirtHost per name under BASE_DIR, in order; always stop all of them.
    NETNS maps a host name to its network namespace; hosts not in it share ours.

    Started one after the other, so a cold capabilities cache is probed only once.
    """
    started: dict[str, LibvirtHost] = {}
    try:
        for name in names:
            host = LibvirtHost(name, base_dir, caps_cache, (netns or {}).get(name))
            started[name] = host
            host.start(timeout_s)
        yield started
    except BaseException as exc:
        for error in _stop_all(started.values()):
            exc.add_note(f"while stopping hosts: {error}")
        raise
    else:
        errors = _stop_all(started.values())
        if errors:
            raise LibvirtHostError("; ".join(errors))


def _stop_all(started: Iterable[LibvirtHost]) -> list[str]:
    errors = []
    for host in reversed(list(started)):
        try:
            host.stop()
        except Exception as exc:
            errors.append(f"{host.name}: {exc}")
    return errors


# --- the host's init: runs inside the new mount namespace ----------------------------------


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave a blocking waitpid()."""


class _Restart(Exception):
    """Raised by the SIGUSR1 handler: restart libvirtd (restart_libvirtd)."""


def _init_main(run_dir: Path, mounts: list[str]) -> int:
    """Bind-mount, become a subreaper, run virtlogd then libvirtd, reap all; stop on SIGTERM.

    Reports on stdout, one line each: `started DAEMON PID`, `exited DAEMON STATUS`.
    Stays up (reaping, e.g. guests whose libvirtd died) until SIGTERM or no child is left.
    """

    def on_term(signum: int, frame: object) -> None:
        raise _Stop

    def on_usr1(signum: int, frame: object) -> None:
        raise _Restart

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    daemons: dict[int, str] = {}  # live daemon PID -> name

    def report(*words: object) -> None:
        print(*words, flush=True)

    def reaped(pid: int, status: int) -> None:
        if pid in daemons:
            report("exited", daemons.pop(pid), os.waitstatus_to_exitcode(status))

    def reap(block: bool) -> bool:
        """Reap one child if any; False when there is no child left at all."""
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return False
        if pid:
            reaped(pid, status)
        return True

    def spawn(name: str, *args: str) -> int:
        pid = os.posix_spawnp(name, [name, *args], os.environ)
        daemons[pid] = name
        report("started", name, pid)
        return pid

    def stop(pid: int, timeout_s: float) -> None:
        if pid not in daemons:
            return
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid in daemons and time.monotonic() < deadline:
            if not reap(block=False):
                return
            time.sleep(POLL_PERIOD_S)
        if pid in daemons:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    try:
        for src, dst in zip(mounts[::2], mounts[1::2], strict=True):
            os.makedirs(dst, exist_ok=True)
            done = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True)
            if done.returncode:
                print(f"mount --bind {src} {dst}: {done.stderr.strip()}", file=sys.stderr)
                return INIT_MOUNT_FAILED
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}",
                  file=sys.stderr)  # fmt: skip
        virtlogd = spawn("virtlogd", "--pid-file", str(run_dir / "virtlogd.pid"))
        while not (run_dir / "virtlogd-sock").exists():
            reap(block=False)
            if virtlogd not in daemons:
                return 1
            time.sleep(POLL_PERIOD_S)
        spawn("libvirtd", "--pid-file", str(run_dir / "libvirtd.pid"))
        while True:
            try:
                while reap(block=True):
                    pass
                return 0
            except _Restart:  # libvirtd alone, as `systemctl restart libvirtd`: QEMUs stay
                for pid in [p for p, n in daemons.items() if n == "libvirtd"]:
                    stop(pid, HOST_STOP_TIMEOUT_S)
                spawn("libvirtd", "--pid-file", str(run_dir / "libvirtd.pid"))
    except _Stop:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
        for pid, _name in sorted(daemons.items(), key=lambda item: -DAEMONS.index(item[1])):
            stop(pid, HOST_STOP_TIMEOUT_S)
        # Whatever is left is ours (adopted QEMUs): kill it and reap until no child is left.
        for entry in os.scandir("/proc"):
            with suppress(OSError, ValueError):
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == os.getpid():
                    os.kill(int(entry.name), signal.SIGKILL)
        while reap(block=True):
            pass
    return 0


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--init":
    sys.exit(_init_main(Path(sys.argv[2]), sys.argv[3:]))
