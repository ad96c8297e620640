"""rblock serve against the real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, make_image
from tests.nbdwire import CMD_READ, Raw, file_bytes

KiB = 1024
MiB = 1024 * KiB
TOOL_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")),
    reason="libnbd-bin and qemu-utils are needed (make test installs them)",
)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S)
    if check:
        assert proc.returncode == 0, (
            f"{argv} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def nbdinfo_json(uri: str) -> dict:
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert len(info["exports"]) == 1, info
    return info["exports"][0]


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    """[(offset, length, type)] with neighbouring extents of one type merged."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout):
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def write_at(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- nbdinfo -----------------------------------------------------------------------------------


def test_nbdinfo_reports_every_capability(rblock_serve, tmp_path):
    img = make_image(tmp_path / "disk.img", 64 * MiB)
    srv = rblock_serve(img, "--export", "x")
    e = nbdinfo_json(srv.uri)
    assert e["export-name"] == "x"
    assert e["export-size"] == 64 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                 "can_df", "can_multi_conn"):
        assert e[flag] is True, flag
    assert e["is_read_only"] is False
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
        1, 4096, 32 * MiB)
    assert "base:allocation" in e["contexts"]
    assert str(img) in e["description"]
    assert srv.stop() == 0


def test_nbdinfo_read_only_export(rblock_serve, tmp_path):
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    srv = rblock_serve(img, "--export", "ro", "--read-only")
    e = nbdinfo_json(srv.uri)
    assert e["is_read_only"] is True
    assert e["can_trim"] is False
    assert e["can_zero"] is False
    assert e["can_fast_zero"] is False
    assert e["can_flush"] is True and e["can_cache"] is True
    assert srv.stop() == 0


def test_nbdinfo_list_shows_both_exports(rblock_serve, tmp_path):
    a = make_image(tmp_path / "a.img", 1 * MiB)
    b = make_image(tmp_path / "b.img", 2 * MiB)
    srv = rblock_serve(f"first={a}", f"second={b}")
    assert [u.rsplit("/", 1)[1] for u in srv.uris] == ["first", "second"]
    base = srv.uri.rsplit("/", 1)[0] + "/"
    listed = json.loads(run("nbdinfo", "--list", "--json", base).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert sizes == {"first": MiB, "second": 2 * MiB}
    text = run("nbdinfo", "--list", base).stdout
    assert 'export="first"' in text and 'export="second"' in text
    # the empty export name is the first export
    assert nbdinfo_json(base)["export-size"] == MiB
    assert srv.stop() == 0


def test_nbdinfo_map_of_sparse_image(rblock_serve, tmp_path):
    img = make_image(tmp_path / "sparse.img", 16 * MiB)
    write_at(img, 1 * MiB, os.urandom(256 * KiB))
    write_at(img, 8 * MiB, os.urandom(1 * MiB))
    srv = rblock_serve(img, "--export", "s")
    hole = 3  # hole,zero
    assert nbdinfo_map(srv.uri) == [
        (0, MiB, hole),
        (MiB, 256 * KiB, 0),
        (MiB + 256 * KiB, 7 * MiB - 256 * KiB, hole),
        (8 * MiB, MiB, 0),
        (9 * MiB, 7 * MiB, hole),
    ]
    assert srv.stop() == 0


# --- nbdcopy -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_nbdcopy_256m_in_and_out(rblock_serve, tmp_path):
    src = make_image(tmp_path / "src.img", 256 * MiB, random_data=True)
    backing = make_image(tmp_path / "export.img", 256 * MiB)
    srv = rblock_serve(backing, "--export", "big")
    run("nbdcopy", "-C", "4", src, srv.uri)
    out = tmp_path / "out.img"
    run("nbdcopy", "-C", "4", srv.uri, out)
    run("cmp", src, out)
    assert srv.stop() == 0
    run("cmp", src, backing)


# --- qemu-img ----------------------------------------------------------------------------------


def test_qemu_img_convert_compare_and_map(rblock_serve, tmp_path):
    src = make_image(tmp_path / "src.img", 32 * MiB)
    data1, data2 = os.urandom(512 * KiB), os.urandom(2 * MiB)
    write_at(src, 4 * MiB, data1)
    write_at(src, 20 * MiB, data2)
    backing = make_image(tmp_path / "export.img", 32 * MiB)
    srv = rblock_serve(backing, "--export", "q")

    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri)
    assert file_bytes(backing, 4 * MiB, len(data1)) == data1
    assert file_bytes(backing, 20 * MiB, len(data2)) == data2

    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri).stdout)
    data_ranges = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data_ranges == [(4 * MiB, 512 * KiB), (20 * MiB, 2 * MiB)], extents
    for e in extents:
        if not e["data"]:
            assert e["zero"] is True, e
    assert sum(e["length"] for e in extents) == 32 * MiB

    # a differing byte is noticed by compare
    write_at(src, 30 * MiB, b"\x01")
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri,
               check=False).returncode == 1
    assert srv.stop() == 0


