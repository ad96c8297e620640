"""A two-node rblock cluster on loopback for end-to-end tests: real `rblock up` processes.

    c = Cluster(tmp_path, size="64M", protocol="C")
    c.create_md(); c.up("alpha"); c.up("beta")
    c.wait(lambda: c.peer("alpha")["connection"] == "Connected")
    c.rblock("alpha", "primary", "r0", "--force")
    c.wait_synced()
    uri = c.nbd_uri("alpha")
    ...
    c.kill("alpha")            # SIGKILL by PID
    c.stop_all()               # SIGTERM every node still running, by PID

Peer-link TLS: `Cluster(..., tls={"alpha": TLSFiles(cert, key, ca), "beta": ...})` writes
`tls = true` and the nodes' files into the config file of each node that has an entry (a node
without one, or with None, gets a plain config, for mismatch tests).

Every node is stopped by PID when the test ends (the `cluster` fixture in conftest.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from rblock.control_client import in_sync
from tools.procs import stop_by_pid

REPO = Path(__file__).resolve().parent.parent
NODES = ("alpha", "beta")
UP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


class TLSFiles(NamedTuple):
    cert: Path
    key: Path
    ca: Path


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, workdir: Path, size: str = "64M", protocol: str = "C",
                 secret: str = "test-secret", extra_resource: str = "",
                 secrets: dict[str, str] | None = None,
                 tls: dict[str, TLSFiles | None] | None = None,
                 prelude: dict[str, str] | None = None, default_timeouts: bool = False):
        self.default_timeouts = default_timeouts  # the product's timeouts, not the tests'
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(6)
        self.ports = {
            "alpha": {"replication": ports[0], "control": ports[1], "nbd": ports[2]},
            "beta": {"replication": ports[3], "control": ports[4], "nbd": ports[5]},
        }
        self.configs: dict[str, Path] = {}
        for node in NODES:
            # One file per node so a test can give a node a different secret; otherwise equal.
            # PRELUDE: text before the tables, per node (a [cluster] table: its etcd view).
            text = (prelude or {}).get(node, "") + self._config_text(
                size, protocol, (secrets or {}).get(node, secret), extra_resource, tls or {},
                node)
            path = self.dir / f"cluster-{node}.toml"
            path.write_text(text)
            self.configs[node] = path
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {n: [] for n in NODES}

    def _config_text(self, size: str, protocol: str, secret: str, extra: str,
                     tls: dict[str, TLSFiles | None], reader: str) -> str:
        mine = tls.get(reader)
        if mine is not None:
            extra = f"tls = true\n{extra}"
        timeouts = ("" if self.default_timeouts else
                    'ping_interval_s = 0.5\npeer_timeout_s = 2.0\nconnect_retry_max_s = 1.0\n')
        lines = [f'[resource.r0]\nsize = "{size}"\nprotocol = "{protocol}"\n'
                 f'secret = "{secret}"\n{timeouts}resync_rate = "400M"\n{extra}\n']
        for node in NODES:
            p = self.ports[node]
            files = ""
            if mine is not None:
                # Only `reader` reads this file, and only its own files: a peer without TLS
                # files of its own gets the reader's, to keep the file valid.
                f = tls.get(node) or mine
                files = f'tls_cert = "{f.cert}"\ntls_key = "{f.key}"\ntls_ca = "{f.ca}"\n'
            lines.append(f'[node.{node}]\nreplication = "127.0.0.1:{p["replication"]}"\n'
                         f'control = "127.0.0.1:{p["control"]}"\nnbd = "127.0.0.1:{p["nbd"]}"\n'
                         f'{files}[node.{node}.disk]\nr0 = "{node}/r0.img"\n')
        return "\n".join(lines)

    # --- files -------------------------------------------------------------------------

    def disk(self, node: str) -> Path:
        return self.dir / node / "r0.img"

    def meta(self, node: str) -> Path:
        return self.dir / node / "r0.img.meta"

    # --- commands ------------------------------------------------------------------------

    def rblock(self, node: str, *args: str, check: bool = True,
               timeout_s: float = 60) -> subprocess.CompletedProcess:
        """Run `rblock CMD --config ... --node NODE ARGS` (CMD = args[0])."""
        cmd = [sys.executable, "-m", "rblock", args[0], "--config", str(self.configs[node]),
               "--node", node, *args[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} on {node} failed ({res.returncode}): "
                                 f"{res.stderr}{res.stdout}")
        return res

    def create_md(self, *nodes: str) -> None:
        for node in nodes or NODES:
            self.rblock(node, "create-md")

    def up(self, node: str) -> subprocess.Popen:
        n = len(self.logs[node])
        out = self.dir / f"{node}-{n}.out"
        err = self.dir / f"{node}-{n}.log"
        self.logs[node].append(err)
        proc = subprocess.Popen(
            # -X faulthandler: a node stuck at start is made to show where (SIGABRT below).
            [sys.executable, "-X", "faulthandler", "-m", "rblock", "up", "--config",
             str(self.configs[node]), "--node", node], stdout=out.open("wb"),
            stderr=err.open("wb"), cwd=REPO)
        self.procs[node] = proc
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            if "ready" in out.read_text().splitlines():
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"rblock up {node} exited {proc.returncode}: "
                                     f"{err.read_text()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise AssertionError(f"rblock up {node} not ready after {UP_TIMEOUT_S:g}s (its stacks "
                             f"at SIGABRT below): {err.read_text()}")

    def log(self, node: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs[node])

    def kill(self, node: str, sig: int = signal.SIGKILL) -> int:
        status, killed = stop_by_pid(self.procs.pop(node), sig, STOP_TIMEOUT_S)
        if killed:
            raise AssertionError(f"{node} did not stop within {STOP_TIMEOUT_S}s of signal "
                                 f"{sig}")
        return status

    def stop(self, node: str) -> int:
        return self.kill(node, signal.SIGTERM)

    def stop_all(self) -> None:
        for node in list(self.procs):
            try:
                self.stop(node)
            except AssertionError:
                pass

    # --- state -----------------------------------------------------------------------------

    def status(self, node: str) -> dict:
        return json.loads(self.rblock(node, "status", "--json").stdout)

    def res(self, node: str) -> dict:
        return self.status(node)["resources"][0]

    def peer(self, node: str) -> dict:
        return self.res(node)["peers"][0]

    def nbd_uri(self, node: str) -> str:
        return f"nbd://127.0.0.1:{self.ports[node]['nbd']}/r0"

    def wait(self, cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (AssertionError, KeyError, json.JSONDecodeError) as e:
                last = e
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or cond}: {last}\n--- alpha ---\n"
                             f"{self.log('alpha')[-3000:]}\n--- beta ---\n"
                             f"{self.log('beta')[-3000:]}")

    def wait_synced(self, timeout_s: float = 60.0) -> None:
        """Both nodes Connected, Established, UpToDate, nothing out of sync."""
        self.wait(lambda: all(in_sync(self.res(node)) for node in NODES), timeout_s,
                  "both nodes in sync")

    def start_fresh(self, primary: str = "alpha") -> None:
        """create-md, up both, force the first promotion on PRIMARY, wait for the full sync."""
        self.create_md()
        for node in NODES:
            self.up(node)
        self.wait(lambda: self.peer(primary)["connection"] == "Connected", what="connected")
        self.rblock(primary, "primary", "r0", "--force")
        self.wait_synced()

    def files_identical(self) -> bool:
        return _same_file(self.disk("alpha"), self.disk("beta"))


def _same_file(a: Path, b: Path) -> bool:
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
