"""etcd for the tests: real `etcd` processes (Debian's etcd-server 3.4) on loopback, each
member with one client port per rblock node, so a test can cut one node off from etcd with
nftables (tests/test_replication_failures.py's LinkCut on that node's ports) while the other
still reaches it. Members are started and stopped by PID.

    e = EtcdCluster(tmp_path, members=3, clients=("alpha", "beta"))
    e.start()
    e.endpoints("alpha")      # ["http://127.0.0.1:P", ...]: alpha's view, one per member
    e.client_ports("alpha")   # for LinkCut
    e.stop_member(0); e.start_member(0)
    e.stop()
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

from tests.cluster import free_ports
from tools.etcd_local import healthy
from tools.procs import stop_by_pid

ETCD = shutil.which("etcd")
START_TIMEOUT_S = 20.0


class EtcdCluster:
    def __init__(self, workdir: Path, members: int = 1,
                 clients: tuple[str, ...] = ("alpha", "beta"),
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """TLS: (cert, key, ca) of the members' client side; clients must then present a
        certificate signed by the CA (--client-cert-auth)."""
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.dir = workdir
        self.n = members
        self.clients = clients
        ports = free_ports(members * (1 + len(clients)))
        self.peer_ports = ports[:members]
        self.ports = {c: ports[members * (i + 1):members * (i + 2)]
                      for i, c in enumerate(clients)}
        self.procs: dict[int, subprocess.Popen] = {}

    def endpoints(self, client: str) -> list[str]:
        return [f"{self.scheme}://127.0.0.1:{p}" for p in self.ports[client]]

    def client_ports(self, client: str) -> list[int]:
        return list(self.ports[client])

    def _initial(self) -> str:
        return ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))

    def start_member(self, i: int, state: str = "existing") -> None:
        urls = ",".join(f"{self.scheme}://127.0.0.1:{self.ports[c][i]}" for c in self.clients)
        tls = []
        if self.tls:
            cert, key, ca = self.tls
            tls = ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file",
                   str(ca), "--client-cert-auth"]
        log = (self.dir / f"etcd-m{i}.log").open("ab")
        self.procs[i] = subprocess.Popen(
            [ETCD or "etcd", "--name", f"m{i}", "--data-dir", str(self.dir / f"etcd-m{i}"),
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
             "--listen-client-urls", urls, "--advertise-client-urls", urls,
             "--initial-cluster", self._initial(), "--initial-cluster-state", state,
             "--heartbeat-interval", "100", "--election-timeout", "1000",
             "--pre-vote", *tls],
            stdout=log, stderr=log)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            self.start_member(i, "new")
        self.wait_healthy()

    def healthy(self, i: int) -> bool:
        ctx = None
        if self.tls:
            cert, key, ca = self.tls
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
        return healthy(f"{self.scheme}://127.0.0.1:{self.ports[self.clients[0]][i]}", ctx)

    def wait_healthy(self, members: list[int] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        want = members if members is not None else list(self.procs)
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i in want):
                return
            for i, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"etcd m{i} exited {p.returncode}: "
                                         f"{(self.dir / f'etcd-m{i}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"etcd members {want} not healthy after {START_TIMEOUT_S:g}s")

    def stop_member(self, i: int) -> None:
        stop_by_pid(self.procs.pop(i), signal.SIGKILL, 10)

    def stop(self) -> None:
        for i in list(self.procs):
            self.stop_member(i)

    def toml(self, client: str, ttl_s: int = 2) -> str:
        """The [cluster] table of CLIENT's config file."""
        eps = ", ".join(f'"{e}"' for e in self.endpoints(client))
        return f"[cluster]\netcd = [{eps}]\nlease_ttl_s = {ttl_s}\n\n"
