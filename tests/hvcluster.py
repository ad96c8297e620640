"""hvctl on top of a tests.cluster.Cluster: the same resources, nodes and ports, plus a libvirt
URI per node, an [hvctl] table and guests, in one more file next to the nodes' configs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import NODES, REPO, Cluster

HVCTL_TIMEOUT_S = 180.0


def hv_config(c: Cluster, libvirt: dict[str, str], guests: str, hvctl: str = "",
              name: str = "hvctl.toml") -> Path:
    """Write c.dir/NAME: alpha's cluster file with `libvirt = URI` for the nodes in LIBVIRT,
    an [hvctl] table (HVCTL, state_dir under c.dir) and the GUESTS tables."""
    text = c.configs["alpha"].read_text()
    for node in NODES:
        if node in libvirt:
            header = f"[node.{node}.disk]"
            assert header in text, text
            text = text.replace(header, f'libvirt = "{libvirt[node]}"\n{header}')
    path = c.dir / name
    path.write_text(f'[hvctl]\nstate_dir = "hvctl-state"\n{hvctl}\n{text}\n{guests}\n')
    return path


def hvctl(config: Path, *args: str, check: bool = True,
          timeout_s: float = HVCTL_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `python -m hvctl --config CONFIG ARGS`."""
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "hvctl", "--config", str(config), *args],
                         capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
    res.duration_s = time.monotonic() - started  # type: ignore[attr-defined]
    if check and res.returncode != 0:
        raise AssertionError(f"hvctl {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr}{res.stdout}")
    return res


def hvctl_json(config: Path, *args: str) -> dict:
    return json.loads(hvctl(config, *args, "--json").stdout)


def role(c: Cluster, node: str) -> str:
    return c.res(node)["role"]


class LoopRunner:
    """One asyncio loop for every in-process hvctl test: libvirt takes one event loop
    implementation per process (hvctl/virt.py), so all in-process controllers share it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro):  # noqa: ANN001, ANN201 -- any coroutine, its result
        return self.loop.run_until_complete(coro)


_SHARED: LoopRunner | None = None


def shared_loop() -> LoopRunner:
    """The one LoopRunner of this test process (every module that runs hvctl in-process)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = LoopRunner()
    return _SHARED
