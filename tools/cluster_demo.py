"""A two-node rblock cluster on localhost for the demo and its later stages.

    from tools.cluster_demo import cluster
    with cluster(Path("build/demo/cluster")) as c:       # a fresh copy of two-nodes.toml
        c.create_md()
        c.up("alpha"); c.up("beta")                       # real `rblock up` processes
        c.rblock("alpha", "primary", "r0", "--force")     # prints the command and its output
        c.wait_synced()
        c.config_path, c.procs["alpha"].pid, c.nbd_uri("alpha"), c.disk("beta")
    # leaving the block stops every node this started, by PID: SIGTERM, then SIGKILL

The config is examples/two-nodes.toml copied into the directory (its relative disk paths then
land there too). If any of the example's six ports is taken, all six are replaced by free
ones, so the demo runs next to a README walkthrough or another copy of itself. Stages share
one `DemoCluster`: whatever a stage leaves running, the next one finds (a libvirt guest on
the primary's export, say). `keep()` leaves the nodes running after the block, for a user who
wants to go on by hand; the PIDs are printed.

Also here, for every stage: `step(title)` prints a heading, `run(*cmd)` runs a command and
prints it the way a user would type it, with its output.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rblock import config as rconfig
from rblock.control_client import in_sync
from rblock.units import format_hostport
from tools.procs import stop_by_pid

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "two-nodes.toml"
NODES = ("alpha", "beta")
RESOURCE = "r0"
UP_TIMEOUT_S = 20.0  # `rblock up` to its "ready" line
STOP_TIMEOUT_S = 20.0  # SIGTERM to exit; then SIGKILL
WAIT_POLL_S = 0.1
CONTROL_TIMEOUT_S = 5.0

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


# --- printing -----------------------------------------------------------------------------------


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def shown(arg: str | Path) -> str:
    """A path under the repository relative to it, so commands read as typed from there."""
    text = str(arg)
    prefix = str(REPO) + os.sep
    return text.replace(prefix, "") if prefix in text else text


def run(*cmd: str | Path, check: bool = True, show_as: list[str] | None = None,
        timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Run CMD, print `$ CMD` and its output; a failure (when `check`) ends the demo."""
    argv = [str(a) for a in cmd]
    print("$ " + shlex.join(show_as or [shown(a) for a in argv]), flush=True)
    res = subprocess.run(argv, capture_output=True, text=True, errors="replace", cwd=REPO,
                         timeout=timeout_s)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and res.returncode:
        raise SystemExit(f"{shown(argv[0])} failed with exit status {res.returncode}")
    return res


# --- the cluster ---------------------------------------------------------------------------------


