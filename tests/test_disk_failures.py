"""Failing disks, end to end (issue 8, "Disk failures"; DRBD's on-io-error detach).

A read or write error from a node's backing disk detaches it: disk Failed, then Diskless; the
node goes on serving through its peer, and the client is told nothing it would have to undo.
`rblock attach` after the disk is repaired brings it back with a resync. The faults are real
EIO from the fault-injection filter (`rblock inject-fault`, rblock/store/faults.py) under
fio with verify, and real ENOSPC from a backing file on a small tmpfs that fills up.

Regression tests for defects 1 (a secondary's failed write acknowledged, both UpToDate), 4
(a secondary's failed fdatasync hangs FLUSH and FUA) and 9 (a primary's failed local write
after the peer applied it: nothing marked, disk never detached).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import nbd
import pytest

from tests.test_replication_failures import (
    BLOCK,
    MiB,
    connect,
    fast_res,
    needs_fio,
)

FIO_RUNTIME_S = 6


def fio_verify(uri: str, workdir: Path, size: str = "32M", runtime_s: int = FIO_RUNTIME_S,
               *extra: str) -> subprocess.Popen:
    """fio writing at random and reading back what it wrote (verify_backlog: every 256 writes
    are read back and checked while the job runs), for RUNTIME_S."""
    argv = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
            "--verify_backlog=256", "--verify_fatal=1", "--time_based",
            f"--runtime={runtime_s}", "--output-format=json", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=workdir)


def fio_done(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"fio exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["total_ios"] > 0, "fio verified nothing"
    return job


def disk_of(c, node: str) -> str:
    return fast_res(c, node)["disk"]


def peer_disk(c, node: str) -> str:
    return fast_res(c, node)["peers"][0]["disk"]


def attach_and_resync(c, node: str) -> None:
    out = c.rblock(node, "attach", "r0").stdout
    assert "r0:" in out, out
    c.wait_synced(timeout_s=90)
    assert c.files_identical(), "the disks differ after attach and resync"


# --- injected EIO -------------------------------------------------------------------------------


@needs_fio
@pytest.mark.parametrize("node,what", [("beta", "writes"), ("alpha", "writes"),
                                       ("alpha", "reads")])
def test_injected_disk_errors_detach_and_the_client_sees_none(cluster, tmp_path, node, what):
    """A disk that starts failing mid-workload, on the Secondary or the Primary: fio (with
    verify, so reads too) sees no error; the failing node goes Diskless and its peer shows it;
    on a Diskless Primary every read and write goes to the peer; `attach` resyncs."""
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    fio = fio_verify(c.nbd_uri("alpha"), tmp_path)
    try:
        out = c.rblock(node, "inject-fault", "r0", f"--{what}").stdout
        assert f"fails {what}" in out, out
        # Reads fail only when something reads: fio's verify does, within the run.
        c.wait(lambda: disk_of(c, node) == "Diskless", timeout_s=FIO_RUNTIME_S + 10,
               what=f"{node} detaches its failing disk")
        other = "beta" if node == "alpha" else "alpha"
        assert peer_disk(c, other) == "Diskless"
        assert disk_of(c, other) == "UpToDate"
    finally:
        job = fio_done(fio)
    assert job["write"]["total_ios"] > 1000, job["write"]
    text = c.rblock(node, "status").stdout
    assert "disk:Diskless" in text and "rblock attach r0" in text, text
    log = c.log(node)
    assert "detach" in log.lower(), log[-2000:]
    c.rblock(node, "inject-fault", "r0", "--clear")
    attach_and_resync(c, node)
    assert fast_res(c, "alpha")["role"] == "Primary"


@needs_fio
def test_failed_secondary_is_never_promoted_over_the_primary_data(cluster, tmp_path):
    """Defect 1: a Secondary whose writes fail made the Primary mark the block out of sync and
    acknowledge it, both UpToDate; after a Primary SIGKILL the stale Secondary was promoted
    without --force and the returning Primary resynced from it: acknowledged writes lost.
    Now the Secondary detaches and is recorded Outdated: not promotable without --force, and
    the returning Primary is the sync source."""
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    fio = fio_verify(c.nbd_uri("alpha"), tmp_path, "32M", 4)
    c.rblock("beta", "inject-fault", "r0", "--writes")
    try:
        c.wait(lambda: disk_of(c, "beta") == "Diskless", what="beta detaches")
    finally:
        fio_done(fio)
    # The primary's view: the peer has no disk; nothing the client was told is only on beta.
    assert peer_disk(c, "alpha") == "Diskless"
    c.kill("alpha")
    refused = c.rblock("beta", "primary", "r0", check=False)
    assert refused.returncode != 0, refused.stdout
    # The disk repaired, beta attaches alone: it is Outdated, and still refused.
    c.rblock("beta", "inject-fault", "r0", "--clear")
    c.rblock("beta", "attach", "r0")
    assert disk_of(c, "beta") == "Outdated", fast_res(c, "beta")
    refused = c.rblock("beta", "primary", "r0", check=False)
    assert refused.returncode != 0 and "Outdated" in refused.stderr, refused.stderr
    c.up("alpha")
    c.wait_synced(timeout_s=90)
    assert c.files_identical()
    assert "SyncSource" in c.log("alpha") or "sync source" in c.log("alpha").lower(), \
        c.log("alpha")[-3000:]


def test_secondary_flush_errors_do_not_hang_flush_or_fua(cluster):
    """Defect 4: when the Secondary's fdatasync failed, FLUSH and FUA writes on the Primary
    never completed (no answer, no timeout). Now the Secondary detaches, answers, and the
    Primary's FLUSH and FUA complete: the data is durable on the Primary's own disk."""
    c = cluster(size="64M", protocol="C")
    c.start_fresh()
    c.rblock("beta", "inject-fault", "r0", "--flushes")
    h = connect(c.nbd_uri("alpha"))
    done: list[str] = []

    def io() -> None:
        try:
            h.pwrite(b"\x5a" * BLOCK, 0, nbd.CMD_FLAG_FUA)
            h.pwrite(b"\xa5" * BLOCK, BLOCK)
            h.flush()
            done.append("ok")
        except nbd.Error as e:
            done.append(f"error: {e}")

    t = threading.Thread(target=io, daemon=True)
    t.start()
    t.join(30)
    assert done == ["ok"], done or "FUA write / FLUSH still pending after 30 s"
    c.wait(lambda: disk_of(c, "beta") == "Diskless", what="beta detaches")
    assert disk_of(c, "alpha") == "UpToDate"
    h.shutdown()
    c.rblock("beta", "inject-fault", "r0", "--clear")
    attach_and_resync(c, "beta")


# --- real ENOSPC: a backing file on a small tmpfs ------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount points for small tmpfs file systems, unmounted at the end. Needs root (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def disk_on_tmpfs(c, node: str, mount, size: str) -> Path:
    """Put NODE's backing file on a tmpfs of SIZE, its metadata outside it (the metadata has
    its own disk here: the test is about the data disk filling up)."""
    where = mount(c.dir / node, size)
    for cfg in c.configs.values():
        text = cfg.read_text()
        text = text.replace(f'[node.{node}.disk]\nr0 = "{node}/r0.img"\n',
                            f'[node.{node}.disk]\nr0 = "{node}/r0.img"\n'
                            f'[node.{node}.meta]\nr0 = "{node}-meta/r0.meta"\n')
        cfg.write_text(text)
    (c.dir / f"{node}-meta").mkdir(exist_ok=True)
    return where


@needs_fio
@pytest.mark.parametrize("node", ["beta", "alpha"])
def test_backing_file_on_a_full_tmpfs(cluster, tmp_path, small_tmpfs, node):
    """A thin backing file whose file system fills up: writes fail with ENOSPC, the node
    detaches its disk, fio (with verify) sees no error; after the file system grows (the
    admin's fix), `attach` resyncs and the disks are identical."""
    c = cluster(size="64M", protocol="C")
    where = disk_on_tmpfs(c, node, small_tmpfs, "24M")
    c.start_fresh()
    assert os.statvfs(where).f_bfree * os.statvfs(where).f_frsize > 8 * MiB, \
        "the initial sync filled the tmpfs already"
    fio = fio_verify(c.nbd_uri("alpha"), tmp_path, "64M", FIO_RUNTIME_S)
    try:
        c.wait(lambda: disk_of(c, node) == "Diskless", timeout_s=FIO_RUNTIME_S + 15,
               what=f"{node}'s tmpfs fills up and it detaches")
    finally:
        fio_done(fio)
    assert "No space left" in c.log(node) or "ENOSPC" in c.log(node), c.log(node)[-3000:]
    subprocess.run(["mount", "-o", "remount,size=80M", str(where)], check=True)
    attach_and_resync(c, node)
