"""One etcd member on loopback, for the demo and the benchmarks (tests/etcd_cluster.py runs
clusters of them for the tests, with the same health probe)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

PROBE_INTERVAL_S = 0.05
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def member_argv(name: str, data_dir: Path) -> tuple[list[str], str]:
    """The command line of a one-member etcd cluster on free loopback ports, and its
    client URL."""
    url = f"http://127.0.0.1:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    return (["etcd", "--name", name, "--data-dir", str(data_dir),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{name}={peer}"], url)


def healthy(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether the member at URL answers /health with a leader (a quorum)."""
    try:
        if context is not None:
            r = urllib.request.urlopen(f"{url}/health", timeout=1, context=context)
        else:
            r = _NO_PROXY.open(f"{url}/health", timeout=1)
        with r:
            return json.load(r).get("health") == "true"
    except (OSError, ValueError):
        return False


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Wait until the member answers healthy; False if it exited or TIMEOUT_S passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if healthy(url):
            return True
        time.sleep(PROBE_INTERVAL_S)
    return False
