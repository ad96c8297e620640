"""`make demo`: rblock with real clients, on localhost, under build/demo; nothing is left running.

One function per stage, run in order by main():

1. `stage_serve()`: `rblock serve` exports a sparse image; qemu-io and nbdinfo use it.
2. `stage_replication(c)`: a two-node cluster from examples/two-nodes.toml (tools/cluster_demo.py):
   create-md, both daemons up, the first promotion and its full sync, writes through the
   primary's export, both backing files identical, roles switched, the data read back
   through the new primary.
3. `stage_guest(c)`: two simulated hypervisor hosts (a libvirtd each, tools/libvirt_hosts.py),
   hvctl starts a TCG guest whose disk is r0 on alpha, shows its status and rblock's, is
   refused a second start on beta, moves it to beta (where it reads back what it wrote on
   alpha) and stops it. Needs root (mount namespaces); skipped with the reason otherwise.
4. `stage_stop(c)`: SIGTERM to both daemons, their exit status and last log lines.
5. `stage_fencing()`: a one-member etcd and a fresh fenced cluster: alpha Primary, killed
   (SIGKILL); beta's promotion is refused while alpha's lease lives, then succeeds; the time
   from the kill to the promotion is printed.
6. `stage_ha()`: three simulated hosts in network namespaces (tools/ha_hosts.py): alpha and
   beta (etcd, rblock, libvirtd, hvctl agent each) and a witness (etcd); an HA guest runs on
   alpha; alpha's power fails (its traffic dropped, every process SIGKILLed); the time until
   the guest's marker appears on beta's console is printed, then `hvctl ha status` and
   `hvctl ha log`; alpha comes back and resyncs, the guest stays on beta. Needs root.
7. `stage_web(cfg)`: `hvctl web` on that cluster: the page's URL and a login printed; it
   serves until Ctrl-C when run in a terminal (CI=true: it stops by itself).

Stages that need the cluster take it as an argument and leave it running, so a later stage
slots in before `stage_stop` (a libvirt guest on the primary's export, say). `--keep` leaves
the nodes running at the end instead, with their PIDs printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools` as a package

from tools import etcd_local  # noqa: E402 -- after the path fix
from tools.build_guest import GuestImage, build_guest  # noqa: E402 -- after the path fix
from tools.cluster_demo import (  # noqa: E402 -- after the path fix above
    REPO,
    RESOURCE,
    DemoCluster,
    cluster,
    run,
    shown,
    step,
)
from tools.procs import stop_by_pid  # noqa: E402 -- after the path fix

WORK = REPO / "build" / "demo"
GUEST_DIR = REPO / "build" / "guest"  # built once from Debian's packages, reused afterwards
GUEST_BOOT_TIMEOUT_S = 90.0
IMAGE_SIZE = "256M"
START_TIMEOUT_S = 20.0
SYNC_SHOW_S = 0.3  # after the promotion: let the full sync start before showing it


# --- 1. rblock serve ------------------------------------------------------------------------------


def start_server(image: Path) -> tuple[subprocess.Popen, str]:
    out = WORK / "serve.out"
    cmd = [sys.executable, "-m", "rblock", "serve", str(image), "--export", "demo",
           "--create", "--size", IMAGE_SIZE, "--listen", "127.0.0.1:0"]
    print("$ " + " ".join(["rblock", *map(shown, cmd[3:])]), flush=True)
    with out.open("w") as o, (WORK / "serve.log").open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            lines = out.read_text().splitlines()
            if "ready" in lines:
                return proc, lines[0]
            if proc.poll() is not None:
                sys.exit(f"rblock serve failed:\n{(WORK / 'serve.log').read_text()}")
            time.sleep(0.05)
        sys.exit("rblock serve did not start")
    except BaseException:  # not ready, or Ctrl-C while waiting: stop it by PID
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        raise


def stage_serve() -> None:
    image = WORK / "disk.img"
    image.unlink(missing_ok=True)
    step(f"Serve a fresh sparse {IMAGE_SIZE} image over NBD")
    proc, uri = start_server(image)
    print(f"serving {uri} (pid {proc.pid})")
    try:
        step("Write two patterns with qemu-io (one with FUA), then read them back")
        run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M",
            "-c", "write -f -P 0xcd 4M 64k", "-c", "flush")
        run("qemu-io", "-f", "raw", uri, "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 4M 64k",
            "-c", "read -P 0 8M 1M")
        step("What the export offers (nbdinfo)")
        run("nbdinfo", uri)
        step("Which parts hold data (nbdinfo --map: the rest is still a hole)")
        run("nbdinfo", "--map", uri)
        host_port = uri.split("/")[2]
        host, port = host_port.rsplit(":", 1)
        step("How to connect")
        print(f"""  nbdinfo {uri}
  qemu-img info {uri}
  qemu-system-x86_64 ... -drive driver=nbd,host={host},port={port},export=demo,if=none,\
