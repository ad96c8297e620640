"""hvctl's lifecycle logic, in process: each node's libvirt is libvirt's test driver (a fake
hypervisor with private state per connection), each node's rblock is a real `rblock up`.

What is checked: where a guest runs comes from asking every node; start promotes the
resources and defines the domain on one node only; refusals leave everything as it was;
a failure after the promotion undoes it (no half-defined guest, no resource left Primary);
stop and move hand the resources over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import nbd
import pytest

from hvctl.config import load
from hvctl.controller import Controller, HvError
from tests.cluster import Cluster
from tests.hvcluster import LoopRunner, hv_config, role, shared_loop

NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>
       <cores>2</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
</node>
"""
GUEST = """[guest.vm1]
disks = ["r0"]
memory = "128M"
kernel = "/vmlinuz"
cmdline = "console=ttyS0"
"""


@pytest.fixture(scope="module")
def loop() -> LoopRunner:
    return shared_loop()


@pytest.fixture
def setup(cluster, tmp_path: Path, loop: LoopRunner):
    """A synced two-node cluster, r0 Secondary on both; a Controller whose nodes are test
    drivers. Yields (cluster, controller, config path)."""
    c: Cluster = cluster()
    c.start_fresh()
    c.rblock("alpha", "secondary", "r0")
    uris = {}
    for node in ("alpha", "beta"):
        (tmp_path / f"{node}.xml").write_text(NODE_XML)
        uris[node] = f"test://{tmp_path / f'{node}.xml'}"
    path = hv_config(c, uris, GUEST, 'stop_timeout_s = 2\ndomain_type = "auto"')
    ctl = Controller(load(path))
    yield c, ctl, path
    ctl.close()


def domains(ctl: Controller) -> dict[str, list[tuple[str, bool]]]:
    return {n: [(d.name(), bool(d.isActive())) for d in v.conn().listAllDomains()]
            for n, v in ctl.virts.items()}


def test_start_status_refuse_move_stop(setup, loop: LoopRunner) -> None:
    c, ctl, _ = setup
    msg = loop.run(ctl.start("vm1", on="alpha"))
    assert msg == "vm1 started on alpha"
    assert domains(ctl) == {"alpha": [("vm1", True)], "beta": []}
    assert role(c, "alpha") == "Primary" and role(c, "beta") == "Secondary"

    st = loop.run(ctl.guest_status("vm1"))
    assert {k: st[k] for k in ("name", "state", "node", "domain_type")} == {
        "name": "vm1", "state": "running", "node": "alpha", "domain_type": "qemu"}
    [d] = st["disks"]
    assert d["resource"] == "r0" and d["role"] == "Primary" and d["primary_on"] == ["alpha"]
    assert d["nbd"] == f"nbd://127.0.0.1:{c.ports['alpha']['nbd']}/r0"
    # the test driver has no domain capabilities: the probe says TCG and why
    probe = ctl.prober.cached(ctl.virts["alpha"])
    assert probe is not None and probe.domain_type == "qemu" and "offers no kvm" in probe.reason

    for on in ("alpha", "beta", None):
        with pytest.raises(HvError, match="already runs on alpha; stop it first"):
            loop.run(ctl.start("vm1", on=on))
    assert domains(ctl) == {"alpha": [("vm1", True)], "beta": []}

    msg = loop.run(ctl.move("vm1", "beta"))
    assert msg.startswith("vm1 moved from alpha to beta")
    assert domains(ctl) == {"alpha": [], "beta": [("vm1", True)]}
    assert role(c, "alpha") == "Secondary" and role(c, "beta") == "Primary"
    with pytest.raises(HvError, match="already runs on beta"):
        loop.run(ctl.move("vm1", "beta"))

    msg = loop.run(ctl.stop("vm1"))
    assert msg == "vm1 shut down (ACPI) on beta; r0 Secondary"
    assert domains(ctl) == {"alpha": [], "beta": [("vm1", False)]}
    assert role(c, "beta") == "Secondary"
    assert loop.run(ctl.guest_status("vm1"))["state"] == "stopped"

    # start without --on: where it is defined
    assert loop.run(ctl.start("vm1")) == "vm1 started on beta"
    assert loop.run(ctl.destroy("vm1")).startswith("vm1 destroyed on beta")
    assert loop.run(ctl.undefine("vm1")) == "vm1 undefined on beta"
    assert domains(ctl) == {"alpha": [], "beta": []}
    assert loop.run(ctl.guest_status("vm1"))["state"] == "undefined"


def test_failure_after_promotion_is_undone(setup, loop: LoopRunner) -> None:
    """libvirt refuses the definition (another domain holds the guest's UUID): the promotion
    is undone and nothing is left defined."""
    c, ctl, _ = setup
    g = ctl.cfg.guest("vm1")
    other = ctl.virts["alpha"].conn().defineXML(
        f"<domain type='test'><name>squatter</name><uuid>{g.uuid}</uuid>"
        f"<memory>65536</memory><os><type>hvm</type></os></domain>")
    with pytest.raises(HvError, match=r"cannot start vm1 on alpha: node alpha: libvirt failed "
                                      r"defining vm1: .*squatter"):
        loop.run(ctl.start("vm1", on="alpha"))
    assert domains(ctl) == {"alpha": [("squatter", False)], "beta": []}
    assert role(c, "alpha") == "Secondary"
    other.undefine()
    assert loop.run(ctl.start("vm1", on="alpha")) == "vm1 started on alpha"


