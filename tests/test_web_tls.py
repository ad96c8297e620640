"""`hvctl web --tls-cert --tls-key`: a real server process over HTTPS (a certificate made
by openssl, trusted by the client), its cookie Secure; bad TLS options refused in words."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time

import aiohttp

from hvctl.web.users import Users
from tests.cluster import REPO, free_ports
from tests.test_web_api import CONFIG, PASSWORD

STOP_WAIT_S = 30.0  # well under aiohttp's 60 s shutdown timeout, which an open stream held


def hvctl_web(cfg, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hvctl", "--config", str(cfg), "web",
                             *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_https_login_secure_cookie_and_bad_tls_options(tmp_path):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(CONFIG.format(*free_ports(6)))
    Users(tmp_path / "state" / "web-users.json").add("ann", "admin", PASSWORD)
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    out = subprocess.run([sys.executable, "-m", "hvctl", "--config", str(cfg), "web",
                          "--tls-cert", str(cert)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--tls-cert and --tls-key go together" in out.stderr
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    out = subprocess.run([sys.executable, "-m", "hvctl", "--config", str(cfg), "web",
                          "--tls-cert", str(cert), "--tls-key", str(bad)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "cannot load the TLS certificate or key" in out.stderr

    port = free_ports(1)[0]
    proc = hvctl_web(cfg, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
                     "--tls-key", str(key))
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"serving https://127.0.0.1:{port}/", line

        async def go() -> None:
            trust = ssl.create_default_context(cafile=str(cert))
            # unsafe: keep cookies of an IP address (aiohttp's jar drops them by default)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust),
                                             cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                base = f"https://127.0.0.1:{port}"
                r = await s.post(base + "/login", data={"user": "ann", "password": PASSWORD},
                                 allow_redirects=False)
                assert r.status == 302
                cookie = r.headers["Set-Cookie"]
                assert "Secure" in cookie and "HttpOnly" in cookie, cookie
                # aiohttp keeps a Secure cookie for https only: this request carries it
                r = await s.get(base + "/api/v1/guests")
                assert r.status == 200 and [g["name"] for g in await r.json()] == ["vm1"]
            async with aiohttp.ClientSession() as s:  # plain HTTP to the TLS port: no page
                try:
                    r = await s.get(f"http://127.0.0.1:{port}/login")
                    assert r.status == 400, r.status
                except aiohttp.ClientError:
                    pass
        asyncio.run(go())
    finally:
        proc.terminate()
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.returncode == 0, proc.stdout.read()


def test_sigterm_ends_open_streams_and_exits_0(tmp_path):
    """An open page (its live stream) does not hold the server's stop for aiohttp's 60 s
    shutdown timeout: the stream ends, the process exits 0."""
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(CONFIG.format(*free_ports(6)))
    Users(tmp_path / "state" / "web-users.json").add("ann", "admin", PASSWORD)
    port = free_ports(1)[0]
    proc = hvctl_web(cfg, "--listen", f"127.0.0.1:{port}")
    try:
        assert proc.stdout.readline().startswith("serving http://")

        async def go() -> float:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                base = f"http://127.0.0.1:{port}"
                await s.post(base + "/login", data={"user": "ann", "password": PASSWORD})
                r = await s.get(base + "/api/v1/events")
                while not (await r.content.readline()).startswith(b"data: "):
                    pass
                proc.terminate()
                t0 = time.monotonic()
                while await r.content.readline():  # until the server ends the stream
                    pass
                return time.monotonic() - t0
        ended_after = asyncio.run(go())
        proc.wait(STOP_WAIT_S)
        assert proc.returncode == 0 and ended_after < STOP_WAIT_S
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