id=d0,cache.direct=on -device virtio-blk-pci,drive=d0
  libvirt: <disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>
             <source protocol='nbd' name='demo'><host name='{host}' port='{port}'/></source>
             <target dev='vda' bus='virtio'/></disk>
  run it yourself: .venv/bin/rblock serve {shown(image)} --listen 127.0.0.1:10809""")
    finally:
        step("Stop the server (SIGTERM: finish in-flight requests, flush, exit 0)")
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(30)
        print(f"rblock serve exited {rc}")
        print((WORK / "serve.log").read_text().rstrip())
    if rc:
        sys.exit(f"rblock serve exited {rc}")


# --- 2. two nodes -------------------------------------------------------------------------------


def stage_replication(c: DemoCluster) -> None:
    alpha, beta = "alpha", "beta"
    step(f"A replicated disk: resource {RESOURCE} on nodes alpha and beta "
         f"({shown(c.config_path)}, a copy of examples/two-nodes.toml)")
    run("grep", "-E", r"^\[|^(size|protocol|replication|control|nbd|r0) =", c.config_path)

    step("Initialise each node's metadata (and a sparse backing file)")
    c.create_md()

    step("Start both daemons (each would run in its own terminal, or under systemd)")
    c.up(alpha)
    c.up(beta)
    c.wait_connected()
    c.rblock(alpha, "status")

    step("First promotion: fresh data needs --force; alpha becomes the full sync's source")
    c.rblock(alpha, "primary", RESOURCE, "--force")
    time.sleep(SYNC_SHOW_S)
    c.rblock(alpha, "status")  # usually mid-sync: SyncSource, percent done, rate, ETA
    c.wait_synced()
    c.rblock(alpha, "status")

    step("Only the primary serves the export; the secondary names it")
    run("qemu-io", "-f", "raw", c.nbd_uri(beta), "-c", "read 0 4k", check=False)

    step("Write through alpha's export: every write is on both nodes before it is answered")
    run("qemu-io", "-f", "raw", c.nbd_uri(alpha), "-c", "write -P 0xab 0 4M",
        "-c", "write -f -P 0xcd 100M 1M", "-c", "flush")
    sums = run("sha256sum", shown(c.disk(alpha)), shown(c.disk(beta))).stdout.split()[0::2]
    if len(set(sums)) != 1:
        sys.exit("the two backing files differ")
    print("the two backing files are identical")

    step("Switch roles: alpha Secondary, beta Primary")
    c.rblock(alpha, "secondary", RESOURCE)
    c.rblock(beta, "primary", RESOURCE)
    step("Read the data back through beta's export")
    run("qemu-io", "-f", "raw", c.nbd_uri(beta), "-c", "read -P 0xab 0 4M",
        "-c", "read -P 0xcd 100M 1M", "-c", "read -P 0 200M 1M")
    c.rblock(beta, "status")


# --- 3. a guest through libvirt ------------------------------------------------------------------


def hvctl(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "hvctl", "--config", config, *args, check=check,
               show_as=["hvctl", "--config", shown(config), *args], timeout_s=180)


def hvctl_config(c: DemoCluster, uris: dict[str, str], guest: GuestImage, marker: str) -> Path:
    """The cluster file plus each node's libvirt URI, an [hvctl] table and guest vm1."""
    lines = [ln for ln in c.config_path.read_text().splitlines()
             if not ln.strip().startswith("libvirt =")]
    text = "\n".join(lines) + "\n"
    for node, uri in uris.items():
        text = text.replace(f"[node.{node}.disk]", f'libvirt = "{uri}"\n[node.{node}.disk]')
    path = c.dir / "cluster-hvctl.toml"
    path.write_text(f"""[hvctl]
state_dir = "../hvctl-state"  # console logs and the KVM probe's cache (kept between runs)
stop_timeout_s = 20

{text}
[guest.vm1]
disks = ["r0"]
memory = "256M"
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
# the test guest: print sector 0, write a marker there, then wait for the power button
cmdline = "console=ttyS0 panic=-1 quiet rblock.peek=1 rblock.write={marker} rblock.hold=1"
""")
    return path


