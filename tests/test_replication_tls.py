"""Peer-link TLS, end to end: two real `rblock up` nodes on loopback, certificates made here with
the openssl CLI (as tests/test_tls.py does for NBD).

What a user relies on: with `tls = true` both nodes replicate (full sync, live writes, a
resync after a restart) with every byte inside TLS and both certificates checked against the
CA; a node whose certificate the CA did not sign is refused, and nothing reaches the other
node's disk; a TLS node and a plain node refuse each other with a log line saying so, instead
of hanging; a node whose own TLS files are unusable does not start, and says which key to fix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbd
import pytest

from tests.cluster import REPO, Cluster, TLSFiles

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096
DISK_BYTES = 64 * MiB
REFUSAL_WATCH_S = 2.0  # how long a refused pair is watched for a connection that must not come

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is needed (make test installs it)")


# --- certificates ---------------------------------------------------------------------------------


def openssl(*args: object) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"openssl {args}: {proc.stderr}"


def make_ca(d: Path, name: str) -> Path:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", d / f"{name}-key.pem", "-out", d / f"{name}-cert.pem",
            "-days", "2", "-subj", f"/CN=rblock test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d / f"{name}-cert.pem"


NODE_EXTENSIONS = ("basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")  # a node is server and client


def make_cert(d: Path, name: str, ca: str, extensions: str = NODE_EXTENSIONS) -> TLSFiles:
    key, csr, cert = d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}-cert.pem"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    ext = d / f"{name}.ext"
    ext.write_text(extensions)
    openssl("x509", "-req", "-in", csr, "-CA", d / f"{ca}-cert.pem", "-CAkey",
            d / f"{ca}-key.pem", "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    return TLSFiles(cert, key, d / f"{ca}-cert.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TLSFiles]:
    """alpha and beta signed by the cluster CA; mallory signed by another CA ("rogue")."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    files = {n: make_cert(d, n, "ca") for n in ("alpha", "beta")}
    files["mallory"] = make_cert(d, "mallory", "rogue")
    files["server-only"] = make_cert(d, "server-only", "ca", "basicConstraints=CA:FALSE\n"
                                     "extendedKeyUsage=serverAuth\n")
    both = d / "rogue-and-ca.pem"  # trusts either CA: lets mallory accept beta's certificate
    both.write_bytes((d / "rogue-cert.pem").read_bytes() + (d / "ca-cert.pem").read_bytes())
    files["mallory-trusting-both"] = files["mallory"]._replace(ca=both)
    return files


# --- helpers ----------------------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def fast_res(c: Cluster, node: str) -> dict:
    """Status straight from the control API (the CLI costs a Python start)."""
    url = f"http://127.0.0.1:{c.ports[node]['control']}/v1/status"
    with _NO_PROXY.open(url, timeout=5) as r:
        return json.loads(r.read())["resources"][0]