class DemoCluster:
    def __init__(self, workdir: Path, prelude: str = ""):
        self.dir = workdir.resolve()
        self.config_path = self.dir / EXAMPLE.name
        self.procs: dict[str, subprocess.Popen] = {}
        self._kept = False
        if self.dir.exists():
            shutil.rmtree(self.dir)  # fresh disks and metadata every run
        self.dir.mkdir(parents=True)
        # PRELUDE: text before the example's tables (a [cluster] table, say).
        self.config_path.write_text(prelude + _with_free_ports(EXAMPLE.read_text()))
        self.cfg = rconfig.load(self.config_path)

    # --- files and addresses ----------------------------------------------------------------

    def disk(self, node: str) -> Path:
        return self.cfg.node(node).disks[RESOURCE]

    def log_path(self, node: str) -> Path:
        return self.dir / f"{node}.log"

    def log(self, node: str) -> str:
        path = self.log_path(node)
        return path.read_text(errors="replace") if path.exists() else ""

    def nbd_uri(self, node: str) -> str:
        a = self.cfg.node(node).nbd
        return f"nbd://{format_hostport(a.host, a.port)}/{RESOURCE}"

    # --- commands -------------------------------------------------------------------------------

    def rblock(self, node: str, *args: str, check: bool = True,
               quiet: bool = False) -> subprocess.CompletedProcess:
        """`rblock CMD --config FILE --node NODE ARGS...`, printed as a user types it."""
        cmd, rest = args[0], list(args[1:])
        argv = [sys.executable, "-m", "rblock", cmd, "--config", str(self.config_path),
                "--node", node, *rest]
        if quiet:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=check)
        return run(*argv, check=check, show_as=["rblock", cmd, "--config",
                                                 shown(self.config_path), "--node", node,
                                                 *rest])

    def create_md(self) -> None:
        for node in NODES:
            self.rblock(node, "create-md")

    def up(self, node: str) -> subprocess.Popen:
        """Start `rblock up` for NODE in the background and wait for its "ready" line."""
        assert node not in self.procs, f"{node} is already running"
        out = self.dir / f"{node}.out"
        argv = [sys.executable, "-m", "rblock", "up", "--config", str(self.config_path),
                "--node", node]
        with out.open("wb") as o, self.log_path(node).open("ab") as e:
            proc = subprocess.Popen(argv, stdout=o, stderr=e, cwd=REPO)
        self.procs[node] = proc  # recorded first: a Ctrl-C from here on still stops it
        print(f"$ rblock up --config {shown(self.config_path)} --node {node} "
              f"2>{shown(self.log_path(node))} &    # pid {proc.pid}", flush=True)
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            if "ready" in out.read_text().splitlines():
                return proc
            if proc.poll() is not None:
                del self.procs[node]
                raise SystemExit(f"rblock up {node} exited {proc.returncode}:\n{self.log(node)}")
            time.sleep(0.02)
        raise SystemExit(f"rblock up {node} not ready after {UP_TIMEOUT_S:.0f}s:\n"
                         f"{self.log(node)}")

    def stop(self, node: str, sig: int = signal.SIGTERM) -> int:
        """Signal NODE's process by PID and wait for it (SIGKILL after STOP_TIMEOUT_S)."""
        proc = self.procs.pop(node)
        status, killed = stop_by_pid(proc, sig, STOP_TIMEOUT_S)
        if killed:
            print(f"{node} (pid {proc.pid}) ignored signal {sig} for {STOP_TIMEOUT_S:.0f}s: "
                  "killed", file=sys.stderr)
        return status

    def stop_all(self) -> dict[str, int]:
        return {node: self.stop(node) for node in list(self.procs)}

    def keep(self) -> None:
        """Leave the nodes running when the `with cluster(...)` block ends."""
        self._kept = True

    # --- state ----------------------------------------------------------------------------------

    def status(self, node: str) -> dict:
        """`rblock status --json` of NODE, straight from its control API (no Python start)."""
        a = self.cfg.node(node).control
        if a.unix_path is not None:
            return json.loads(self.rblock(node, "status", "--json", quiet=True).stdout)
        url = f"http://{format_hostport(a.host, a.port)}/v1/status"
        with _NO_PROXY.open(url, timeout=CONTROL_TIMEOUT_S) as r:
            return json.loads(r.read())

    def res(self, node: str) -> dict:
        return self.status(node)["resources"][0]

    def peer(self, node: str) -> dict:
        return self.res(node)["peers"][0]

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (OSError, KeyError, IndexError, json.JSONDecodeError):
                pass  # a node still starting or stopping: ask again
            time.sleep(WAIT_POLL_S)
        tails = "\n".join(f"--- {n} ---\n{self.log(n)[-2000:]}" for n in NODES)
        raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")

    def wait_connected(self) -> None:
        self.wait(lambda: all(self.peer(n)["connection"] == "Connected" for n in NODES),
                  "both nodes Connected")

    def wait_synced(self, timeout_s: float = 60.0) -> None:
        self.wait(lambda: all(in_sync(self.res(node)) for node in NODES),
                  "both nodes UpToDate, nothing out of sync", timeout_s)


@contextmanager
def cluster(workdir: Path, prelude: str = "") -> Iterator[DemoCluster]:
    """A fresh DemoCluster in WORKDIR; its nodes are stopped by PID when the block ends,
    however it ends (an error, SystemExit, Ctrl-C), unless `keep()` was called."""
    c = DemoCluster(workdir, prelude)
    try:
        yield c
    finally:
        if c._kept and c.procs:
            print("nodes left running: " + ", ".join(
                f"{n} (pid {p.pid})" for n, p in c.procs.items())
                + f"; stop them with: kill {' '.join(str(p.pid) for p in c.procs.values())}")
        else:
            c.stop_all()


# --- ports -----------------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _with_free_ports(text: str) -> str:
    """The example's text, its six addresses moved to free ports if any of them is taken."""
    cfg_ports = []
    for line in text.splitlines():
        head = line.split("#", 1)[0]
        for key in ("replication", "control", "nbd"):
            if head.strip().startswith(f"{key} =") and '"127.0.0.1:' in head:
                cfg_ports.append(int(head.split('"127.0.0.1:', 1)[1].split('"', 1)[0]))
    assert len(cfg_ports) == 3 * len(NODES), f"expected 6 addresses in {EXAMPLE}: {cfg_ports}"
    if all(_port_free("127.0.0.1", p) for p in cfg_ports):
        return text
    socks = []
    for _ in cfg_ports:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    free = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    for old, new in zip(cfg_ports, free, strict=True):
        needle = f'"127.0.0.1:{old}"'
        assert text.count(needle) == 1, needle
        text = text.replace(needle, f'"127.0.0.1:{new}"')
    print(f"(ports {', '.join(map(str, cfg_ports))} are not all free: using "
          f"{', '.join(map(str, free))})", flush=True)
    return text
