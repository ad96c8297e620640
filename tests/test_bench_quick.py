"""The benchmark's smoke test: `benchmarks/run.py --quick` runs every server with every job
(0.3 s fio runs on 32 MiB images) and must produce every row of its table with a number.
No timing is asserted. About 40-60 s on a 2-core machine.

Needs fio, nbdinfo, qemu-nbd, nbdkit with its python plugin, and root for the network
namespaces of rblock-c-netns (`make venv` installs the packages); where one is missing the
test skips, except under CI=true, where it fails naming what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.cluster import REPO

pytestmark = pytest.mark.slow

RUN_PY = REPO / "benchmarks" / "run.py"
QUICK_TIMEOUT_S = 300.0  # about 40-60 s; a loaded machine takes longer, never this long


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_produces_every_row(tmp_path):
    run = load_run()
    servers = list(run.DEFAULT_SERVERS)
    jobs = [job.name for job in run.JOBS]
    missing = run.missing_tools(servers)
    if missing:
        message = "benchmark rows cannot run: " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (make venv installs the packages)")
        pytest.skip(message)
    out = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, str(RUN_PY), "--quick", "--json", str(out),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=REPO, timeout=QUICK_TIMEOUT_S)
    report = f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    summary = {(s["job"], s["server"]): s for s in json.loads(out.read_text())["summary"]}
    for job in jobs:
        for server in servers:
            row = summary.get((job, server))
            assert row is not None, f"no row {job} {server}\n{report}"
            assert row["runs_ok"] == 1 and row["iops"] > 0 and row["bw_bytes"] > 0, (row, report)
            # ... and the printed table has it, with its IOPS as a number
            line = re.compile(rf"^{re.escape(job)}\s+{re.escape(server)}\s+(\d+)\s+[\d.]+\s",
                              re.MULTILINE)
            match = line.search(done.stdout)
            assert match and int(match[1]) > 0, f"table row {job} {server} missing\n{report}"