def test_refusals_name_the_reason_and_change_nothing(setup, loop: LoopRunner,
                                                     tmp_path: Path) -> None:
    c, ctl, path = setup
    from rblock.config import ConfigError

    with pytest.raises(ConfigError, match="guest 'vm9' not in .*guests: vm1"):
        loop.run(ctl.start("vm9"))
    with pytest.raises(ConfigError, match="node 'gamma' not in .*nodes: alpha, beta"):
        loop.run(ctl.start("vm1", on="gamma"))

    # A domain of the same name that hvctl does not manage is never touched.
    ctl.virts["alpha"].conn().defineXML(
        "<domain type='test'><name>vm1</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>")
    with pytest.raises(HvError, match="node alpha has a domain named vm1 that hvctl does not "
                                      "manage"):
        loop.run(ctl.start("vm1", on="alpha"))
    assert role(c, "alpha") == "Secondary"

    # rblock refuses to hand r0 over while beta's export has a client: so does hvctl.
    ctl.virts["alpha"].undefine(ctl.virts["alpha"].lookup("vm1"))
    c.rblock("beta", "primary", "r0")
    h = nbd.NBD()
    h.connect_uri(c.nbd_uri("beta"))  # returns once the handshake is done
    try:
        with pytest.raises(HvError, match=r"cannot make r0 secondary on beta: .*NBD client"):
            loop.run(ctl.start("vm1", on="alpha"))
        assert role(c, "beta") == "Primary" and role(c, "alpha") == "Secondary"
        assert domains(ctl) == {"alpha": [], "beta": []}
    finally:
        h.shutdown()


def test_unreachable_libvirt(setup, loop: LoopRunner, tmp_path: Path) -> None:
    c, _, path = setup
    text = path.read_text()
    beta_uri = f"test://{tmp_path / 'beta.xml'}"
    broken = path.with_name("broken.toml")
    broken.write_text(text.replace(beta_uri, f"test://{tmp_path / 'missing.xml'}"))
    ctl = Controller(load(broken))
    try:
        with pytest.raises(HvError, match=r"cannot start vm1: cannot ask beta whether vm1 runs "
                                          r"there .*pass --force if you are sure vm1 is not "
                                          r"running on beta"):
            loop.run(ctl.start("vm1", on="alpha"))
        assert role(c, "alpha") == "Secondary"
        with pytest.raises(HvError, match=r"cannot start vm1 on beta: .*node beta: cannot "
                                          r"reach libvirtd at test://.*missing.xml.*start "
                                          r"libvirtd on beta or fix node.beta.libvirt"):
            loop.run(ctl.start("vm1", on="beta", force=True))
        assert role(c, "beta") == "Secondary"
        st = loop.run(ctl.guest_status("vm1"))
        assert st["state"] == "unknown" and "beta" in st["unreachable"]  # beta cannot say
        assert loop.run(ctl.start("vm1", on="alpha", force=True)) == "vm1 started on alpha"
    finally:
        ctl.close()


def test_libvirt_error_handler_is_silent(capfd) -> None:
    import hvctl.virt  # noqa: F401 -- registers the handler

    with pytest.raises(libvirt.libvirtError):
        libvirt.open("test:///no/such/file.xml")
    assert "libvirt:" not in capfd.readouterr().err


def test_events_follow_libvirt(setup, loop: LoopRunner) -> None:
    """`hvctl events`: lifecycle events of every node, as libvirt reports them (no polling)."""
    _, ctl, _ = setup

    async def scenario() -> list[tuple[str, str, str]]:
        got: list[tuple[str, str, str]] = []

        async def reader() -> None:
            async for ev in ctl.events():
                got.append((ev.node, ev.domain, ev.event))
                if (ev.node, ev.event) == ("beta", "Stopped"):
                    return

        task = asyncio.get_running_loop().create_task(reader())
        await asyncio.sleep(0.1)  # let it subscribe
        await ctl.start("vm1", on="alpha")
        await ctl.move("vm1", "beta")
        await ctl.stop("vm1")
        await asyncio.wait_for(task, 10)
        return got

    got = loop.run(scenario())
    wanted = [("alpha", "vm1", "Defined"), ("alpha", "vm1", "Started"),
              ("alpha", "vm1", "Stopped"), ("beta", "vm1", "Defined"),
              ("beta", "vm1", "Started"), ("alpha", "vm1", "Undefined"),
              ("beta", "vm1", "Stopped")]
    seen = [e for e in got if e in wanted]
    # a libvirt that drops <reconnect> sees the domain defined twice (the passthrough redo)
    seen = [e for i, e in enumerate(seen) if i == 0 or e != seen[i - 1]]
    assert seen == wanted, got