def wait_console(log: Path, text: str, after: int = 0) -> None:
    deadline = time.monotonic() + GUEST_BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace")[after:]:
            return
        time.sleep(0.1)
    raise SystemExit(f"the guest did not print {text!r} within {GUEST_BOOT_TIMEOUT_S:.0f} s")


def stage_guest(c: DemoCluster) -> None:
    from tools.libvirt_hosts import LibvirtHostUnavailable, check_requirements, hosts

    step("A guest on the replicated disk, through libvirt (hvctl)")
    try:
        check_requirements()
    except LibvirtHostUnavailable as e:
        print(f"skipped: {e}")
        return
    image = build_guest(GUEST_DIR)
    print(f"guest: {shown(image.kernel)} + {shown(image.initrd)} (busybox initramfs; built "
          "once from Debian's linux-image-amd64 and busybox-static)")
    step("Two simulated hypervisor hosts on this machine: one libvirtd each, in its own "
         "mount namespace")
    with hosts(WORK / "hosts", ["alpha", "beta"]) as hv:
        for name, host in hv.items():
            print(f"{name}: {host.uri}")
        marker = f"written-on-alpha-{int(time.time())}"
        config = hvctl_config(c, {n: h.uri for n, h in hv.items()}, image, marker)
        log = WORK / "hvctl-state" / "console" / "vm1.log"
        log.unlink(missing_ok=True)
        print(f"hvctl reads the same cluster file plus [hvctl], [guest.vm1] and each node's "
              f"libvirt URI: {shown(config)}")
        hvctl(config, "node", "list")

        step("Start vm1 on alpha: r0 goes Primary there (beta hands it over), the domain type "
             "is probed once (kvm if a KVM guest really boots, else TCG), the guest boots")
        hvctl(config, "-v", "guest", "start", "vm1", "--on", "alpha")
        wait_console(log, f"WROTE:{marker}")
        hvctl(config, "guest", "status", "vm1")
        c.rblock("alpha", "status")
        run("grep", "-aE", "WROTE|DISK", shown(log))

        step("It runs on alpha, so starting it on beta is refused")
        hvctl(config, "guest", "start", "vm1", "--on", "beta", check=False)

        step("Move it to beta: ACPI shutdown on alpha, r0 handed over, boot on beta; the guest "
             "reads sector 0 first and finds what it wrote on alpha")
        offset = log.stat().st_size
        hvctl(config, "guest", "move", "vm1", "beta")
        wait_console(log, "WROTE:", after=offset)
        run("sh", "-c", f"tail -c +{offset + 1} {shown(log)} | grep -aE 'PEEK|WROTE'")
        hvctl(config, "guest", "status", "vm1", "--json")
        hvctl(config, "guest", "list")
        c.rblock("beta", "status")

        step("Stop it: ACPI power button, then r0 Secondary on both nodes")
        hvctl(config, "guest", "stop", "vm1")
        hvctl(config, "node", "list")
    print("both libvirt hosts stopped")


# --- 4. the end -------------------------------------------------------------------------------