def write_random(uri: str, rng: random.Random, count: int) -> dict[int, bytes]:
    """COUNT writes of 4 KiB .. 1 MiB at random block offsets, then FLUSH; offset -> data."""
    written: dict[int, bytes] = {}
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for _ in range(count):
            length = rng.randrange(1, 257) * BLOCK
            offset = rng.randrange(0, (DISK_BYTES - length) // BLOCK + 1) * BLOCK
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            written[offset] = data
        h.flush()
    finally:
        h.shutdown()
    return written


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def all_zero(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            if chunk.count(0) != len(chunk):
                return False
    return True


def watch_never_connected(c: Cluster, seconds: float = REFUSAL_WATCH_S) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for node in ("alpha", "beta"):
            peer = fast_res(c, node)["peers"][0]
            assert peer["connection"] in ("Connecting", "StandAlone"), (node, peer)
            assert peer["replication"] == "Off", (node, peer)
        time.sleep(0.1)


def primary_alone_writes(c: Cluster) -> None:
    """alpha, never connected, is made Primary and takes writes: none may reach beta."""
    c.rblock("alpha", "primary", "r0", "--force")
    write_random(c.nbd_uri("alpha"), random.Random(7), 20)
    assert fast_res(c, "alpha")["peers"][0]["out_of_sync_bytes"] > 0
    watch_never_connected(c, 1.0)
    assert all_zero(c.disk("beta")), "data reached beta over a refused link"


# --- 1. TLS on both nodes -----------------------------------------------------------------------------


def test_tls_nodes_replicate_random_data_byte_identically(cluster, pki):
    c = cluster(size="64M", protocol="C", tls={"alpha": pki["alpha"], "beta": pki["beta"]})
    c.create_md()
    rng = random.Random(1)
    # Data on alpha before the first sync, so the full sync moves real bytes over TLS.
    with open(c.disk("alpha"), "r+b") as f:
        for pos in range(0, 16 * MiB, MiB):
            f.seek(4 * MiB + pos)
            f.write(rng.randbytes(MiB))
    c.up("alpha")
    c.up("beta")
    c.wait(lambda: c.peer("alpha")["connection"] == "Connected", what="connected over TLS")
    c.rblock("alpha", "primary", "r0", "--force")
    c.wait_synced()
    assert c.files_identical(), "the full sync over TLS left the disks different"

    written = write_random(c.nbd_uri("alpha"), rng, 60)
    for offset, data in written.items():  # FLUSH replied: on beta too (protocol C)
        assert len(read_range(c.disk("beta"), offset, len(data))) == len(data)
    c.wait_synced()
    assert c.files_identical(), "live writes over TLS left the disks different"

    # beta away while alpha writes, then back: the link is dialed again and the bitmap
    # resync runs over TLS too.
    c.stop("beta")
    write_random(c.nbd_uri("alpha"), rng, 30)
    assert fast_res(c, "alpha")["peers"][0]["out_of_sync_bytes"] > 0
    c.up("beta")
    c.wait_synced()
    assert c.files_identical(), "the resync over TLS left the disks different"

    alpha_log, beta_log = c.log("alpha"), c.log("beta")
    assert "link r0 with beta: TLSv1." in alpha_log, alpha_log[-2000:]
    assert "peer certificate CN=beta, issued by CN=rblock test ca" in alpha_log
    assert "peer certificate CN=alpha, issued by CN=rblock test ca" in beta_log
    assert "refused" not in alpha_log + beta_log


def test_tls_listener_survives_silent_and_garbage_connections(cluster, pki):
    """The listener peeks at each connection's first byte before TLS: a connection that
    says nothing is dropped after the authentication timeout, garbage that looks like TLS
    fails its handshake, other garbage fails the framing; none of it keeps the peer out."""
    c = cluster(size="64M", protocol="C", tls={"alpha": pki["alpha"], "beta": pki["beta"]})
    c.create_md()
    c.up("beta")
    addr = ("127.0.0.1", c.ports["beta"]["replication"])
    silent = socket.create_connection(addr)
    fake_tls = socket.create_connection(addr)
    fake_tls.sendall(b"\x16\x03\x01\x00\x05hello")
    http = socket.create_connection(addr)
    http.sendall(b"GET / HTTP/1.0\r\n" + b"Accept: */*\r\n" * 4 + b"\r\n")
    try:
        c.up("alpha")
        c.wait(lambda: c.peer("alpha")["connection"] == "Connected", timeout_s=10,
               what="alpha connects past the junk")
        c.wait(lambda: "nothing received in 5s" in c.log("beta"), timeout_s=10,
               what="the silent connection dropped")
        log = c.log("beta")
        assert "TLS handshake failed" in log, log[-2000:]
        assert "bad frame magic 0x47455420; frame dropped" in log, log[-2000:]  # "GET "
    finally:
        for s in (silent, fake_tls, http):
            s.close()


# --- 2. a certificate the CA did not sign ---------------------------------------------------------


@pytest.mark.parametrize("who_refuses", ["acceptor", "dialer"])
def test_certificate_from_another_ca_is_refused_and_nothing_is_written(cluster, pki,
                                                                       who_refuses):
    """alpha (the dialer: its name sorts first) holds mallory's certificate, signed by a rogue
    CA. acceptor: alpha trusts both CAs, so only beta can refuse (it checks alpha's certificate
    after alpha's side of the TLS 1.3 handshake is done). dialer: alpha trusts only the rogue
    CA, so it refuses beta's certificate first."""
    alpha = pki["mallory-trusting-both"] if who_refuses == "acceptor" else pki["mallory"]
    c = cluster(size="64M", protocol="C", tls={"alpha": alpha, "beta": pki["beta"]})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    if who_refuses == "acceptor":
        c.wait(lambda: "TLS handshake failed" in c.log("beta"), timeout_s=10,
               what="beta logs the refused certificate")
        assert f"the certificate is not signed by the CA in tls_ca ({pki['beta'].ca})" \
            in c.log("beta")
        c.wait(lambda: "may have refused this node's certificate" in c.log("alpha"),
               timeout_s=10, what="alpha logs that its certificate was refused")
    else:
        c.wait(lambda: "TLS handshake failed" in c.log("alpha"), timeout_s=10,
               what="alpha logs the refused certificate")
        assert "not signed by the CA in tls_ca" in c.log("alpha")
        c.wait(lambda: "TLS handshake failed" in c.log("beta"), timeout_s=10,
               what="beta logs the failed handshake")
    watch_never_connected(c)
    primary_alone_writes(c)


# --- 3. TLS on one node, plain on the other -------------------------------------------------------


@pytest.mark.parametrize("tls_node", ["alpha", "beta"])
def test_tls_and_plain_nodes_refuse_each_other(cluster, pki, tls_node):
    """The two nodes' config files differ (they should not): one has tls = true for r0, the
    other not. Either way round, both log why, neither hangs, no data crosses."""
    c = cluster(size="64M", protocol="C", tls={tls_node: pki[tls_node]})
    c.create_md()
    c.up("alpha")
    c.up("beta")
    if tls_node == "alpha":  # a TLS dialer meets a plain listener
        c.wait(lambda: "it opened a TLS handshake, but no resource on this node has tls = true"
                       in c.log("beta"),
               timeout_s=10, what="beta says the dialer speaks TLS")
        c.wait(lambda: "TLS handshake failed" in c.log("alpha"), timeout_s=10,
               what="alpha says its handshake failed")
        # "connection reset by the peer" or an EOF, depending on how the close arrives
        assert "it may have TLS off for this resource (set tls = true on both nodes)" \
            in c.log("alpha")
    else:  # a plain dialer meets a TLS listener: refused with a reason it logs
        expect = "resource r0 has tls = true on beta, but alpha connected without TLS"
        c.wait(lambda: expect in c.log("beta"), timeout_s=10, what="beta refuses plain alpha")
        c.wait(lambda: f"peer refused: {expect}" in c.log("alpha"), timeout_s=10,
               what="alpha logs beta's reason")
    watch_never_connected(c)
    primary_alone_writes(c)


# --- 4. unusable TLS files stop `rblock up` with the key to fix ---------------------------------


@pytest.mark.parametrize("case", ["missing", "wrong key", "other CA", "server-only", "not PEM"])
def test_up_refuses_unusable_tls_files(tmp_path, pki, case):
    good = pki["alpha"]
    files = {
        "missing": (good._replace(cert=tmp_path / "nope.pem"), "tls_cert", "cannot read"),
        "wrong key": (good._replace(key=pki["beta"].key), "tls_key",
                      "is not the key of the certificate"),
        "other CA": (pki["mallory"]._replace(ca=good.ca), "tls_cert",
                     "not signed by the CA in tls_ca"),
        "server-only": (pki["server-only"], "tls_cert", "extendedKeyUsage = serverAuth, "
                        "clientAuth"),
        "not PEM": (good._replace(ca=pki["alpha"].key), "tls_ca", "no usable CA certificate"),
    }
    tls, key, words = files[case]
    c = Cluster(tmp_path / "c", size="64M", tls={"alpha": tls, "beta": pki["beta"]})
    c.create_md()
    res = subprocess.run([sys.executable, "-m", "rblock", "up", "--config",
                          str(c.configs["alpha"]), "--node", "alpha"], capture_output=True,
                         text=True, cwd=REPO, timeout=30)
    assert res.returncode == 2, res
    assert f"{c.configs['alpha']}: node.alpha.{key}: " in res.stderr, res.stderr
    assert words in res.stderr, res.stderr
    assert "; " in res.stderr  # what is wrong; how to fix it


def test_tls_files_are_not_read_when_no_resource_uses_tls(tmp_path, pki):
    """Files listed on a node but unused (tls off everywhere) do not stop it: they may be
    there ahead of switching TLS on."""
    c = Cluster(tmp_path / "c", size="64M")
    text = c.configs["alpha"].read_text().replace(
        "[node.alpha.disk]", 'tls_cert = "missing.pem"\ntls_key = "missing.pem"\n'
        'tls_ca = "missing.pem"\n[node.alpha.disk]')
    c.configs["alpha"].write_text(text)
    c.create_md()
    try:
        c.up("alpha")
    finally:
        c.stop_all()
    assert os.path.exists(c.meta("alpha"))
