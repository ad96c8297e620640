"""Operating a two-node rblock cluster: status, role changes, verify, invalidate, split brain,
events, clean stop, CLI errors. Real `rblock up` processes on loopback (tests/cluster.py);
every command goes through the real CLI.

Failure cases of the link itself (kill -9, cuts, corrupt frames, wrong secret) are in
test_replication_failures.py.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.cluster import REPO

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.slow

MIB = 1 << 20
BLOCK = 4096
CHUNK = 1 * MIB

RESOURCE_KEYS = {"name", "role", "disk", "size_bytes", "nbd", "peers"}
PEER_KEYS = {"node", "connection", "replication", "disk", "out_of_sync_bytes", "sync_percent",
             "sync_rate_bytes_per_s", "eta_s", "sent_bytes", "received_bytes"}


# --- helpers ---------------------------------------------------------------------------------


def api_status(c, node: str) -> dict:
    """The control API's status, straight over HTTP: fast enough to poll a running resync
    (the CLI costs a Python start per call)."""
    port = c.ports[node]["control"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
        return json.loads(resp.read())


def connect(c, node: str):
    h = nbd.NBD()
    h.connect_uri(c.nbd_uri(node))
    return h


def write_through(c, node: str, offset: int, data: bytes) -> None:
    """Write DATA at OFFSET through NODE's NBD export, flush, disconnect cleanly."""
    h = connect(c, node)
    for pos in range(0, len(data), CHUNK):
        h.pwrite(data[pos:pos + CHUNK], offset + pos)
    h.flush()
    h.shutdown()


def read_through(c, node: str, offset: int, length: int) -> bytes:
    h = connect(c, node)
    out = b"".join(h.pread(min(CHUNK, length - pos), offset + pos)
                   for pos in range(0, length, CHUNK))
    h.shutdown()
    return out


def read_file(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def corrupt_block(path, offset: int) -> bytes:
    """Overwrite one block of a backing file behind the daemon's back; returns the junk."""
    junk = os.urandom(BLOCK)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, junk, offset) == BLOCK
        os.fsync(fd)
    finally:
        os.close(fd)
    return junk


def refusal(c, node: str) -> tuple[str, str]:
    """Try to open NODE's export; it must be refused. Returns (libnbd error, server message
    from the NBD_REP_ERR reply, as libnbd logs it in debug mode)."""
    msgs: list[str] = []
    h = nbd.NBD()
    h.set_debug_callback(lambda _ctx, msg: msgs.append(msg))
    h.set_debug(True)
    try:
        with pytest.raises(nbd.Error) as ei:
            h.connect_uri(c.nbd_uri(node))
    finally:
        h.set_debug(False)
        del h  # libnbd's Python handle closes when collected
    server = [m.split("server error message:", 1)[1].strip() for m in msgs
              if "server error message:" in m]
    return str(ei.value), " | ".join(server)


