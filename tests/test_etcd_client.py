"""rblock/etcd.py and the fencing transactions (rblock/replica/fence_txn.py) against a real
etcd 3.4: the compare-and-set semantics the simulator reimplements are checked here on the
real thing, lease expiry included; and the client over TLS with a client certificate."""

from __future__ import annotations

import asyncio
import time

import pytest

from rblock.etcd import Etcd, EtcdError, EtcdUnavailable
from rblock.replica import fence_txn
from rblock.replica.fencing import Ev, Txn
from tests.etcd_cluster import ETCD, EtcdCluster
from tests.test_replication_tls import make_ca, make_cert

pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd-server is not installed")
KEYS = fence_txn.Keys("/rblock-test", "r0")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    e = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1, clients=("a",))
    e.start()
    yield e
    e.stop()


async def _txn(c: Etcd, kind: Txn, node: str, peer: str, lease: int):
    r = await c.txn(*fence_txn.build(kind, KEYS, node, peer, lease, time.time()))
    return fence_txn.interpret(kind, KEYS, node, lease, r)


def test_fencing_transactions_on_real_etcd(etcd):
    async def go() -> None:
        c = Etcd(etcd.endpoints("a"))
        try:
            await c.delete(KEYS.base, prefix=True)
            la, _ = await c.lease_grant(2)
            lb, _ = await c.lease_grant(30)
            assert (await _txn(c, Txn.TAKE, "alpha", "beta", la)).event is Ev.TAKEN
            # Taken again under the same lease: still ours (a retry whose answer was lost).
            assert (await _txn(c, Txn.TAKE, "alpha", "beta", la)).event is Ev.TAKEN
            a = await _txn(c, Txn.TAKE, "beta", "alpha", lb)
            assert a.event is Ev.REFUSED and a.holder == "alpha", a
            assert (await _txn(c, Txn.OUTDATE, "alpha", "beta", la)).event is Ev.OUTDATED
            assert (await _txn(c, Txn.OUTDATE, "beta", "alpha", lb)).event is Ev.NOT_HOLDER
            # The key expires with alpha's lease; beta is recorded Outdated: still refused.
            deadline = time.monotonic() + 10
            while await c.get(KEYS.primary) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert not await c.get(KEYS.primary), "the key did not go with the lease"
            a = await _txn(c, Txn.TAKE, "beta", "alpha", lb)
            assert a.event is Ev.REFUSED and "beta is recorded Outdated" in a.reason, a
            assert a.outdated == frozenset({"beta"})
            # alpha, back with a new lease, takes it again and sees beta Outdated.
            la2, _ = await c.lease_grant(30)
            a = await _txn(c, Txn.TAKE, "alpha", "beta", la2)
            assert a.event is Ev.TAKEN and a.outdated == frozenset({"beta"}), a
            assert (await _txn(c, Txn.CLEAR, "alpha", "beta", la2)).event is Ev.CLEARED
            assert not await c.get(KEYS.outdated("beta"))
            assert (await _txn(c, Txn.RELEASE, "alpha", "beta", la2)).event is Ev.RELEASED
            assert (await _txn(c, Txn.TAKE, "beta", "alpha", lb)).event is Ev.TAKEN
            assert await c.lease_keepalive(lb) > 0
            await c.lease_revoke(lb)
            assert await c.lease_keepalive(lb) == 0  # etcd forgot it
            assert not await c.get(KEYS.primary)
            with pytest.raises(EtcdError):
                await c.put(KEYS.primary, "x", lease=lb)  # a lease etcd does not know
        finally:
            await c.close()
    asyncio.run(go())


def test_unreachable_endpoints_fail_over_then_give_up(etcd):
    async def go() -> None:
        dead = "http://127.0.0.1:1"
        c = Etcd([dead, *etcd.endpoints("a")], timeout_s=0.5)
        try:
            lid, ttl = await c.lease_grant(5)  # the dead endpoint is skipped
            assert lid and ttl == 5
        finally:
            await c.close()
        c = Etcd([dead], timeout_s=0.5)
        try:
            with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
                await c.lease_grant(5)
        finally:
            await c.close()
    asyncio.run(go())


def test_client_tls_with_a_certificate(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    ext = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
           "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n")
    server = make_cert(d, "etcd", "ca", ext)
    client = make_cert(d, "alpha", "ca", ext)
    e = EtcdCluster(tmp_path / "etcd", members=1, clients=("a",),
                    tls=(server.cert, server.key, server.ca))
    e.start()

    async def go() -> None:
        c = Etcd(e.endpoints("a"), ca=str(client.ca), cert=str(client.cert),
                 key=str(client.key))
        try:
            lid, _ = await c.lease_grant(5)
            assert (await _txn(c, Txn.TAKE, "alpha", "beta", lid)).event is Ev.TAKEN
        finally:
            await c.close()
        bare = Etcd(e.endpoints("a"), ca=str(client.ca), timeout_s=1)  # no client cert
        try:
            with pytest.raises(EtcdUnavailable):
                await bare.lease_grant(5)
        finally:
            await bare.close()
    try:
        asyncio.run(go())
    finally:
        e.stop()
