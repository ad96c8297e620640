"""`make demo`: serve a sparse image with `rblock serve`, use it with real NBD clients.

Everything runs on localhost under build/demo and is stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "demo"
IMAGE_SIZE = "256M"
START_TIMEOUT_S = 20.0


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(*cmd: str) -> str:
    print("$ " + shlex.join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    print((res.stdout + res.stderr).rstrip(), flush=True)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed with exit status {res.returncode}")
    return res.stdout


def start_server(image: Path) -> tuple[subprocess.Popen, str]:
    out = WORK / "serve.out"
    cmd = [sys.executable, "-m", "rblock", "serve", str(image), "--export", "demo",
           "--create", "--size", IMAGE_SIZE, "--listen", "127.0.0.1:0"]
    print("$ " + shlex.join(["rblock", *cmd[3:]]), flush=True)
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=(WORK / "serve.log").open("w"),
                            cwd=REPO)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines()
        if "ready" in lines:
            return proc, lines[0]
        if proc.poll() is not None:
            sys.exit(f"rblock serve failed:\n{(WORK / 'serve.log').read_text()}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("rblock serve did not start")


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
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
  run it yourself: .venv/bin/rblock serve {image.relative_to(REPO)} --listen 127.0.0.1:10809""")
    finally:
        step("Stop the server (SIGTERM: finish in-flight requests, flush, exit 0)")
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(30)
        print(f"rblock serve exited {rc}")
        print((WORK / "serve.log").read_text().rstrip())
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