def stage_stop(c: DemoCluster) -> None:
    step("Stop both nodes (SIGTERM: finish in-flight writes, flush, write the metadata)")
    for node in list(c.procs):
        pid = c.procs[node].pid
        rc = c.stop(node)
        print(f"$ kill -TERM {pid}    # {node}: exited {rc}")
        if rc:
            sys.exit(f"{node} exited {rc}:\n{c.log(node)[-2000:]}")
    for node in ("alpha", "beta"):
        print(f"--- {shown(c.log_path(node))} (last lines)")
        print("\n".join(c.log(node).rstrip().splitlines()[-3:]))
    print("\nThe walkthrough in README.md (\"A replicated disk: two nodes\") goes on from here: "
          "verify, invalidate, split brain, TLS.")


def stage_fencing() -> None:
    step("Fencing through etcd: a one-member etcd, a fresh cluster with [cluster] etcd = [...]")
    etcd_dir = WORK / "etcd"
    if etcd_dir.exists():
        shutil.rmtree(etcd_dir)
    etcd_dir.mkdir(parents=True)
    argv, url = etcd_local.member_argv("demo", etcd_dir / "data")
    print("$ " + " ".join(shown(a) for a in argv) + f" 2>{shown(etcd_dir / 'etcd.log')} &")
    with (etcd_dir / "etcd.log").open("wb") as log:
        etcd = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
    try:
        if not etcd_local.wait_healthy(etcd, url, START_TIMEOUT_S):
            sys.exit(f"etcd did not start:\n{(etcd_dir / 'etcd.log').read_text()[-2000:]}")
        prelude = f'[cluster]\netcd = ["{url}"]    # lease_ttl_s = 5 (the default)\n\n'
        with cluster(WORK / "fenced", prelude) as c:
            print(f"# {shown(c.config_path)} starts with:\n" + prelude.rstrip())
            c.create_md()
            c.up("alpha")
            c.up("beta")
            c.wait_connected()
            c.rblock("alpha", "primary", RESOURCE, "--force")
            c.wait_synced()
            c.rblock("alpha", "status")
            step("alpha dies (SIGKILL): beta may be promoted only once alpha's lease expires")
            pid = c.procs["alpha"].pid
            c.stop("alpha", signal.SIGKILL)
            killed = time.monotonic()
            print(f"$ kill -KILL {pid}    # alpha")
            c.rblock("beta", "primary", RESOURCE, check=False)
            while c.rblock("beta", "primary", RESOURCE, quiet=True, check=False).returncode:
                if time.monotonic() - killed > 30:
                    sys.exit("beta was not promoted within 30 s of alpha's death")
                time.sleep(0.1)
            print(f"beta promoted {time.monotonic() - killed:.1f} s after alpha was killed "
                  f"(the lease expired; every write alpha acknowledged is on beta)")
            c.rblock("beta", "status")
    finally:
        stop_by_pid(etcd, signal.SIGTERM, 10)


