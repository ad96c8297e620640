"""hvctl web: the REST API and the page's access rules, in-process (aiohttp's test client),
against libvirt's test:///default driver and rblock nodes that are not running (so actions
are refused with the controller's own message). The browser tests drive the real thing."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hvctl.config import load
from hvctl.web.app import make_app
from hvctl.web.auth import LOGIN_ATTEMPTS_MAX
from hvctl.web.users import UserError, Users
from tests.cluster import free_ports
from tests.hvcluster import shared_loop

CONFIG = textwrap.dedent("""\
    [hvctl]
    state_dir = "state"
    [resource.r0]
    size = "64M"
    secret = "s"
    [node.alpha]
    replication = "127.0.0.1:{0}"
    control = "127.0.0.1:{1}"
    nbd = "127.0.0.1:{2}"
    libvirt = "test:///default"
    [node.alpha.disk]
    r0 = "a/r0.img"
    [node.beta]
    replication = "127.0.0.1:{3}"
    control = "127.0.0.1:{4}"
    nbd = "127.0.0.1:{5}"
    libvirt = "test:///default"
    [node.beta.disk]
    r0 = "b/r0.img"
    [guest.vm1]
    disks = ["r0"]
    domain_type = "qemu"
    """)
PASSWORD = "correct horse"


@pytest.fixture
def web(tmp_path: Path):
    cfgfile = tmp_path / "cluster.toml"
    cfgfile.write_text(CONFIG.format(*free_ports(6)))
    cfg = load(cfgfile)
    users = Users(tmp_path / "users.json")
    users.add("ann", "admin", PASSWORD)
    users.add("vic", "viewer", PASSWORD)
    loop = shared_loop()
    client = TestClient(TestServer(make_app(cfg, users)), loop=loop.loop)
    loop.run(client.start_server())
    yield loop, client, users
    loop.run(client.close())


async def login(client: TestClient, user: str = "ann", password: str = PASSWORD):
    r = await client.post("/login", data={"user": user, "password": password},
                          allow_redirects=False)
    return r


async def csrf(client: TestClient) -> str:
    page = await (await client.get("/")).text()
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_everything_needs_a_login(web):
    loop, c, _ = web

    async def go():
        r = await c.get("/api/v1/guests")
        assert r.status == 401 and "not logged in" in (await r.json())["error"]
        r = await c.get("/", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/login"
        r = await c.post("/api/v1/guests/vm1/start")
        assert r.status == 401
        r = await c.get("/login")
        assert r.status == 200 and 'name="password"' in await r.text()
    loop.run(go())


def test_login_cookie_and_dashboard(web):
    loop, c, _ = web

    async def go():
        r = await login(c, password="wrong password")
        assert r.status == 401 and "Wrong user name, password or one-time code" in \
            await r.text()
        r = await login(c)
        assert r.status == 302
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        page = await (await c.get("/")).text()
        assert "vm1" in page and "ann (admin)" in page
        guests = await (await c.get("/api/v1/guests")).json()
        assert [g["name"] for g in guests] == ["vm1"] and guests[0]["state"] == "undefined"
        nodes = await (await c.get("/api/v1/nodes")).json()
        assert [n["name"] for n in nodes] == ["alpha", "beta"] and nodes[0]["reachable"]
        assert nodes[0]["rblock"] is None and "is 'rblock up' running" in nodes[0]["rblock_error"]
        ha = await (await c.get("/api/v1/ha/status")).json()
        assert ha["note"] == "no [cluster] etcd: HA is off"
    loop.run(go())


def test_errors_are_json_with_the_right_status(web):
    loop, c, _ = web

    async def go():
        await login(c)
        token = await csrf(c)
        h = {"X-CSRF-Token": token}
        r = await c.get("/api/v1/guests/nope")
        assert r.status == 404
        assert "guest 'nope' not in" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/start")  # no CSRF token
        assert r.status == 403 and "CSRF" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/start", headers={"X-CSRF-Token": "forged"})
        assert r.status == 403
        r = await c.post("/api/v1/guests/vm1/start", headers=h, data=b"{not json",
                         )
        assert r.status == 400 and "not JSON" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/explode", headers=h)
        assert r.status == 404 and "no action 'explode'" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/move", headers=h, json={})
        assert r.status == 400 and "needs a target node" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/move", headers=h, json={"node": "gamma"})
        assert r.status == 404 and "gamma" in (await r.json())["error"]
        # rblock is not running: the controller refuses, with its own one-line message
        r = await c.post("/api/v1/guests/vm1/start", headers=h, json={"node": "alpha"})
        body = await r.json()
        assert r.status in (409, 502) and "rblock" in body["error"], body
        r = await c.post("/api/v1/nodes/alpha/maintenance", headers=h, json={"on": "yes"})
        assert r.status == 400 and '{"on": true}' in (await r.json())["error"]
        r = await c.post("/api/v1/nodes/gamma/maintenance", headers=h, json={"on": True})
        assert r.status == 404 and "gamma" in (await r.json())["error"]
        r = await c.post("/api/v1/nodes/alpha/maintenance", headers=h, json={"on": True})
        assert r.status == 409 and "HA is off" in (await r.json())["error"]
        r = await c.get("/api/v1/nope")
        assert r.status == 404 and "openapi.json" in (await r.json())["error"]
        tasks = await (await c.get("/api/v1/tasks")).json()
        done = [(t["user"], t["action"], t["state"]) for t in tasks]
        assert ("ann", "start", "failed") in done and done[-1] == (
            "ann", "maintenance on", "failed"), done
    loop.run(go())


def test_every_page_and_its_sections(web):
    loop, c, _ = web

    async def go():
        await login(c)
        for path, ids in {"/": ["summary", "guests", "nodes", "storage", "events", "ha-log"],
                          "/guests": ["guests", "console"], "/nodes": ["nodes", "etcd", "leases"],
                          "/storage": ["storage", "splitbrain"],
                          "/tasks": ["tasks", "failovers", "ha-log"]}.items():
            r = await c.get(path)
            assert r.status == 200, path
            page = await r.text()
            assert f'href="{path}" aria-current="page"' in page, path
            for i in ids:
                assert f'id="{i}"' in page, (path, i)
        o = await (await c.get("/api/v1/overview")).json()
        assert o["etcd"] is None and o["failovers"] == [] and "r0" in o["storage"]
        assert await (await c.get("/api/v1/storage")).json() == {"r0": {"alpha": {}, "beta": {}}}
        assert await (await c.get("/api/v1/ha/failovers")).json() == []
        assert await (await c.get("/api/v1/charts")).json() == {}  # no node answers
    loop.run(go())


def test_storage_actions_refuse_bad_input(web):
    loop, c, _ = web

    async def go():
        await login(c)
        h = {"X-CSRF-Token": await csrf(c)}
        r = await c.post("/api/v1/resources/r0/verify", headers=h)
        assert r.status == 400 and '{"node": "beta"}' in (await r.json())["error"]
        r = await c.post("/api/v1/resources/r0/verify", headers=h, data=b"[1")
        assert r.status == 400 and "not JSON" in (await r.json())["error"]
        r = await c.post("/api/v1/resources/r0/explode", headers=h, json={"node": "beta"})
        assert r.status == 404 and "no resource action 'explode'" in (await r.json())["error"]
        r = await c.post("/api/v1/resources/r9/verify", headers=h, json={"node": "beta"})
        assert r.status == 404 and "r9" in (await r.json())["error"]
        r = await c.post("/api/v1/resources/r0/verify", headers=h, json={"node": "gamma"})
        assert r.status == 400 and "no disk on gamma" in (await r.json())["error"]
        r = await c.post("/api/v1/resources/r0/resolve", headers=h, json={})
        assert r.status == 400 and '{"keep": "alpha"}' in (await r.json())["error"]
        # no rblock runs: the node's control API is out of reach, said as such
        r = await c.post("/api/v1/resources/r0/invalidate", headers=h, json={"node": "beta"})
        body = await r.json()
        assert r.status == 502 and body["error"].startswith("beta: cannot reach"), body
        r = await c.post("/api/v1/resources/r0/resolve", headers=h, json={"keep": "alpha"})
        assert r.status == 502, await r.json()
        r = await c.post("/api/v1/resources/r0/verify", json={"node": "beta"})  # no CSRF
        assert r.status == 403
        tasks = await (await c.get("/api/v1/tasks")).json()
        assert [(t["action"], t["resource"], t["node"], t["state"]) for t in tasks][-2:] == [
            ("invalidate", "r0", "beta", "failed"), ("resolve split brain", "r0", "alpha",
                                                     "failed")]
    loop.run(go())


def test_viewer_reads_but_cannot_act(web):
    loop, c, _ = web

    async def go():
        await login(c, "vic")
        token = await csrf(c)
        assert (await c.get("/api/v1/guests")).status == 200
        r = await c.post("/api/v1/guests/vm1/start", headers={"X-CSRF-Token": token})
        assert r.status == 403 and "vic is a viewer" in (await r.json())["error"]
        page = await (await c.get("/")).text()
        assert '"admin": false' in page.replace("admin: false", '"admin": false')
    loop.run(go())


def test_api_tokens(web):
    loop, c, users = web
    token = users.new_token("ann")
    vtoken = users.new_token("vic")

    async def go():
        auth = {"Authorization": f"Bearer {token}"}
        assert (await c.get("/api/v1/guests", headers=auth)).status == 200
        r = await c.post("/api/v1/guests/vm1/explode", headers=auth)  # no CSRF for tokens
        assert r.status == 404
        r = await c.get("/api/v1/guests", headers={"Authorization": "Bearer hvk_x_y"})
        assert r.status == 401 and "token not valid" in (await r.json())["error"]
        r = await c.post("/api/v1/guests/vm1/start", headers={"Authorization": f"Bearer {vtoken}"})
        assert r.status == 403
    loop.run(go())
    assert users.check_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


def test_login_attempts_are_limited(web):
    loop, c, _ = web

    async def go():
        for _ in range(LOGIN_ATTEMPTS_MAX):
            assert (await login(c, password="wrong password")).status == 401
        r = await login(c)  # even the right password, for a while
        assert r.status == 429 and "Too many failed logins" in await r.text()
    loop.run(go())


def test_openapi_and_events(web):
    loop, c, _ = web

    async def go():
        await login(c)
        doc = await (await c.get("/api/v1/openapi.json")).json()
        assert doc["openapi"].startswith("3.") and "/api/v1/guests/{name}/{action}" in doc["paths"]
        r = await c.get("/api/v1/events")
        assert r.headers["Content-Type"].startswith("text/event-stream")
        line = b""
        while not line.startswith(b"data: "):
            line = await r.content.readline()
        data = json.loads(line[len(b"data: "):])
        assert [g["name"] for g in data["guests"]] == ["vm1"]
        r.close()
    loop.run(go())


def test_users_file_refuses_bad_input(tmp_path):
    users = Users(tmp_path / "u.json")
    with pytest.raises(UserError, match="shorter than 8"):
        users.add("ann", "admin", "short")
    with pytest.raises(UserError, match="role 'root' is not one of admin, viewer"):
        users.add("ann", "root", PASSWORD)
    with pytest.raises(UserError, match="not allowed"):
        users.add("a b", "admin", PASSWORD)
    users.add("ann", "admin", PASSWORD)
    assert (tmp_path / "u.json").stat().st_mode & 0o777 == 0o600
    assert "argon2id" in (tmp_path / "u.json").read_text()
    assert Users(tmp_path / "u.json").verify("ann", PASSWORD).admin
    assert Users(tmp_path / "u.json").verify("bob", PASSWORD) is None


def test_console_websocket_refusals(web):
    loop, c, _ = web

    async def go():
        await login(c, "vic")
        r = await c.get("/api/v1/guests/vm1/console")
        assert r.status == 403 and "may not use a console" in (await r.json())["error"]
        await c.post("/logout", headers={"X-CSRF-Token": await csrf(c)})
        await login(c)
        r = await c.get("/api/v1/guests/vm1/console", headers={"Origin": "http://evil.example"})
        assert r.status == 403 and "another site" in (await r.json())["error"]
        r = await c.get("/api/v1/guests/vm1/console")
        assert r.status == 409 and "vm1 is not running" in (await r.json())["error"]
    loop.run(go())


def test_safety_levels():
    from hvctl.web.safety import guest_safety

    def st(role, disk, conn="Connected", pdisk="UpToDate", oos=0, fencing="etcd", repl="Established",
           pct=100.0, eta=None):
        return {"role": role, "disk": disk, "fencing": {"mode": fencing}, "peers": [
            {"node": "beta", "connection": conn, "disk": pdisk, "out_of_sync_bytes": oos,
             "replication": repl, "sync_percent": pct, "eta_s": eta}]}

    ok = {"r0": {"alpha": st("Primary", "UpToDate"), "beta": st("Secondary", "UpToDate")}}
    assert guest_safety(["r0"], ok) == {"level": "protected",
                                        "why": "r0 UpToDate on alpha and beta"}
    syncing = {"r0": {"alpha": st("Primary", "UpToDate", pdisk="Inconsistent", oos=4096,
                                  repl="SyncSource", pct=42.0, eta=7.0), "beta": {}}}
    assert guest_safety(["r0"], syncing) == {
        "level": "degraded", "why": "r0 on beta is Inconsistent, resync 42.0 %, about 7 s left"}
    cut = {"r0": {"alpha": st("Primary", "UpToDate", conn="Connecting", pdisk="DUnknown")}}
    assert guest_safety(["r0"], cut)["level"] == "unprotected"
    nofence = {"r0": {"alpha": st("Primary", "UpToDate", fencing="none")}}
    assert "fencing is off" in guest_safety(["r0"], nofence)["why"]
    assert guest_safety(["r0", "r1"], {**ok, "r1": {}}) == {
        "level": "unprotected", "why": "r0 UpToDate on alpha and beta; r1: no node answers"}


def test_totp_second_factor_and_users_file_read_again(web, tmp_path):
    from hvctl.web import totp

    loop, c, users = web
    other = Users(users.path)  # what `hvctl web totp ann` does, from another process
    secret = other.set_totp("ann")
    other.add("newbie", "viewer", PASSWORD)

    async def go():
        r = await login(c)  # the server's Users sees the change without a restart
        assert r.status == 401 and "one-time code" in await r.text()
        r = await c.post("/login", data={"user": "ann", "password": PASSWORD,
                                         "code": "000000"}, allow_redirects=False)
        assert r.status == 401
        code = totp.code_at(secret, __import__("time").time())
        r = await c.post("/login", data={"user": "ann", "password": PASSWORD, "code": code},
                         allow_redirects=False)
        assert r.status == 302, await r.text()
        r = await c.post("/login", data={"user": "ann", "password": PASSWORD, "code": code},
                         allow_redirects=False)
        assert r.status == 401  # the same code twice: refused
        assert (await login(c, "newbie")).status == 302
    loop.run(go())
    assert other.clear_totp("ann") and not other.clear_totp("ann")
