"""rblock serve with TLS: certificates made here with the openssl CLI, real clients (qemu-img,
nbdinfo) and a raw client for the option-level rules."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import make_image
from tests.nbdwire import (
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_TLS_REQD,
    SIMPLE_REPLY_MAGIC,
    Raw,
    file_bytes,
    info_request,
    wait_for_log,
)

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("openssl", "qemu-img", "nbdinfo")),
    reason="openssl, qemu-utils and libnbd-bin are needed (make test installs them)",
)


def openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"openssl {args}: {proc.stderr}"


def new_key_and_csr(key: Path, csr: Path, cn: str) -> None:
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")


def sign(csr: Path, cert: Path, d: Path, extensions: str) -> None:
    ext = csr.with_suffix(".ext")
    ext.write_text(extensions)
    openssl("x509", "-req", "-in", csr, "-CA", d / "ca-cert.pem", "-CAkey", d / "ca-key.pem",
            "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate (127.0.0.1 and localhost), a client certificate, and two
    client credential directories in the layout qemu and libnbd expect."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", d / "ca-key.pem", "-out", d / "ca-cert.pem", "-days", "2",
            "-subj", "/CN=rblock test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    new_key_and_csr(d / "server-key.pem", d / "server.csr", "localhost")
    sign(d / "server.csr", d / "server-cert.pem", d,
         "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
         "basicConstraints=CA:FALSE\n"
         "keyUsage=critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage=serverAuth\n")
    new_key_and_csr(d / "client-key.pem", d / "client.csr", "rblock-test-client")
    sign(d / "client.csr", d / "client-cert.pem", d,
         "basicConstraints=CA:FALSE\n"
         "keyUsage=critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage=clientAuth\n")
    other = d / "other-ca"  # trusts an unrelated CA only
    other.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", other / "ca-key.pem", "-out", other / "ca-cert.pem",
            "-days", "2", "-subj", "/CN=some other CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (other / "ca-key.pem").unlink()
    ca_only = d / "ca-only"
    ca_only.mkdir()
    shutil.copy(d / "ca-cert.pem", ca_only / "ca-cert.pem")
    with_client = d / "with-client"
    with_client.mkdir()
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(d / f, with_client / f)
    return {"dir": d, "ca_only": ca_only, "with_client": with_client, "other_ca": other,
            "cert": d / "server-cert.pem", "key": d / "server-key.pem",
            "ca": d / "ca-cert.pem"}


def tls_args(pki, mode: str | None = "require", client_ca: bool = False) -> list:
    args = ["--tls-cert", pki["cert"], "--tls-key", pki["key"]]
    if mode:
        args += ["--tls", mode]
    if client_ca:
        args += ["--tls-ca", pki["ca"]]
    return args


def run(*argv, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{argv}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def qemu_opts(uri: str, creds: str = "tls0") -> str:
    u = urlsplit(uri)
    return (f"driver=nbd,host={u.hostname},port={u.port},export={u.path.lstrip('/')},"
            f"tls-creds={creds}")


def qemu_tls_object(creds_dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds_dir}"]


def plain_uri(uri: str) -> str:
    assert uri.startswith("nbds://"), uri
    return "nbd://" + uri.removeprefix("nbds://")


def qemu_roundtrip(uri: str, creds_dir: Path, tmp_path: Path, backing: Path) -> None:
    """Write 1 MiB of random data at 2 MiB through qemu-img over TLS, read it all back."""
    size = os.path.getsize(backing)
    src = make_image(tmp_path / "src.raw", size)
    data = os.urandom(MiB)
    with open(src, "r+b") as f:
        f.seek(2 * MiB)
        f.write(data)
    run("qemu-img", "convert", "-n", "-f", "raw", *qemu_tls_object(creds_dir),
        "--target-image-opts", src, qemu_opts(uri))
    assert file_bytes(backing, 2 * MiB, MiB) == data
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", *qemu_tls_object(creds_dir), "--image-opts", qemu_opts(uri),
        "-O", "raw", out)
    assert out.read_bytes() == src.read_bytes()
    info = run("qemu-img", "info", *qemu_tls_object(creds_dir), "--image-opts",
               qemu_opts(uri)).stdout
    assert f"virtual size: {size // MiB} MiB" in info, info


def test_qemu_img_over_tls(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", 8 * MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki))
    assert srv.uri.startswith("nbds://127.0.0.1:")
    qemu_roundtrip(srv.uri, pki["ca_only"], tmp_path, backing)
    assert "(structured, TLS)" in wait_for_log(srv.log, "TLS)")
    assert srv.stop() == 0


def test_nbdinfo_over_tls_and_plain_refused(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", 8 * MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki))
    out = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['ca_only']}").stdout
    assert "with TLS" in out and "export-size: 8388608" in out, out
    plain = run("nbdinfo", plain_uri(srv.uri), check=False)
    assert plain.returncode != 0
    assert "export-size" not in plain.stdout
    assert srv.stop() == 0


def test_client_rejecting_server_certificate_is_cleaned_up(pki, rblock_serve, tmp_path):
    """nbdinfo trusting another CA aborts the TLS handshake (gnutls closes without an alert).
    The server must notice: log the connection as closed and still stop promptly on SIGTERM
    (not wait out its 30 s drain timeout for a connection that is gone)."""
    backing = make_image(tmp_path / "disk.img", MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki))
    refused = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['other_ca']}", check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr
    log = wait_for_log(srv.log, "conn 1 ", timeout_s=5)
    good = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['ca_only']}", check=False)
    # stop the server first (bounded), so a failure below does not wait out the fixture
    t0 = time.monotonic()
    os.kill(srv.pid, signal.SIGTERM)
    try:
        rc = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        srv.stop(signal.SIGKILL)
        rc = None
    took = time.monotonic() - t0
    assert "with TLS" in good.stdout, good.stderr
    problems = []
    if "conn 1 " not in log:
        problems.append("no close logged for the refused client within 5 s")
    if rc != 0:
        problems.append(f"exit status {rc} {took:.1f} s after SIGTERM (None: still running "
                        f"after 10 s)")
    assert not problems, "; ".join(problems) + f"\nserver log:\n{srv.log()}"


def test_raw_options_before_starttls_get_tls_reqd(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki))
    with Raw(srv.uri) as r:
        r.start()
        for option, data in ((OPT_LIST, b""), (OPT_STRUCTURED_REPLY, b""),
                             (OPT_GO, info_request("t"))):
            replies = r.option(option, data)
            assert [t for t, _ in replies] == [REP_ERR_TLS_REQD], (option, replies)
            assert REP_ERR_TLS_REQD == 2**31 + 5
        # STARTTLS is still accepted after the refusals
        assert r.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        r.sock = ctx.wrap_socket(r.sock, server_hostname="127.0.0.1")
        size, _ = r.go("t")
        assert size == MiB
        assert r.read(0, 512) == bytes(512)
    assert srv.stop() == 0


def test_tls_allow_serves_plain_and_tls_clients(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", 8 * MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki, mode="allow"))
    plain = run("nbdinfo", plain_uri(srv.uri)).stdout
    assert "without TLS" in plain and "export-size: 8388608" in plain
    tls = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['ca_only']}").stdout
    assert "with TLS" in tls
    # plain qemu-img writes work too
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
        make_image(tmp_path / "rnd.raw", 8 * MiB, random_data=True), plain_uri(srv.uri))
    assert backing.read_bytes() == (tmp_path / "rnd.raw").read_bytes()
    assert srv.stop() == 0


def test_starttls_discards_structured_reply_negotiated_before_it(pki, rblock_serve, tmp_path):
    """proto.md, NBD_OPT_STARTTLS: 'When this command succeeds, the server MUST NOT preserve
    any negotiation state (such as a request for NBD_OPT_STRUCTURED_REPLY ...) issued before
    this command.' So a READ after STARTTLS + GO, with no new STRUCTURED_REPLY, gets a simple
    reply."""
    backing = make_image(tmp_path / "disk.img", MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki, mode="allow"))
    with Raw(srv.uri) as r:
        r.start()
        assert r.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        assert r.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        r.sock = ctx.wrap_socket(r.sock, server_hostname="127.0.0.1")
        _, tflags = r.go("t")
        r.request(0, 0, 512, handle=3)  # READ
        (magic,) = struct.unpack(">I", r.recv_exact(4))
        assert magic == SIMPLE_REPLY_MAGIC, (
            f"reply magic 0x{magic:08x}: structured replies survived STARTTLS")
    assert srv.stop() == 0


def test_client_certificate_required_with_tls_ca(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", 8 * MiB)
    srv = rblock_serve(backing, "--export", "t", *tls_args(pki, client_ca=True))
    qemu_roundtrip(srv.uri, pki["with_client"], tmp_path, backing)
    ok = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['with_client']}").stdout
    assert "with TLS" in ok
    # without a client certificate the TLS handshake fails and the server logs why
    refused = run("nbdinfo", f"{srv.uri}?tls-certificates={pki['ca_only']}", check=False)
    assert refused.returncode != 0
    assert "TLS handshake failed" in wait_for_log(srv.log, "TLS handshake failed")
    # the server is still healthy afterwards
    assert "with TLS" in run("nbdinfo",
                             f"{srv.uri}?tls-certificates={pki['with_client']}").stdout
    assert srv.stop() == 0


def test_tls_over_unix_socket(pki, rblock_serve, tmp_path):
    backing = make_image(tmp_path / "disk.img", 2 * MiB)
    sock = tmp_path / "tls.sock"
    srv = rblock_serve(backing, "--export", "u", "--socket", sock, *tls_args(pki))
    assert srv.uri == f"nbds+unix:///u?socket={sock}"
    # over a Unix socket libnbd checks the certificate against 'localhost'
    out = run("nbdinfo", f"{srv.uri}&tls-certificates={pki['ca_only']}").stdout
    assert "with TLS" in out and "export-size: 2097152" in out, out
    assert srv.stop() == 0
