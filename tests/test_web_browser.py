"""hvctl web in a real browser (Playwright driving Debian's chromium; no browser download)
against the three simulated HA hosts of tools/ha_hosts.py with a real TCG guest, and a real
`hvctl web` process: log in, see the guest, move it with a button, watch the page follow a
host's death without a reload; a wrong password and a viewer are refused. Screenshots go to
build/screenshots/ (docs/web-*.png are copies of the best, made by hand)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest

from tests.cluster import REPO, free_ports

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "build" / "screenshots"
PASSWORD = "correct horse"
UI_TIMEOUT_MS = 60_000
RESYNC_RATE = "4M"  # r1's: 64 MiB in 16 s at the start, WRITE_MIB in ~6 s after a reconnect
WRITE_MIB = 24
# xterm.js draws only the rows on screen: the whole scrollback, as text
TERMINAL_TEXT = """() => { const b = term.buffer.active, out = [];
    for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
    return out.join("\\n"); }"""


@pytest.fixture
def ha_web(tmp_path_factory):
    from tools.build_guest import build_guest
    from tools.ha_hosts import HaHosts, guest_toml
    from tools.libvirt_hosts import LibvirtHostUnavailable, check_requirements
    from tools.netns_hosts import NetHostsUnavailable
    from tools.netns_hosts import check_requirements as net_requirements

    try:
        check_requirements()
        net_requirements()
        if not os.path.exists(CHROMIUM):
            raise LibvirtHostUnavailable(f"{CHROMIUM} missing; apt-get install chromium")
        import playwright  # noqa: F401
    except (LibvirtHostUnavailable, NetHostsUnavailable, ImportError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    img = build_guest(REPO / "build" / "guest")
    # r1: no guest uses it; its slow resync is the progress bar the storage page shows
    ha = HaHosts(tmp_path_factory.mktemp("haweb"),
                 guest_toml(img.kernel, img.initrd, f"web-{uuid.uuid4().hex[:8]}"),
                 resources=("r0", "r1"), resync_rates={"r1": RESYNC_RATE})
    web = None
    try:
        ha.start()
        ha.start_agents()
        for name, role in (("ann", "admin"), ("vic", "viewer")):
            subprocess.run([sys.executable, "-m", "hvctl", "--config", str(ha.config), "web",
                            "adduser", name, "--role", role, "--password-stdin"],
                           input=PASSWORD + "\n", text=True, check=True, cwd=REPO,
                           capture_output=True)
        port = free_ports(1)[0]
        log = (ha.dir / "web.log").open("wb")
        web = subprocess.Popen([sys.executable, "-m", "hvctl", "--config", str(ha.config),
                                "web", "--listen", f"127.0.0.1:{port}"], stdout=log,
                               stderr=subprocess.STDOUT, cwd=REPO)
        ha.wait(lambda: "serving" in (ha.dir / "web.log").read_text(), "hvctl web up", 30)
        yield ha, f"http://127.0.0.1:{port}"
    finally:
        if web is not None:
            web.terminate()
            web.wait(20)
        ha.stop()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def row(page, guest: str):
    return page.locator(f'#guests tr[data-guest="{guest}"]')


def node_row(page, node: str):
    return page.locator(f'#nodes tr[data-node="{node}"]')


def login(page, base: str, user: str, password: str = PASSWORD) -> None:
    page.goto(base + "/")
    assert page.url.endswith("/login")
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_log_in_move_and_watch_a_failover_live(ha_web):
    from playwright.sync_api import expect, sync_playwright

    ha, base = ha_web
    ha.wait(lambda: "LOOP 2 ok" in ha.console("vm1").read_text(errors="replace"),
            "vm1 booted", 90)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("dialog", lambda d: d.accept())  # the action confirmations

            login(page, base, "ann", "wrong password")
            expect(page.get_by_role("alert")).to_contain_text(
                "Wrong user name, password or one-time code")
            shot(page, "login-refused")

            login(page, base, "ann")
            expect(row(page, "vm1")).to_contain_text("running", timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1").locator("td").nth(2)).to_have_text("alpha")
            expect(node_row(page, "alpha")).to_contain_text("online", timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1").locator("td").nth(4).locator("span")).to_have_text(
                "protected", timeout=UI_TIMEOUT_MS)
            expect(page.locator('#storage tr[data-resource="r0@beta"]')).to_contain_text(
                "Secondary")
            expect(node_row(page, "alpha")).to_contain_text(
                "yes, with a failover: vm1 would move to beta", timeout=UI_TIMEOUT_MS)
            expect(page.get_by_role("button", name="maintenance on for beta")).to_be_visible()
            shot(page, "dashboard")

            # The serial console in the page: the guest's loop prints there as it runs.
            page.get_by_role("button", name="console of vm1").click()
            expect(page.locator("#console .xterm-rows")).to_contain_text(
                re.compile(r"LOOP \d+ ok"), timeout=UI_TIMEOUT_MS)
            shot(page, "console")
            page.get_by_role("button", name="Close the console").click()

            # Stop it, then Start it: the console opens first and shows the boot's lines.
            page.get_by_role("button", name="stop vm1").click()
            expect(page.locator("#result")).to_contain_text("vm1 stopped", timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1")).to_contain_text("stopped", timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="start vm1").click()
            page.wait_for_function(f"({TERMINAL_TEXT})().includes('GUEST-START')",
                                   timeout=UI_TIMEOUT_MS)
            page.wait_for_function(f"/PEEK:web-/.test(({TERMINAL_TEXT})())",
                                   timeout=UI_TIMEOUT_MS)
            expect(page.locator("#result")).to_contain_text("vm1 started on alpha",
                                                            timeout=UI_TIMEOUT_MS)
            shot(page, "console-boot")
            page.get_by_role("button", name="Close the console").click()

            # Move with a button: ACPI on alpha, then a start on beta, through the agents.
            page.get_by_role("button", name="move vm1 to beta").click()
            expect(page.locator("#result")).to_contain_text("vm1 started on beta",
                                                            timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1").locator("td").nth(2)).to_have_text(
                "beta", timeout=UI_TIMEOUT_MS)

            # The storage page: beta's r1 disconnected with a button, 24 MiB written on
            # alpha meanwhile, connected again: the resync's progress bar advances.
            page.get_by_role("link", name="Storage").click()
            ha.rblock("alpha", "primary", "r1")
            r1 = lambda n: page.locator(f'#storage tr[data-resource="r1@{n}"]')  # noqa: E731
            expect(r1("alpha")).to_contain_text("Primary", timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="disconnect r1 on beta").click()
            expect(r1("beta")).to_contain_text("standalone", timeout=UI_TIMEOUT_MS)
            subprocess.run(ha.net["alpha"].argv([
                "qemu-io", "-f", "raw", "-c", f"write -P 0xab 0 {WRITE_MIB}M",
                ha.res("alpha", "r1")["nbd"]]), check=True, capture_output=True, timeout=60)
            expect(r1("alpha")).to_contain_text(f"{WRITE_MIB}.0 MiB", timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="connect r1 on beta").click()
            bar = page.get_by_role("progressbar", name="resync of r1 on alpha")
            expect(bar).to_be_visible(timeout=UI_TIMEOUT_MS)
            first = float(bar.get_attribute("value"))
            page.wait_for_function(
                """([sel, v]) => { const b = document.querySelector(sel);
                    return b && parseFloat(b.value) > v; }""",
                arg=['progress[aria-label="resync of r1 on alpha"]', first],
                timeout=UI_TIMEOUT_MS)
            # ... and r1's chart on alpha draws the resync's rate from alpha's counters
            expect(page.locator('figure[data-chart="r1@alpha"] p')).to_contain_text(
                re.compile(r"resync [1-9][\d.]* MiB/s"), timeout=UI_TIMEOUT_MS)
            shot(page, "storage-resync")
            expect(bar).to_have_count(0, timeout=UI_TIMEOUT_MS)  # done
            expect(r1("beta")).to_contain_text("UpToDate")
            ha.rblock("alpha", "secondary", "r1")
            page.get_by_role("link", name="Dashboard").click()
            expect(row(page, "vm1").locator("td").nth(2)).to_have_text("beta",
                                                                      timeout=UI_TIMEOUT_MS)
            page.evaluate("window.notReloaded = true")

            # beta dies: the page shows it lost and vm1 running on alpha again, live.
            ha.crash("beta")
            expect(node_row(page, "beta")).to_contain_text(re.compile("lost|fenced"),
                                                           timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1").locator("td").nth(2)).to_have_text(
                "alpha", timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1")).to_contain_text("running", timeout=UI_TIMEOUT_MS)
            expect(row(page, "vm1").locator("td").nth(4).locator("span")).to_have_text(
                "unprotected", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#ha-log")).to_contain_text("recovering on alpha")
            expect(node_row(page, "alpha")).to_contain_text("no: vm1 would stop",
                                                            timeout=UI_TIMEOUT_MS)
            assert page.evaluate("window.notReloaded") is True  # never reloaded
            shot(page, "failover")

            # The nodes page: beta lost, its etcd member silent, quorum kept by 2 of 3.
            page.get_by_role("link", name="Nodes").click()
            expect(node_row(page, "beta")).to_contain_text(re.compile("lost|fenced"))
            expect(page.locator("#etcd-quorum")).to_contain_text(
                "quorum: 2 of 3 etcd members up", timeout=UI_TIMEOUT_MS)
            expect(page.locator('#etcd tr[data-member="beta"]')).to_contain_text("unreachable")
            expect(page.locator('#etcd tr[data-member="witness"]')).to_contain_text("online")
            expect(page.locator('#leases tr[data-lease="alpha"]')).to_contain_text("online")
            shot(page, "nodes")
            page.get_by_role("link", name="Guests").click()
            expect(row(page, "vm1")).to_contain_text("running", timeout=UI_TIMEOUT_MS)
            shot(page, "guests")

            # The tasks page: who did what, and the failover with how long it took.
            page.get_by_role("link", name="Tasks").click()
            expect(page.locator("#failovers tr").first).to_contain_text(
                re.compile(r"vm1\s*beta\s*alpha\s*[\d.]+ s\s*started"), timeout=UI_TIMEOUT_MS)
            tasks = page.locator("#tasks")
            for text in ("ann", "move", "vm1 on beta", "disconnect", "r1 on beta", "done"):
                expect(tasks).to_contain_text(text)
            shot(page, "tasks")

            # A viewer sees everything, has no action buttons, and the API refuses it.
            viewer = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            login(viewer, base, "vic")
            expect(row(viewer, "vm1")).to_contain_text("running", timeout=UI_TIMEOUT_MS)
            assert viewer.get_by_role("button", name=re.compile("move vm1")).count() == 0
            status, body = viewer.evaluate("""async () => {
                const r = await fetch('/api/v1/guests/vm1/stop', {method: 'POST',
                    headers: {'X-CSRF-Token': window.HVCTL.csrf}});
                return [r.status, await r.json()]; }""")
            assert status == 403 and "vic is a viewer" in body["error"], body
            shot(viewer, "viewer-phone")
        finally:
            browser.close()
