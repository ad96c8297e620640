"""Failover with fencing through etcd, measured on real processes (the tests' two-node
cluster on loopback, a one-member etcd, the product's default timeouts: peer_timeout_s 4,
lease_ttl_s 5):

- kill: SIGKILL of the Primary to the first successful `rblock primary` on the Secondary
  (tried every 0.1 s), and to its first acknowledged write;
- cut: the replication link cut (nftables) under a 4 KiB write load at queue depth 1: the
  longest gap between two acknowledged writes (peer timeout + recording the peer Outdated).

    .venv/bin/python benchmarks/failover.py [--repeat N]

Root is needed for the cut (nftables); the kill runs without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbd  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from tests.etcd_cluster import EtcdCluster  # noqa: E402
from tests.test_replication_failures import LinkCut, nft_usable  # noqa: E402


class QD1Writer(threading.Thread):
    """4 KiB writes, one at a time, recording when each was acknowledged."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.acks: list[float] = []
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        buf = os.urandom(4096)
        i = 0
        try:
            while not self.stop.is_set():
                self.h.pwrite(buf, (i % 4096) * 4096)
                self.acks.append(time.monotonic())
                i += 1
        except nbd.Error as e:
            self.error = str(e)


def setup(tmp: Path, etcd: EtcdCluster) -> Cluster:
    c = Cluster(tmp / "cluster", size="64M", default_timeouts=True,
                prelude={n: etcd.toml(n, ttl_s=5) for n in ("alpha", "beta")})
    c.start_fresh()
    return c


def kill_once(tmp: Path) -> tuple[float, float]:
    e = EtcdCluster(tmp / "etcd", members=1)
    e.start()
    c = setup(tmp, e)
    try:
        w = QD1Writer(c.nbd_uri("alpha"))
        w.start()
        time.sleep(1.0)
        c.kill("alpha")
        t0 = time.monotonic()
        w.stop.set()
        while c.rblock("beta", "primary", "r0", check=False).returncode != 0:
            time.sleep(0.1)
        promoted = time.monotonic() - t0
        w2 = QD1Writer(c.nbd_uri("beta"))
        w2.start()
        while not w2.acks:
            time.sleep(0.005)
        first = w2.acks[0] - t0
        w2.stop.set()
        w2.join()
        return promoted, first
    finally:
        c.stop_all()
        e.stop()


def cut_once(tmp: Path) -> float:
    e = EtcdCluster(tmp / "etcd", members=1)
    e.start()
    c = setup(tmp, e)
    cut = LinkCut([c.ports["alpha"]["replication"], c.ports["beta"]["replication"]])
    try:
        w = QD1Writer(c.nbd_uri("alpha"))
        w.start()
        time.sleep(1.0)
        t_cut = time.monotonic()
        cut.cut()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (w.acks and w.acks[-1] > t_cut + 8):
            time.sleep(0.1)
        w.stop.set()
        w.join()
        acks = [t for t in w.acks if t >= t_cut - 0.5]
        return max(b - a for a, b in zip(acks, acks[1:], strict=False))
    finally:
        cut.restore()
        c.stop_all()
        e.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    kills, firsts, stalls = [], [], []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="rblock-failover-") as d:
            p, f = kill_once(Path(d))
            kills.append(p)
            firsts.append(f)
            print(f"kill {i + 1}: promoted after {p:.2f} s, first write after {f:.2f} s",
                  flush=True)
    why = nft_usable()
    for i in range(args.repeat if not why else 0):
        with tempfile.TemporaryDirectory(prefix="rblock-failover-") as d:
            s = cut_once(Path(d))
            stalls.append(s)
            print(f"cut {i + 1}: longest write stall {s:.2f} s", flush=True)
    print(f"primary SIGKILL -> promotion: min {min(kills):.2f} s, max {max(kills):.2f} s; "
          f"-> first write on the new primary: max {max(firsts):.2f} s")
    if stalls:
        print(f"link cut -> longest write stall: min {min(stalls):.2f} s, "
              f"max {max(stalls):.2f} s")
    else:
        print(f"link cut: not measured ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
