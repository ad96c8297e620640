"""Shared fixtures: real `rblock serve` processes, stopped by PID at teardown.

`rblock serve` prints one `nbd://` (or `nbd+unix://`) URI per export on stdout, then a line
`ready`; the fixture waits for that line, so a test starts only once the server listens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.procs import stop_by_pid

REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 20.0
SERVER_STOP_TIMEOUT_S = 20.0


@dataclass
class Server:
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    uris: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server by PID and wait; returns its exit status."""
        return stop_by_pid(self.proc, sig, SERVER_STOP_TIMEOUT_S)[0]


def start_server(args: list[str], workdir: Path, env: dict | None = None) -> Server:
    """Start `python -m rblock serve ARGS` and wait until it prints `ready`."""
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("serve-*.out")))
    out = workdir / f"serve-{n}.out"
    err = workdir / f"serve-{n}.err"
    if not any(a.startswith("--listen") or a.startswith("--socket") for a in args):
        args = [*args, "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rblock", "serve", *args],
        stdout=out.open("wb"), stderr=err.open("wb"), cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    server = Server(proc, out, err)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = out.read_text(errors="replace").splitlines()
        if "ready" in lines:
            server.uris = [ln for ln in lines if ln.startswith("nbd")]
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"rblock serve exited {proc.returncode}: {err.read_text()}")
        time.sleep(0.02)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"rblock serve did not become ready: {err.read_text()}")


@pytest.fixture
def rblock_serve(tmp_path):
    """Factory: rblock_serve(*args) -> Server. Every server is stopped at teardown."""
    servers: list[Server] = []

    def start(*args: str, env: dict | None = None) -> Server:
        s = start_server([str(a) for a in args], tmp_path / "servers", env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def make_image(path: Path, size: int, random_data: bool = False) -> Path:
    """A sparse image of SIZE bytes, or one full of random bytes."""
    with open(path, "wb") as f:
        if random_data:
            chunk_bytes = 1 << 20
            left = size
            while left:
                n = min(chunk_bytes, left)
                f.write(os.urandom(n))
                left -= n
        else:
            f.truncate(size)
    return path


@pytest.fixture
def image(tmp_path):
    """A 64 MiB sparse image."""
    return make_image(tmp_path / "disk.img", 64 << 20)


@pytest.fixture
def cluster(tmp_path):
    """Factory: cluster(**kw) -> tests.cluster.Cluster; every node stopped at teardown."""
    from tests.cluster import Cluster

    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()