def stage_ha() -> None:
    from tools.ha_hosts import HaHosts, guest_toml
    from tools.libvirt_hosts import LibvirtHostUnavailable, check_requirements
    from tools.netns_hosts import NetHostsUnavailable
    from tools.netns_hosts import check_requirements as net_requirements

    step("HA: three hosts, each in its own network namespace: alpha and beta (etcd, rblock, "
         "libvirtd, hvctl agent), a witness (etcd only)")
    try:
        check_requirements()
        net_requirements()
    except (LibvirtHostUnavailable, NetHostsUnavailable) as e:
        print(f"skipped: {e}")
        return
    image = build_guest(GUEST_DIR)
    work = WORK / "ha"
    if work.exists():
        shutil.rmtree(work)
    guest = guest_toml(image.kernel, image.initrd, "ha-demo")
    with HaHosts(work, guest) as ha:
        cfg = ha.config
        print(f"# {shown(cfg)}: [cluster] etcd = the three members, lease_ttl_s = 5 (the "
              f"default); r0 on alpha and beta; and:{guest.rstrip()}")
        for h in ("alpha", "beta"):
            print(f"$ hvctl --config {shown(cfg)} agent --node {h} &    # on {h}")
        ha.start_agents()
        log = ha.console("vm1")

        def marks() -> int:
            return log.read_text(errors="replace").count("PEEK:") if log.exists() else 0

        ha.wait(lambda: "LOOP 2 ok" in (log.read_text(errors="replace") if log.exists()
                                        else ""), "vm1 booted on alpha", GUEST_BOOT_TIMEOUT_S)
        run(sys.executable, "-m", "hvctl", "--config", cfg, "ha", "status",
            show_as=["hvctl", "--config", shown(cfg), "ha", "status"])
        step("alpha's power fails: its network goes silent and every process of it is "
             "SIGKILLed")
        before = marks()
        killed = time.monotonic()
        ha.crash("alpha")
        ha.wait(lambda: marks() > before, "vm1's marker on beta", 60)
        print(f"vm1 back on beta after {time.monotonic() - killed:.1f} s (from the kill to "
              "the marker its init prints on the console; it read back what it wrote on "
              "alpha)")
        for args in (["ha", "status"], ["ha", "log"]):
            run(sys.executable, "-m", "hvctl", "--config", cfg, *args,
                show_as=["hvctl", "--config", shown(cfg), *args])
        step("alpha is powered on again: etcd, rblock, libvirtd and its agent start; r0 "
             "resyncs from beta; vm1 stays on beta (no failback)")
        ha.power_on("alpha")
        ha.wait(lambda: ha._in_sync("beta"), "r0 resynced", 60)
        ha.wait(lambda: "alpha      online" in ha.hvctl("ha", "status").stdout,
                "alpha's agent online", 30)
        run(sys.executable, "-m", "hvctl", "--config", cfg, "ha", "status",
            show_as=["hvctl", "--config", shown(cfg), "ha", "status"])
        stage_web(cfg)


WEB_USER = "admin"
WEB_PASSWORD = "demo-password"


def stage_web(cfg: Path) -> None:
    """The administration page of the HA cluster: its URL and a login; served until Ctrl-C
    in a terminal, a few seconds otherwise (CI=true, or no terminal)."""
    step("The web page: hvctl web (the same cluster, live)")
    show = ["hvctl", "--config", shown(cfg)]
    subprocess.run([sys.executable, "-m", "hvctl", "--config", str(cfg), "web", "adduser",
                    WEB_USER, "--role", "admin", "--password-stdin"], input=WEB_PASSWORD + "\n",
                   text=True, check=True, capture_output=True, cwd=REPO)
    print("$ " + " ".join([*show, "web", "adduser", WEB_USER, "--role", "admin"]))
    port = etcd_local.free_port()
    listen = f"127.0.0.1:{port}"
    print("$ " + " ".join([*show, "web", "--listen", listen]) + " &")
    log = WORK / "ha" / "web.log"
    with log.open("wb") as out:
        web = subprocess.Popen([sys.executable, "-m", "hvctl", "--config", str(cfg), "web",
                                "--listen", listen], stdout=out, stderr=out, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving" not in log.read_text() and time.monotonic() < deadline:
            if web.poll() is not None:
                sys.exit(f"hvctl web exited {web.returncode}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        print(f"\nopen http://{listen}/ and log in as {WEB_USER} / {WEB_PASSWORD}")
        if sys.stdin.isatty() and not os.environ.get("CI"):
            print("serving until Ctrl-C (the three hosts keep running meanwhile)", flush=True)
            try:
                web.wait()
            except KeyboardInterrupt:
                print()
        else:
            import urllib.request

            with urllib.request.urlopen(f"http://{listen}/login", timeout=10) as r:
                print(f"GET /login: {r.status} (not a terminal or CI=true: stopping)")
    finally:
        stop_by_pid(web, signal.SIGTERM, 10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--keep", action="store_true",
                    help="leave the two nodes running at the end (their PIDs are printed)")
    args = ap.parse_args()
    # SIGTERM (from `timeout`, say) unwinds like Ctrl-C, so the nodes are still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stage_serve()
    with cluster(WORK / "cluster") as c:
        stage_replication(c)
        stage_guest(c)
        # Later stages go here and find the cluster running.
        if args.keep:
            c.keep()
        else:
            stage_stop(c)
    if not args.keep:
        stage_fencing()
        stage_ha()
    print(f"\ndemo done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the stages' `finally` blocks have stopped what they started
        print("\ninterrupted; every process the demo started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