def fail(c, node: str, *args: str, code: int = 1) -> subprocess.CompletedProcess:
    """Run a CLI command that must be refused: exit CODE (1 refused or failed, 2 usage or
    config: rblock/cli.py), the message on stderr."""
    res = c.rblock(node, *args, check=False)
    assert res.returncode == code, (args, res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith("rblock: "), res.stderr
    return res


def events_proc(c, node: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rblock", "events", "--config", str(c.configs[node]), "--node",
         node, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_subscribed(proc: subprocess.Popen, port: int, timeout_s: float = 15.0) -> None:
    """Wait until PROC holds an established TCP connection to PORT (the control API); the
    subscription is made when the server answers, so allow a moment more."""
    inodes_want = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        inodes = set()
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                remote_port = int(cols[2].split(":")[1], 16)
                if cols[3] == "01" and remote_port == port and cols[9] in inodes:
                    inodes_want.add(cols[9])
        if inodes_want:
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise AssertionError("events subprocess never connected to the control API")


def reader(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def run() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=run, daemon=True).start()
    return q


def collect(q: queue.Queue, until, timeout_s: float = 10.0) -> list[str]:
    """Lines from Q until until(lines) is true or the time is up."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(lines):
        try:
            line = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            break
        lines.append(line)
    return lines


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


# --- 1. status -------------------------------------------------------------------------------


def _check_contract(st: dict, node: str, peer: str) -> tuple[dict, dict]:
    assert {"node", "resources"} <= set(st), st
    assert st["node"] == node
    assert len(st["resources"]) == 1
    r = st["resources"][0]
    assert RESOURCE_KEYS <= set(r), RESOURCE_KEYS - set(r)
    assert r["name"] == "r0"
    assert r["size_bytes"] == 64 * MIB
    assert len(r["peers"]) == 1
    p = r["peers"][0]
    assert PEER_KEYS <= set(p), PEER_KEYS - set(p)
    assert p["node"] == peer
    for k in ("out_of_sync_bytes", "sync_rate_bytes_per_s", "sent_bytes", "received_bytes"):
        assert isinstance(p[k], int) and p[k] >= 0, (k, p[k])
    assert isinstance(p["sync_percent"], int | float) and 0 <= p["sync_percent"] <= 100
    assert p["eta_s"] is None or p["eta_s"] >= 0
    return r, p


def test_status_contract_and_resync_progress(cluster):
    c = cluster(size="64M", protocol="C")
    c.start_fresh()

    ra, pa = _check_contract(c.status("alpha"), "alpha", "beta")
    assert (ra["role"], ra["disk"]) == ("Primary", "UpToDate")
    assert ra["nbd"] == c.nbd_uri("alpha")
    assert (pa["connection"], pa["replication"], pa["disk"]) == (
        "Connected", "Established", "UpToDate")
    assert pa["out_of_sync_bytes"] == 0 and pa["sync_percent"] == 100
    assert pa["sent_bytes"] > 0 and pa["received_bytes"] > 0  # the full sync went over it
    rb, pb = _check_contract(c.status("beta"), "beta", "alpha")
    assert (rb["role"], rb["disk"], rb["nbd"]) == ("Secondary", "UpToDate", None)
    assert (pb["connection"], pb["replication"], pb["disk"]) == (
        "Connected", "Established", "UpToDate")
    assert pb["out_of_sync_bytes"] == 0

    text = c.rblock("alpha", "status").stdout
    for word in ("r0", "Primary", "UpToDate", "Connected", "Established", "beta",
                 c.nbd_uri("alpha")):
        assert word in text, (word, text)
    text = c.rblock("beta", "status").stdout
    for word in ("r0", "Secondary", "UpToDate", "Connected", "Established", "alpha"):
        assert word in text, (word, text)

    # Make a resync: beta away while alpha takes 48 MiB of random data.
    assert c.stop("beta") == 0
    c.wait(lambda: c.peer("alpha")["connection"] == "Connecting", what="alpha sees beta gone")
    data = os.urandom(48 * MIB)
    write_through(c, "alpha", 8 * MIB, data)
    pa = c.peer("alpha")
    assert pa["out_of_sync_bytes"] == 48 * MIB, pa
    assert c.res("alpha")["nbd"] == c.nbd_uri("alpha")
    text = c.rblock("alpha", "status").stdout
    assert "out-of-sync:48.0MiB" in text, text

    samples: dict[str, list[dict]] = {"alpha": [], "beta": []}
    stop = threading.Event()

    def poll(node: str) -> None:
        while not stop.is_set():
            try:
                p = api_status(c, node)["resources"][0]["peers"][0]
            except OSError:  # beta not listening yet
                time.sleep(0.01)
                continue
            samples[node].append(p)
            time.sleep(0.01)

    threads = [threading.Thread(target=poll, args=(n,), daemon=True) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    try:
        c.up("beta")
        c.wait_synced()
    finally:
        stop.set()
        for t in threads:
            t.join(10)

    during = {n: [p for p in samples[n] if p["replication"] in ("SyncSource", "SyncTarget")]
              for n in samples}
    assert all(p["replication"] == "SyncSource" for p in during["alpha"])
    assert all(p["replication"] == "SyncTarget" for p in during["beta"])
    for n in during:
        for p in during[n]:
            assert 0 <= p["sync_percent"] <= 100, p
            assert 0 <= p["out_of_sync_bytes"] <= 48 * MIB, p
        oos = [p["out_of_sync_bytes"] for p in during[n]]
        assert oos == sorted(oos, reverse=True), (n, oos)  # never grows during the resync
        pct = [p["sync_percent"] for p in during[n]]
        assert pct == sorted(pct), (n, pct)
    # At least one side was seen mid-resync (~0.15 s at 300 MiB/s; polled every ~10 ms).
    assert during["alpha"] or during["beta"], samples

    for node in ("alpha", "beta"):
        p = c.peer(node)
        assert p["out_of_sync_bytes"] == 0 and p["sync_percent"] == 100, p
        assert p["replication"] == "Established"
    assert "bitmap resync" in c.log("beta")
    assert c.files_identical()
    assert read_file(c.disk("beta"), 8 * MIB, 48 * MIB) == data

    # Both ends of a running resync report its rate (the contract's sync_rate_bytes_per_s
    # is per peer, on the source as on the target).
    for n in during:
        if len(during[n]) >= 3:
            rates = [p["sync_rate_bytes_per_s"] for p in during[n]]
            assert any(r > 0 for r in rates), (
                f"{n} reported sync_rate_bytes_per_s 0 in all {len(rates)} samples taken "
                f"while {during[n][0]['replication']}: {rates}")


# --- 2. refusals -----------------------------------------------------------------------------


def test_nbd_and_role_refusals(cluster):
    c = cluster(size="64M")
    c.start_fresh()

    # A client of the Secondary is refused; the server's message names the primary.
    err, server_msg = refusal(c, "beta")
    assert err  # libnbd's own words (ERR_POLICY: "server policy prevents NBD_OPT_GO")
    assert "Secondary on beta" in server_msg, server_msg
    assert "alpha" in server_msg and c.nbd_uri("alpha") in server_msg, server_msg
    res = subprocess.run(["nbdinfo", c.nbd_uri("beta")], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0, res.stdout

    # Promoting beta while alpha is Primary.
    res = fail(c, "beta", "primary", "r0")
    assert "alpha is Primary" in res.stderr, res.stderr
    res = fail(c, "beta", "primary", "r0", "--force")  # --force does not override this
    assert "alpha is Primary" in res.stderr, res.stderr
    assert c.res("beta")["role"] == "Secondary"

    # Demoting alpha under a connected client.
    h = connect(c, "alpha")
    h.pwrite(b"x" * BLOCK, 0)
    res = fail(c, "alpha", "secondary", "r0")
    assert "NBD client" in res.stderr, res.stderr
    assert c.res("alpha")["role"] == "Primary"
    assert h.pread(BLOCK, 0) == b"x" * BLOCK  # the client is unharmed

    res = c.rblock("alpha", "secondary", "r0", "--force")
    assert "demoted" in res.stdout
    assert c.res("alpha")["role"] == "Secondary"
    with pytest.raises(nbd.Error):
        h.pread(BLOCK, 0)
    del h
    err, server_msg = refusal(c, "alpha")
    assert "no connected node is Primary" in server_msg, server_msg
    c.wait(lambda: c.peer("beta")["role"] == "Secondary", what="beta sees alpha Secondary")
    c.wait_synced()
    assert c.files_identical()


# --- 3. orderly switch -----------------------------------------------------------------------


def test_orderly_role_switch(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    before = os.urandom(2 * MIB)
    write_through(c, "alpha", 0, before)

    c.rblock("alpha", "secondary", "r0")
    c.wait(lambda: c.peer("beta")["role"] == "Secondary", what="beta sees alpha Secondary")
    c.rblock("beta", "primary", "r0")
    rb = c.res("beta")
    assert (rb["role"], rb["disk"], rb["nbd"]) == ("Primary", "UpToDate", c.nbd_uri("beta"))
    ra = c.res("alpha")
    assert (ra["role"], ra["nbd"]) == ("Secondary", None)
    c.wait(lambda: c.peer("alpha")["role"] == "Primary", what="alpha sees beta Primary")

    assert read_through(c, "beta", 0, 2 * MIB) == before  # alpha's writes are all there
    after = os.urandom(3 * MIB)
    write_through(c, "beta", 5 * MIB, after)
    c.wait_synced()
    assert c.files_identical()
    assert read_file(c.disk("alpha"), 5 * MIB, 3 * MIB) == after
    assert c.peer("beta")["replication"] == "Established"  # no resync was needed

    _, server_msg = refusal(c, "alpha")
    assert "Secondary on alpha" in server_msg and "beta" in server_msg, server_msg
    assert c.nbd_uri("beta") in server_msg


# --- 4. verify -------------------------------------------------------------------------------


def test_verify_finds_one_corrupt_block_and_reconnect_repairs_it(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    data = os.urandom(16 * MIB)
    write_through(c, "alpha", 0, data)
    c.wait_synced()
    assert c.files_identical()

    corrupt_block(c.disk("beta"), 10 * BLOCK)
    assert not c.files_identical()
    assert c.peer("alpha")["out_of_sync_bytes"] == 0  # the daemon has not noticed

    res = c.rblock("alpha", "verify", "r0")
    assert "verify started" in res.stdout
    c.wait(lambda: c.peer("alpha")["replication"] == "Established", timeout_s=30,
           what="verify done on alpha")
    c.wait(lambda: "verify done" in c.log("alpha"), what="verify logged")
    assert "verify done: 1 blocks differ" in c.log("alpha")
    assert c.peer("alpha")["out_of_sync_bytes"] == BLOCK, c.peer("alpha")
    assert c.peer("beta")["out_of_sync_bytes"] == BLOCK, c.peer("beta")
    # Both sides of the verify go back to Established when it ends (checked at the end, so
    # the repair below is exercised either way).
    deadline = time.monotonic() + 5
    while c.peer("beta")["replication"] != "Established" and time.monotonic() < deadline:
        time.sleep(0.2)
    beta_after_verify = c.peer("beta")["replication"]

    c.rblock("alpha", "disconnect", "r0")
    c.wait(lambda: c.peer("alpha")["connection"] == "StandAlone", what="alpha StandAlone")
    c.rblock("alpha", "connect", "r0")
    if c.peer("beta")["connection"] == "StandAlone":
        c.rblock("beta", "connect", "r0")
    c.wait_synced()
    assert c.files_identical()
    assert read_file(c.disk("beta"), 0, 16 * MIB) == data
    assert beta_after_verify == "Established", (
        f"beta still {beta_after_verify} 5 s after alpha's verify finished")


# --- 5. invalidate ---------------------------------------------------------------------------


def test_invalidate_resyncs_everything_from_the_peer(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    data = os.urandom(4 * MIB)
    write_through(c, "alpha", 0, data)
    c.wait_synced()
    corrupt_block(c.disk("beta"), 10 * BLOCK)
    corrupt_block(c.disk("beta"), 60 * MIB)  # past what anything wrote
    assert not c.files_identical()

    res = c.rblock("beta", "invalidate", "r0")
    assert "invalidated" in res.stdout
    c.wait_synced()
    log = c.log("beta")
    assert "resync from alpha" in log and "replication Off -> SyncTarget" in log, log[-3000:]
    assert "disk UpToDate -> Inconsistent" in log
    rb = c.res("beta")
    assert (rb["role"], rb["disk"]) == ("Secondary", "UpToDate")
    assert c.files_identical()
    assert read_file(c.disk("beta"), 0, 4 * MIB) == data


def _log_time(log: str, what: str) -> float:
    """The wall-clock time of the first log line containing WHAT (the daemon logs local time
    to the millisecond: "2026-11-25 21:54:59,446 rblock...")."""
    line = next(x for x in log.splitlines() if what in x)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def test_invalidate_on_the_connected_primary_under_client_io(cluster):
    """'rblock invalidate' on the Primary while a client reads and writes through its NBD
    export: the Primary stays connected and becomes SyncTarget of the whole disk; reads of
    blocks not resynced yet come from beta (alpha's own copies are junk here), writes go on,
    and every read returns what was last written. At the end both files are identical."""
    size = 128 * MIB
    c = cluster(size="128M")
    c.start_fresh()
    model = bytearray(os.urandom(size))
    write_through(c, "alpha", 0, bytes(model))
    c.wait_synced()
    # Junk in alpha's file behind the daemon's back: 1 MiB in every 4 MiB. Only the resync
    # from beta (or a remote read) gives these blocks back.
    junk_blocks = [b for mib in range(0, size // MIB, 4) for b in
                   range(mib * MIB // BLOCK, (mib + 1) * MIB // BLOCK)]
    fd = os.open(c.disk("alpha"), os.O_WRONLY)
    try:
        for mib in range(0, size // MIB, 4):
            assert os.pwrite(fd, os.urandom(MIB), mib * MIB) == MIB
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not c.files_identical()

    invalidated = threading.Event()
    stop = threading.Event()
    errors: list[str] = []
    op_times: list[float] = []

    def client() -> None:
        rng = random.Random(7)
        h = connect(c, "alpha")
        try:
            while not stop.is_set():
                n = rng.choice((1, 1, 1, 16))  # blocks; 64 KiB requests span synced and not
                if rng.random() < 0.5:
                    block = rng.choice(junk_blocks)  # alpha's copy is junk until resynced
                else:
                    block = rng.randrange(size // BLOCK - n)
                block = min(block, size // BLOCK - n)
                off, length = block * BLOCK, n * BLOCK
                if rng.random() < 0.4:
                    data = os.urandom(length)
                    h.pwrite(data, off)
                    model[off:off + length] = data
                else:
                    got = h.pread(length, off)
                    touches_junk = any(b in junk_set for b in range(block, block + n))
                    if (invalidated.is_set() or not touches_junk) and \
                            got != model[off:off + length]:
                        errors.append(f"read at {off}+{length} returned wrong data "
                                      f"(invalidated: {invalidated.is_set()})")
                        return
                if invalidated.is_set():
                    op_times.append(time.time())  # wall clock, as in the daemon's log
            h.flush()
        except Exception as e:  # noqa: BLE001 -- reported by the test thread
            errors.append(f"client failed: {e!r}")
        finally:
            h.shutdown()

    junk_set = set(junk_blocks)
    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.5)  # the client is running
    log_before = len(c.log("alpha"))
    res = c.rblock("alpha", "invalidate", "r0")
    invalidated.set()
    assert "invalidated" in res.stdout
    c.wait(lambda: errors or "resync from beta finished" in c.log("alpha")[log_before:],
           timeout_s=60, what="alpha's resync from beta")
    time.sleep(0.5)  # the client keeps going after the resync
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert not errors, errors
    c.wait_synced()

    log = c.log("alpha")[log_before:]
    assert "disk UpToDate -> Inconsistent" in log, log
    assert "replication Established -> SyncTarget" in log, log
    assert "resync from beta finished" in log, log
    assert "connection Connected" not in log, log  # the link stayed up throughout
    for node in ("alpha", "beta"):
        assert "no node has consistent data" not in c.log(node)
        assert "no resync running" not in c.log(node)
    assert "SyncSource" in c.log("beta")
    began, ended = (_log_time(log, "replication Established -> SyncTarget"),
                    _log_time(log, "resync from beta finished"))
    during = [x for x in op_times if began <= x <= ended]
    assert during, (f"no client I/O completed during the resync ({len(op_times)} ops after "
                    f"the invalidate; the resync took {ended - began:.3f} s)")
    ra = c.res("alpha")
    assert (ra["role"], ra["disk"]) == ("Primary", "UpToDate")
    assert c.files_identical()
    assert read_file(c.disk("alpha"), 0, size) == model
    assert read_through(c, "alpha", 0, size) == model


def test_invalidated_primary_losing_its_source_mid_resync(cluster):
    """The peer dies while the invalidated Primary resyncs from it: no good copy of the data
    is left on the Primary, so its writes fail (a write there alone would be overwritten by
    the resync) and so do reads of blocks not resynced yet; when the peer is back, the
    connect decision makes the Primary the target again (disk states: the only consistent
    disk is the source) and the resync ends with both files identical."""
    size = 256 * MIB
    c = cluster(size="256M")
    c.start_fresh()
    data = b"".join(bytes([i % 251 + 1]) * MIB for i in range(size // MIB))
    write_through(c, "alpha", 0, data)
    c.wait_synced()
    # Every block of alpha's file differs now (all zeroes), so the resync copies the whole
    # disk, at most at the cluster's resync_rate (400 MB/s): it takes over half a second.
    fd = os.open(c.disk("alpha"), os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    h = connect(c, "alpha")
    try:
        log_before = len(c.log("alpha"))
        c.rblock("alpha", "invalidate", "r0")
        c.kill("beta")
        log = c.log("alpha")[log_before:]
        assert "replication Established -> SyncTarget" in log, log
        assert "resync from beta finished" not in log, "the resync ended before beta died"
        c.wait(lambda: c.peer("alpha")["connection"] == "Connecting", what="alpha sees beta gone")
        r = c.res("alpha")
        assert (r["role"], r["disk"]) == ("Primary", "Inconsistent"), r
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xee" * BLOCK, 0)
        with pytest.raises(nbd.Error):
            h.pread(BLOCK, size - BLOCK)  # the sweep runs from the start: not resynced yet
    finally:
        h.shutdown()
    c.up("beta")
    c.wait_synced()
    log = c.log("alpha")[log_before:]
    # Alpha took no write alone (they failed: its disk is Inconsistent), so no new
    # generation: the same one on both, and the consistent disk is the source.
    assert "bitmap resync, this node is the target (rule same-current)" in log, log
    assert c.files_identical()
    assert read_through(c, "alpha", 0, size) == data


def test_invalidate_refused_on_a_disconnected_primary(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    c.rblock("alpha", "disconnect", "r0")
    res = fail(c, "alpha", "invalidate", "r0")
    assert "Primary on alpha" in res.stderr and "connect" in res.stderr, res.stderr
    assert c.res("alpha")["disk"] == "UpToDate"


# --- 6. split brain --------------------------------------------------------------------------


def test_split_brain_detected_kept_and_resolved(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    c.rblock("alpha", "disconnect", "r0")
    c.wait(lambda: c.peer("alpha")["connection"] == "StandAlone", what="alpha StandAlone")
    # Disconnecting from the Primary outdates the Secondary, which keeps trying to connect.
    c.wait(lambda: c.res("beta")["disk"] == "Outdated", what="beta Outdated")
    assert c.peer("beta")["connection"] == "Connecting"

    res = fail(c, "beta", "primary", "r0")
    assert "Outdated" in res.stderr, res.stderr
    c.rblock("beta", "primary", "r0", "--force")
    assert c.res("beta")["role"] == "Primary"

    mine = {"alpha": os.urandom(MIB), "beta": os.urandom(MIB)}
    write_through(c, "alpha", 0, mine["alpha"])
    write_through(c, "beta", 0, mine["beta"])
    assert read_through(c, "alpha", 0, MIB) == mine["alpha"]
    # (beta reading its own writes back: test_forced_promotion_of_an_outdated_disk)

    # beta is still Connecting: 'connect' is a no-op for it, and says so (exit 1; done
    # first: after the refusal below a late 'connect' would legitimately take it out of
    # StandAlone again); alpha dials.
    res = fail(c, "beta", "connect", "r0")
    assert res.stderr == ("rblock: r0 on beta is already Connecting to alpha (it is not "
                          "StandAlone); nothing done\n"), res.stderr
    c.rblock("alpha", "connect", "r0")
    for node in ("alpha", "beta"):
        c.wait(lambda n=node: "split brain" in c.log(n), timeout_s=15, what=f"{node} split brain")
        c.wait(lambda n=node: c.peer(n)["connection"] == "StandAlone", what=f"{node} StandAlone")
    time.sleep(1.0)  # nothing may flow afterwards either
    for node in mine:
        assert read_file(c.disk(node), 0, MIB) == mine[node], node
        assert c.peer(node)["connection"] == "StandAlone"
        assert c.res(node)["role"] == "Primary"

    # Resolve: beta's changes are thrown away.
    c.rblock("beta", "secondary", "r0")
    c.rblock("beta", "connect", "r0", "--discard-my-data")
    c.rblock("alpha", "connect", "r0")
    c.wait_synced()
    assert "full sync, this node is the target" in c.log("beta")
    assert c.files_identical()
    assert read_file(c.disk("beta"), 0, MIB) == mine["alpha"]
    assert (c.res("alpha")["role"], c.res("beta")["role"]) == ("Primary", "Secondary")


def test_forced_promotion_of_an_outdated_disk(cluster):
    """After 'disconnect' on the primary, the secondary is Outdated; 'primary --force' makes
    it a working primary: UpToDate (the operator declared its data good, as in DRBD) and
    serving reads of what it writes, though no peer is there."""
    c = cluster(size="64M")
    c.start_fresh()
    old = os.urandom(MIB)
    write_through(c, "alpha", 0, old)
    c.wait_synced()
    c.rblock("alpha", "disconnect", "r0")
    c.wait(lambda: c.res("beta")["disk"] == "Outdated", what="beta Outdated")
    c.rblock("alpha", "secondary", "r0")

    res = fail(c, "beta", "primary", "r0")
    assert "Outdated" in res.stderr and "UpToDate" in res.stderr, res.stderr
    res = c.rblock("beta", "primary", "r0", "--force")
    assert "Outdated" in res.stdout, res.stdout
    rb = c.res("beta")
    assert (rb["role"], rb["nbd"]) == ("Primary", c.nbd_uri("beta"))

    assert read_through(c, "beta", 0, MIB) == old  # what it had
    new = os.urandom(MIB)
    write_through(c, "beta", 2 * MIB, new)
    assert read_file(c.disk("beta"), 2 * MIB, MIB) == new
    assert read_through(c, "beta", 2 * MIB, MIB) == new  # what it wrote since
    assert c.res("beta")["disk"] == "UpToDate", c.res("beta")


# --- 7. events -------------------------------------------------------------------------------


def test_events_stream(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    pj = events_proc(c, "alpha", "--json")
    pt = events_proc(c, "alpha")
    try:
        port = c.ports["alpha"]["control"]
        wait_subscribed(pj, port)
        wait_subscribed(pt, port)
        qj, qt = reader(pj), reader(pt)

        c.rblock("alpha", "disconnect", "r0")
        c.rblock("alpha", "connect", "r0")
        c.wait_synced()
        c.rblock("alpha", "secondary", "r0")

        def parsed(lines: list[str]) -> list[dict]:
            return [json.loads(x) for x in lines]

        def seen_all(lines: list[str]) -> bool:
            evs = parsed(lines)
            return (any(e["what"] == "role" and e["new"] == "Secondary" for e in evs)
                    and any(e["what"] == "connection" and e["new"] == "Connected"
                            for e in evs))

        evs = parsed(collect(qj, seen_all))
        # It starts with the current state (as drbdsetup events2): r0, then the end mark.
        assert [(e["what"], e["resource"]) for e in evs[:2]] == [("exists", "r0"),
                                                                  ("exists", "-")], evs[:2]
        assert evs[0]["status"]["role"] == "Primary", evs[0]
        evs = evs[2:]
        for e in evs:
            assert {"resource", "what", "old", "new"} <= set(e), e
            assert e["resource"] == "r0"
        changes = [(e["what"], e["old"], e["new"]) for e in evs]
        assert ("connection", "Connected", "StandAlone") in changes, changes
        assert ("connection", "StandAlone", "Connecting") in changes, changes
        assert ("connection", "Connecting", "Connected") in changes, changes
        assert ("replication", "Established", "Off") in changes, changes
        assert ("role", "Primary", "Secondary") in changes, changes
        # In order: StandAlone before Connecting before the new Connected.
        conn = [x[2] for x in changes if x[0] == "connection"]
        i = conn.index("StandAlone")
        assert conn[i:i + 3] == ["StandAlone", "Connecting", "Connected"], conn

        text = collect(qt, lambda ls: any("role Primary -> Secondary" in x for x in ls))
        assert any("r0 connection Connected -> StandAlone" in x for x in text), text
        assert any("r0 role Primary -> Secondary" in x for x in text), text
        for line in text:
            assert not line.lstrip().startswith("{"), line
    finally:
        stop_proc(pj)
        stop_proc(pt)
        # SIGTERM with subscribers attached is test_sigterm_with_event_subscribers_stops_cleanly;
        # SIGKILL here keeps this test from paying for that hang at teardown.
        if "alpha" in c.procs:
            c.kill("alpha")


def test_sigterm_with_event_subscribers_stops_cleanly(cluster):
    """A node stops on SIGTERM (metadata marked clean) while 'rblock events' clients are
    attached: one that went away (killed) and one still reading, which sees the end."""
    c = cluster(size="64M")
    c.create_md("alpha")
    c.up("alpha")
    gone = events_proc(c, "alpha", "--json")
    live = events_proc(c, "alpha")
    try:
        port = c.ports["alpha"]["control"]
        wait_subscribed(gone, port)
        wait_subscribed(live, port)
        stop_proc(gone)
        t0 = time.monotonic()
        rc = c.stop("alpha")  # raises after 20 s without an exit
        took = time.monotonic() - t0
        assert rc == 0
        assert "stopped cleanly" in c.log("alpha")
        assert took < 10, f"SIGTERM took {took:.1f} s"
        assert live.wait(10) is not None
    finally:
        stop_proc(gone)
        stop_proc(live)


# --- 8. clean stop ---------------------------------------------------------------------------


def test_clean_stop_and_restart_needs_no_resync(cluster):
    c = cluster(size="64M")
    c.start_fresh()
    data = os.urandom(4 * MIB)
    write_through(c, "alpha", 0, data)
    c.wait_synced()

    assert c.stop("alpha") == 0
    assert c.stop("beta") == 0
    for node in ("alpha", "beta"):
        assert "stopped cleanly" in c.log(node), c.log(node)[-2000:]
    assert c.files_identical()
    logs_before = {n: len(c.log(n)) for n in ("alpha", "beta")}

    c.up("alpha")
    c.up("beta")
    c.wait(lambda: c.peer("alpha")["replication"] == "Established", what="reconnected")
    c.wait_synced(timeout_s=10)
    for node in ("alpha", "beta"):
        assert c.peer(node)["out_of_sync_bytes"] == 0
        r = c.res(node)
        assert (r["role"], r["disk"], r["nbd"]) == ("Secondary", "UpToDate", None), r
    _, server_msg = refusal(c, "alpha")  # roles are not restored: promote again
    assert "no connected node is Primary" in server_msg, server_msg
    c.rblock("alpha", "primary", "r0")
    assert read_through(c, "alpha", 0, 4 * MIB) == data
    assert c.files_identical()

    # Nothing differed, and both stops were clean: the reconnect decides "no sync".
    for node in ("alpha", "beta"):
        new_log = c.log(node)[logs_before[node]:]
        assert "last stop was not clean" not in new_log, new_log
        decisions = [x.split(" rblock.resource INFO ", 1)[1] for x in new_log.splitlines()
                     if f"r0: {node} vs " in x]
        assert decisions and all(": no sync (rule" in d for d in decisions), (node, decisions)
        assert "resync" not in new_log, (node, new_log[-3000:])


# --- 9. CLI errors ---------------------------------------------------------------------------


def test_cli_errors(cluster):
    c = cluster(size="64M")

    res = fail(c, "alpha", "up")  # before create-md
    assert "create-md" in res.stderr, res.stderr
    res = fail(c, "alpha", "status")  # daemon not running
    assert "cannot reach the node's control API" in res.stderr, res.stderr
    assert "rblock up" in res.stderr

    res = subprocess.run(
        [sys.executable, "-m", "rblock", "status", "--config", str(c.configs["alpha"]),
         "--node", "gamma"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2, res
    assert "gamma" in res.stderr and "alpha" in res.stderr and "beta" in res.stderr, res.stderr

    c.create_md("alpha")
    c.up("alpha")
    res = fail(c, "alpha", "primary", "r9", code=2)  # not in the config: usage
    assert "r9" in res.stderr and "r0" in res.stderr, res.stderr
    res = fail(c, "alpha", "primary", "r0")  # fresh data, no --force
    assert "--force" in res.stderr, res.stderr
    res = c.rblock("alpha", "status", "--json")
    assert json.loads(res.stdout)["resources"][0]["role"] == "Secondary"