# --- qemu-io -----------------------------------------------------------------------------------


def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    if read_only:
        argv.append("-r")
    argv.append(uri)
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, check=False)


def qemu_io_ok(uri: str, *cmds: str) -> str:
    proc = qemu_io(uri, *cmds)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fail" not in out.lower(), f"{cmds}:\n{out}"
    return out


def test_qemu_io_write_fua_zero_discard_flush(rblock_serve, tmp_path):
    img = make_image(tmp_path / "io.img", 8 * MiB)
    srv = rblock_serve(img, "--export", "io")
    u = srv.uri
    k64 = 64 * KiB

    qemu_io_ok(u, "write -P 0xab 0 64k", "write -f -P 0xcd 64k 64k",
               "write -P 0xef 128k 64k", "write -P 0x12 192k 64k", "write -P 0x34 256k 64k")
    qemu_io_ok(u, "read -P 0xab 0 64k", "read -P 0xcd 64k 64k", "read -P 0xef 128k 64k",
               "read -P 0x12 192k 64k", "read -P 0x34 256k 64k")
    assert file_bytes(img, 0, k64) == b"\xab" * k64
    assert file_bytes(img, k64, k64) == b"\xcd" * k64  # FUA write: in the file already

    # a wrong pattern is detected (so the checks above can fail)
    bad = qemu_io(u, "read -P 0x99 0 64k")
    assert "Pattern verification failed" in bad.stdout + bad.stderr

    # write zeroes, without and with unmap (NO_HOLE set / clear)
    qemu_io_ok(u, "write -z 128k 64k", "write -z -u 192k 64k")
    qemu_io_ok(u, "read -P 0 128k 128k", "read -P 0xcd 64k 64k", "read -P 0x34 256k 64k")
    assert file_bytes(img, 128 * KiB, 2 * k64) == bytes(2 * k64)

    # FUA write zeroes
    qemu_io_ok(u, "write -z -f 0 4k", "read -P 0 0 4k", "read -P 0xab 4k 60k")

    # discard: the range reads back as zeroes or as the old data, neighbours unchanged
    qemu_io_ok(u, "discard 64k 64k", "flush")
    got = file_bytes(img, k64, k64)
    assert got in (bytes(k64), b"\xcd" * k64)
    qemu_io_ok(u, f"read -P 0x{got[0]:02x} 64k 64k", "read -P 0xab 4k 60k",
               "read -P 0x34 256k 64k", "flush")
    assert file_bytes(img, 256 * KiB, k64) == b"\x34" * k64
    assert srv.stop() == 0


def test_read_only_export_refuses_qemu_io_write(rblock_serve, tmp_path):
    img = make_image(tmp_path / "ro.img", 4 * MiB, random_data=True)
    before = img.read_bytes()
    srv = rblock_serve(img, "--export", "ro", "--read-only")
    for ro in (False, True):  # opened read-write (refused at open) and read-only (at write)
        proc = qemu_io(srv.uri, "write -P 0x55 0 64k", read_only=ro)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "wrote" not in proc.stdout
    proc = qemu_io(srv.uri, "read 0 64k", read_only=True)
    assert proc.returncode == 0, proc.stderr
    assert srv.stop() == 0
    assert img.read_bytes() == before


# --- transports and exports --------------------------------------------------------------------


def test_unix_socket(rblock_serve, tmp_path):
    img = make_image(tmp_path / "u.img", 2 * MiB)
    sock = tmp_path / "nbd.sock"
    srv = rblock_serve(img, "--export", "u", "--socket", sock)
    assert srv.uri == f"nbd+unix:///u?socket={sock}"
    e = nbdinfo_json(f"nbd+unix:///u?socket={sock}")
    assert e["export-size"] == 2 * MiB
    qemu_io_ok(srv.uri, "write -P 0x5a 4k 4k")
    assert file_bytes(img, 4096, 4096) == b"\x5a" * 4096
    assert srv.stop() == 0
    assert not sock.exists(), "the socket file is left behind"


def test_multiple_exports_named_with_export_flag(rblock_serve, tmp_path):
    imgs = [make_image(tmp_path / f"disk{i}.img", (i + 1) * MiB) for i in range(3)]
    srv = rblock_serve(*imgs, "--export", "red", "--export", "green", "--export", "blue")
    names = ["red", "green", "blue"]
    assert [u.rsplit("/", 1)[1] for u in srv.uris] == names
    for i, uri in enumerate(srv.uris):
        e = nbdinfo_json(uri)
        assert (e["export-name"], e["export-size"]) == (names[i], (i + 1) * MiB)
        qemu_io_ok(uri, f"write -P 0x{0x10 + i:02x} 0 4k")
    for i, img in enumerate(imgs):  # each write landed in its own image only
        assert file_bytes(img, 0, 4096) == bytes([0x10 + i]) * 4096
    assert srv.stop() == 0


