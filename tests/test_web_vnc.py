"""The guest's screen (hvctl/web/vnc.py): the one-time tickets and the websocket proxy
in-process, against libvirt's test:///default driver running a guest whose VNC port is a fake
VNC server of the test (the test driver starts no QEMU); then the real thing in a browser:
noVNC in chromium showing a real TCG guest's VGA console through `hvctl web`."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from hvctl.config import load
from hvctl.domain import DomainSpec, NbdDisk, build_xml
from hvctl.web import vnc
from hvctl.web.app import make_app
from hvctl.web.users import Users
from tests.cluster import REPO, free_ports
from tests.hvcluster import shared_loop
from tests.test_web_api import PASSWORD, csrf, login

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
    [node.beta.disk]
    r0 = "b/r0.img"
    [guest.vm1]
    disks = ["r0"]
    domain_type = "qemu"
    graphics = "vnc"
    [guest.vm2]
    disks = ["r0"]
    domain_type = "qemu"
    [guest.vm3]
    disks = ["r0"]
    domain_type = "qemu"
    graphics = "vnc"
    """)
RFB_HELLO = b"RFB 003.008\n"
WS_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}


@pytest.fixture
def screen(tmp_path: Path):
    """(loop, client, users, make_client): ann and vic, vm1 running on alpha (test driver)
    with its VNC port at a fake VNC server that says hello and echoes; vm2 has no graphics;
    vm3 has graphics but is not running."""
    cfgfile = tmp_path / "cluster.toml"
    cfgfile.write_text(CONFIG.format(*free_ports(6)))
    cfg = load(cfgfile)
    users = Users(tmp_path / "users.json")
    users.add("ann", "admin", PASSWORD)
    users.add("vic", "viewer", PASSWORD)
    loop = shared_loop()

    async def fake_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(RFB_HELLO)
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = loop.run(asyncio.start_server(fake_vnc, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    g = cfg.guest("vm1")
    root = ET.fromstring(build_xml(DomainSpec(g, "alpha", "qemu", (NbdDisk("r0", "127.0.0.1",
                                                                           10809),))))
    gfx = root.find("devices/graphics")
    gfx.set("port", str(port))  # what autoport gives a real QEMU; the test driver keeps it
    gfx.set("autoport", "no")
    conn = libvirt.open("test:///default")  # open throughout: the test driver's state lives
    dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
    dom.create()
    clients: list[TestClient] = []

    async def make_client() -> TestClient:
        """Another client of the same server (its own cookies: another browser)."""
        c = TestClient(clients[0].server if clients else TestServer(make_app(cfg, users)),
                       loop=loop.loop)
        await c.start_server()
        clients.append(c)
        return c

    c = loop.run(make_client())
    try:
        yield loop, c, users, make_client
    finally:
        for x in reversed(clients):
            loop.run(x.close())
        dom.destroy()
        dom.undefine()
        conn.close()
        server.close()
        loop.run(server.wait_closed())


async def ticket(c: TestClient, guest: str = "vm1", headers: dict | None = None):
    h = headers if headers is not None else {"X-CSRF-Token": await csrf(c)}
    return await c.post(f"/api/v1/guests/{guest}/vnc", headers=h)


async def refused(c: TestClient, url: str, **headers: str) -> tuple[int, str]:
    """A websocket handshake that the server refuses: its status and JSON error."""
    r = await c.get(url, headers={**WS_HEADERS, **headers})
    assert r.status != 101, url
    return r.status, (await r.json())["error"]


def test_a_ticket_opens_the_screen_once(screen):
    loop, c, _, _ = screen

    async def go():
        await login(c)
        o = await (await c.get("/api/v1/overview")).json()
        assert {g["name"]: g["graphics"] for g in o["guests"]} == {
            "vm1": "vnc", "vm2": None, "vm3": "vnc"}
        r = await ticket(c)
        assert r.status == 200, await r.text()
        t = await r.json()
        assert t["url"] == f"/api/v1/vnc/{t['ticket']}" and t["expires_in_s"] == vnc.TICKET_TTL_S
        assert len(t["ticket"]) >= 40
        ws = await c.ws_connect(t["url"])
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.BINARY and msg.data == RFB_HELLO
        await ws.send_bytes(b"RFB 003.008\n\x01")
        msg = await ws.receive(timeout=5)
        assert msg.data == b"RFB 003.008\n\x01"  # through to the VNC server and back
        await ws.close()
        assert await refused(c, t["url"]) == (
            403, "VNC ticket already used (each opens one screen); ask for a new one (POST "
                 "/api/v1/guests/NAME/vnc; the page's Screen button)")
        status, error = await refused(c, "/api/v1/vnc/made-up")
        assert status == 404 and error.startswith("VNC ticket not known; ask for a new one")
        # a second ticket works as the first did: one each time
        ws = await c.ws_connect((await (await ticket(c)).json())["url"])
        assert (await ws.receive(timeout=5)).data == RFB_HELLO
        await ws.close()
    loop.run(go())


def test_expired_tickets_then_forgotten(screen):
    loop, c, _, _ = screen

    async def go():
        await login(c)
        t = await (await ticket(c)).json()
        tickets = c.server.app[vnc.TICKETS]
        tickets.by_id[t["ticket"]].expires_s = time.monotonic() - 1  # issued 31 s ago
        assert await refused(c, t["url"]) == (
            403, f"VNC ticket expired ({vnc.TICKET_TTL_S:g} s); ask for a new one (POST "
                 "/api/v1/guests/NAME/vnc; the page's Screen button)")
        t = await (await ticket(c)).json()
        tickets.by_id[t["ticket"]].expires_s = time.monotonic() - 2 * vnc.TICKET_TTL_S
        assert (await refused(c, t["url"]))[0] == 404  # long gone
        assert t["ticket"] not in tickets.by_id
    loop.run(go())


def test_a_ticket_is_for_its_login_and_this_site_only(screen):
    loop, c, _, make_client = screen

    async def go():
        await login(c)
        t = await (await ticket(c)).json()
        status, error = await refused(c, t["url"], Origin="http://evil.example")
        assert status == 403 and "another site (http://evil.example)" in error
        other = await make_client()  # ann again, in another browser: another session
        await login(other)
        status, error = await refused(other, t["url"])
        assert status == 403 and "issued to another login" in error
        status, error = await refused(c, t["url"])  # burnt by that attempt
        assert status == 403 and "already used" in error
        t = await (await ticket(c)).json()
        r = await c.get(t["url"])  # not a websocket: refused, the ticket still good
        assert r.status == 400 and "new WebSocket" in (await r.json())["error"]
        ws = await c.ws_connect(t["url"], headers={"Origin": str(c.make_url("")).rstrip("/")})
        assert (await ws.receive(timeout=5)).data == RFB_HELLO
        await ws.close()
    loop.run(go())


def test_refusals(screen):
    loop, c, users, _ = screen

    async def go():
        await login(c, "vic")
        r = await ticket(c)
        assert r.status == 403 and "vic is a viewer" in (await r.json())["error"]
        status, error = await refused(c, "/api/v1/vnc/anything")
        assert status == 403 and "vic is a viewer and may not use a guest's screen" in error
        await c.post("/logout", headers={"X-CSRF-Token": await csrf(c)})
        await login(c)
        r = await ticket(c, headers={})  # no CSRF header
        assert r.status == 403 and "CSRF" in (await r.json())["error"]
        r = await ticket(c, headers={"X-CSRF-Token": "forged"})
        assert r.status == 403
        r = await ticket(c, "vm2")
        body = await r.json()
        assert r.status == 409 and body["error"].startswith(
            'guest vm2 has no graphics; set graphics = "vnc" in [guest.vm2] of '), body
        r = await ticket(c, "vm3")
        assert r.status == 409 and "vm3 is not running" in (await r.json())["error"]
        r = await ticket(c, "nope")
        assert r.status == 404 and "guest 'nope' not in" in (await r.json())["error"]
        r = await c.get("/api/v1/guests/vm1/vnc")  # the ticket is a POST
        assert r.status in (404, 405)
        doc = await (await c.get("/api/v1/openapi.json")).json()
        assert "post" in doc["paths"]["/api/v1/guests/{name}/vnc"]
        assert "get" in doc["paths"]["/api/v1/vnc/{ticket}"]
        # an API token gets a ticket (no CSRF) for a websocket with that token
        auth = {"Authorization": f"Bearer {users.new_token('ann')}"}
        t = await (await ticket(c, headers=auth)).json()
        status, error = await refused(c, t["url"])  # ann's cookie: another login
        assert status == 403 and "another login" in error
        t = await (await ticket(c, headers=auth)).json()
        ws = await c.ws_connect(t["url"], headers=auth)
        assert (await ws.receive(timeout=5)).data == RFB_HELLO
        await ws.close()
    loop.run(go())


def test_outstanding_tickets_are_bounded(screen, monkeypatch):
    loop, c, _, _ = screen
    monkeypatch.setattr(vnc, "TICKETS_MAX", 3)

    async def go():
        await login(c)
        for _ in range(3):
            assert (await ticket(c)).status == 200
        r = await ticket(c)
        assert r.status == 429 and "3 VNC tickets are outstanding" in (await r.json())["error"]
    loop.run(go())


# --- in a browser -----------------------------------------------------------------------------

BOOT_TIMEOUT_S = 90.0
WEB_STOP_TIMEOUT_S = 5.0


@pytest.fixture
def screen_web(tmp_path_factory, rblock_serve):
    """One simulated host (tools/libvirt_hosts.py: a libvirtd of its own, in our network
    namespace) running a real TCG guest with graphics = "vnc", its disk an `rblock serve`
    export; and a real `hvctl web` over a cluster file whose alpha is that host. The guest is
    defined and started directly through libvirt with hvctl's own domain XML: hvctl's start
    would need two rblock nodes, and the screen does not care how the guest was started."""
    from tests.test_web_browser import CHROMIUM
    from tools.build_guest import build_guest, find_inputs
    from tools.libvirt_hosts import LibvirtHostUnavailable, check_requirements, hosts
    from tools.procs import stop_by_pid

    try:
        check_requirements()
        if not os.path.exists(CHROMIUM):
            raise LibvirtHostUnavailable(f"{CHROMIUM} missing; apt-get install chromium")
        import playwright  # noqa: F401
    except (LibvirtHostUnavailable, ImportError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    img = build_guest(REPO / "build" / "guest")
    # The bzImage, not build_guest's vmlinux: booted through PVH (vmlinux), the kernel is
    # told of no VGA text screen and leaves it blank; through the BIOS it writes its log there.
    bzimage = find_inputs().bzimage
    work = tmp_path_factory.mktemp("screen")
    os.chmod(work, 0o755)
    disk = work / "r0.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    export = rblock_serve(f"r0={disk}")
    nbd_port = int(export.uris[0].rsplit(":", 1)[1].split("/")[0])
    ports = free_ports(5)
    cfgfile = work / "cluster.toml"
    cfgfile.write_text(textwrap.dedent(f"""\
        [hvctl]
        state_dir = "state"
        domain_type = "qemu"
        [resource.r0]
        size = "64M"
        secret = "s"
        [node.alpha]
        replication = "127.0.0.1:{ports[0]}"
        control = "127.0.0.1:{ports[1]}"
        nbd = "127.0.0.1:{nbd_port}"
        libvirt = "LIBVIRT_URI"
        [node.alpha.disk]
        r0 = "a/r0.img"
        [node.beta]
        replication = "127.0.0.1:{ports[2]}"
        control = "127.0.0.1:{ports[3]}"
        nbd = "127.0.0.1:{ports[4]}"
        [node.beta.disk]
        r0 = "b/r0.img"
        [guest.vm1]
        disks = ["r0"]
        memory = "128M"
        kernel = "{bzimage}"
        initrd = "{img.initrd}"
        cmdline = "console=tty0 console=ttyS0 panic=-1 rblock.hold=1"
        console_log = "{work}/vm1.log"
        graphics = "vnc"
        """))
    web = None
    with hosts(work / "hosts", ["alpha"]) as hv:
        cfgfile.write_text(cfgfile.read_text().replace("LIBVIRT_URI", hv["alpha"].uri))
        g = load(cfgfile).guest("vm1")
        conn = hv["alpha"].connect()
        try:
            # passthrough: this libvirt (9.0) drops the native form's <reconnect>
            dom = conn.defineXML(build_xml(DomainSpec(
                g, "alpha", "qemu", (NbdDisk("r0", "127.0.0.1", nbd_port),), "passthrough")))
            dom.create()
            subprocess.run([sys.executable, "-m", "hvctl", "--config", str(cfgfile), "web",
                            "adduser", "ann", "--role", "admin", "--password-stdin"],
                           input=PASSWORD + "\n", text=True, check=True, cwd=REPO,
                           capture_output=True)
            port = free_ports(1)[0]
            log = work / "web.log"
            web = subprocess.Popen([sys.executable, "-m", "hvctl", "--config", str(cfgfile),
                                    "web", "--listen", f"127.0.0.1:{port}"],
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
            deadline = time.monotonic() + 30
            while "serving" not in log.read_text():
                assert web.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}", work
        finally:
            if web is not None:
                # SIGKILL after WEB_STOP_TIMEOUT_S: a server-sent-events stream whose
                # overview does not change never writes, so it misses that its page is
                # gone, and aiohttp's shutdown waits for it (60 s)
                stop_by_pid(web, signal.SIGTERM, WEB_STOP_TIMEOUT_S)
            conn.close()


CANVAS_COLOURS_JS = """() => {
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width || !c.height) return 0;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length && seen.size < 16; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    return seen.size;
}"""


@pytest.mark.slow
def test_the_screen_shows_the_guests_vga_console(screen_web):
    from playwright.sync_api import expect, sync_playwright

    from tests.test_web_browser import CHROMIUM, UI_TIMEOUT_MS, row, shot
    from tests.test_web_browser import login as page_login

    base, work = screen_web
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    console = work / "vm1.log"
    while "GUEST-DONE" not in (console.read_text(errors="replace") if console.exists() else ""):
        assert time.monotonic() < deadline, "vm1 did not boot"
        time.sleep(0.2)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page_login(page, base, "ann")
            expect(row(page, "vm1")).to_contain_text("running", timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="screen of vm1").click()
            expect(page.locator("#screen-status")).to_contain_text("connected: keys go to vm1",
                                                                   timeout=UI_TIMEOUT_MS)
            # the kernel's log on the VGA text console, grey letters on black: two colours
            # in the canvas (noVNC's framebuffer, before CSS scales it); one is a blank screen
            page.wait_for_function(f"({CANVAS_COLOURS_JS})() >= 2", timeout=UI_TIMEOUT_MS)
            assert page.evaluate("document.activeElement.tagName") == "CANVAS"  # keys go there
            expect(page.get_by_role("button", name="Send Ctrl+Alt+Del")).to_be_visible()
            page.locator("#screen-card").scroll_into_view_if_needed()
            shot(page, "screen")
            page.get_by_role("button", name="Close the screen").click()
            expect(page.locator("#screen-card")).to_be_hidden()
            assert errors == [], errors
        finally:
            browser.close()