# --- shutdown ----------------------------------------------------------------------------------


def test_sigterm_during_active_nbdcopy_exits_0(rblock_serve, tmp_path):
    """nbdcopy streams from a pipe we feed at a bounded pace, so the copy is certainly still
    running when the server gets SIGTERM."""
    img = make_image(tmp_path / "export.img", 256 * MiB)
    srv = rblock_serve(img, "--export", "t")
    copy = subprocess.Popen(["nbdcopy", "-C", "4", "-", srv.uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fed = [0]

    def feed():
        chunk = os.urandom(MiB)
        try:
            for _ in range(256):
                copy.stdin.write(chunk)
                fed[0] += 1
                time.sleep(0.01)
            copy.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + 20
        while fed[0] < 32 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fed[0] >= 32
        assert copy.poll() is None, "nbdcopy finished before the signal"
        t0 = time.monotonic()
        rc = srv.stop(signal.SIGTERM)
        took = time.monotonic() - t0
        assert rc == 0, srv.log()
        assert took < 10, f"server took {took:.1f}s to stop"
        assert "stopped cleanly" in srv.log()
    finally:
        copy.kill()
        copy.wait()
        feeder.join(5)
    assert fed[0] < 256, "the copy was not active when the server stopped"


def test_sigterm_with_idle_and_handshaking_clients_exits_0(rblock_serve, tmp_path):
    nbd = pytest.importorskip("nbd")
    img = make_image(tmp_path / "d.img", 4 * MiB)
    srv = rblock_serve(img, "--export", "d")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    host, port = srv.uri.split("/")[2].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)  # stuck in the handshake
    try:
        t0 = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - t0 < 10
    finally:
        s.close()
    assert "stopped cleanly" in srv.log()


def test_sigterm_with_client_not_reading_replies_exits_promptly(rblock_serve, tmp_path):
    """A client pipelines big READs and never reads the replies. Once the request being
    served is answered nothing is in flight; SIGTERM must not wait for that client to drain
    its socket (the server's 30 s drain timeout is for in-flight requests)."""
    img = make_image(tmp_path / "d.img", 64 * MiB, random_data=True)
    srv = rblock_serve(img, "--export", "d")
    with Raw(srv.uri) as r:
        r.start()
        r.go("d")
        for handle in range(8):
            r.request(CMD_READ, 0, 32 * MiB, handle=handle)
        time.sleep(1)  # the server fills its send buffer and stops reading
        t0 = time.monotonic()
        os.kill(srv.pid, signal.SIGTERM)
        try:
            rc = srv.proc.wait(10)
        except subprocess.TimeoutExpired:
            srv.stop(signal.SIGKILL)
            rc = None
        took = time.monotonic() - t0
    assert rc == 0, (f"exit status {rc} {took:.1f} s after SIGTERM (None: still running after "
                     f"10 s)\n{srv.log()}")


# --- command line ------------------------------------------------------------------------------


def rblock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rblock", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_missing_image_without_create_exits_2_and_names_fix(tmp_path):
    missing = tmp_path / "nope.img"
    proc = rblock("serve", missing, "--listen", "127.0.0.1:0")
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr
    assert "--create" in proc.stderr and "--size" in proc.stderr
    assert "ready" not in proc.stdout
    assert not missing.exists()


@pytest.mark.parametrize("args, needle", [
    (["--create"], "--size"),
    (["--size", "1M"], "--create"),
    (["--tls-cert", "x.pem"], "--tls-key"),
    (["--tls", "allow"], "--tls-cert"),
])
def test_bad_flag_combinations_exit_2(tmp_path, args, needle):
    proc = rblock("serve", tmp_path / "x.img", "--listen", "127.0.0.1:0", *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_duplicate_export_name_exits_2(tmp_path):
    a = make_image(tmp_path / "a.img", MiB)
    b = make_image(tmp_path / "b.img", MiB)
    proc = rblock("serve", f"same={a}", f"same={b}", "--listen", "127.0.0.1:0")
    assert proc.returncode == 2
    assert "same" in proc.stderr and "twice" in proc.stderr


def test_create_with_size_makes_sparse_file(rblock_serve, tmp_path):
    path = tmp_path / "new.img"
    srv = rblock_serve(path, "--create", "--size", "100M", "--export", "n")
    st = os.stat(path)
    assert st.st_size == 100 * MiB
    assert st.st_blocks * 512 < MiB, "created image is not sparse"
    assert nbdinfo_json(srv.uri)["export-size"] == 100 * MiB
    assert nbdinfo_map(srv.uri) == [(0, 100 * MiB, 3)]
    assert srv.stop() == 0
    # an existing image with a different --size is refused, with the reason
    proc = rblock("serve", path, "--create", "--size", "50M", "--listen", "127.0.0.1:0")
    assert proc.returncode == 2
    assert "100" in proc.stderr or str(100 * MiB) in proc.stderr
