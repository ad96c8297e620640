"""A small asyncio client for etcd v3, over its JSON gateway (HTTP POST /v3/...), on aiohttp.

Why not a gRPC client: the only asyncio one, aetcd, pulls in grpcio and protobuf (tens of MB,
native code) for the five calls fencing needs, and was quiet from 2023 until 2026. etcd's
gateway ships in every etcd since 3.3 and speaks the same API as JSON; Patroni's etcd3 DCS
uses it the same way. What fencing needs is here: leases (grant, keepalive, revoke, time to
live), range reads and transactions. Keys and values are base64 in the JSON, int64s are
strings; both are hidden here.

Every call goes to one endpoint at a time with a short timeout; a connection error or a
timeout moves on to the next endpoint, so a dead or partitioned member costs one timeout.
A call that no endpoint answers raises `EtcdUnavailable` (no member reachable, or none with
a quorum: a minority member's reads and writes time out). etcd's own refusals (a lease that
is not found, a malformed request) raise `EtcdError` with etcd's message.

Reads are linearizable (etcd's default): a member cut off from its quorum cannot answer
them, so an answer is never stale.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

CALL_TIMEOUT_S_DEFAULT = 1.0
GRPC_NOT_FOUND = 5


class EtcdError(Exception):
    """etcd answered, and refused (its message)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(Exception):
    """No endpoint answered in time (unreachable, or no quorum behind it)."""


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_end(prefix: str) -> bytes:
    """The range_end that makes a range read cover every key starting with PREFIX."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    lease: int
    version: int
    mod_revision: int


def _kv(d: dict) -> KV:
    return KV(_unb64(d["key"]), _unb64(d.get("value", "")), int(d.get("lease", 0)),
              int(d.get("version", 0)), int(d.get("mod_revision", 0)))


# --- transaction parts (etcd's Compare and RequestOp, as JSON) -------------------------------

def cmp_absent(key: str) -> dict:
    return {"target": "VERSION", "key": _b64(key), "result": "EQUAL", "version": "0"}


def cmp_value(key: str, value: str) -> dict:
    return {"target": "VALUE", "key": _b64(key), "result": "EQUAL", "value": _b64(value)}


def cmp_lease(key: str, lease: int) -> dict:
    return {"target": "LEASE", "key": _b64(key), "result": "EQUAL", "lease": str(lease)}


def op_put(key: str, value: str, lease: int = 0) -> dict:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_delete(key: str) -> dict:
    return {"request_delete_range": {"key": _b64(key)}}


def op_get(key: str, prefix: bool = False) -> dict:
    req = {"key": _b64(key)}
    if prefix:
        req["range_end"] = _b64(prefix_end(key))
    return {"request_range": req}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    ranges: list[list[KV]]  # the kvs of each range op of the branch that ran, in order


class Etcd:
    """One client for a list of endpoints ("http://host:2379" or "https://...")."""

    def __init__(self, endpoints: list[str], *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None,
                 timeout_s: float = CALL_TIMEOUT_S_DEFAULT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self._ssl: ssl.SSLContext | None = None
        if ca or cert:
            self._ssl = ssl.create_default_context(cafile=ca)
            if cert:
                self._ssl.load_cert_chain(cert, key)
        self._session: aiohttp.ClientSession | None = None
        self._first = 0  # the endpoint that answered last: tried first

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else False))
        return self._session

    async def _one(self, idx: int, path: str, body: dict) -> dict:
        """POST BODY to /v3/PATH on endpoint IDX. EtcdUnavailable: try another endpoint;
        EtcdError: etcd refused it (any endpoint would)."""
        return await self._post(self.endpoints[idx], path, body)

    async def _post(self, base: str, path: str, body: dict) -> dict:
        url = f"{base.rstrip('/')}/v3/{path}"
        try:
            async with self._session_().post(
                    url, json=body,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as e:
            raise EtcdUnavailable(f"{base}: {str(e) or type(e).__name__}") from None
        if not isinstance(data, dict):
            raise EtcdUnavailable(f"{url}: not a JSON object")
        if "error" in data or resp.status >= 400:
            msg = str(data.get("message") or data.get("error") or resp.status)
            code = int(data.get("code", 0) or 0)
            if code in (4, 14) or "timed out" in msg or "no leader" in msg:
                # DEADLINE_EXCEEDED / UNAVAILABLE: this member has no quorum right now.
                raise EtcdUnavailable(f"{base}: {msg}")
            raise EtcdError(f"etcd: {msg}", code)
        return data.get("result", data) if path == "lease/keepalive" else data

    async def call(self, path: str, body: dict) -> dict:
        """POST BODY to /v3/PATH on the first endpoint that answers, one after the other
        (the one that answered last first)."""
        last: BaseException | None = None
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._first + i) % n
            try:
                data = await self._one(idx, path, body)
            except EtcdUnavailable as e:
                last = e
                continue
            self._first = idx
            return data
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): "
                              f"{last}")

    async def call_any(self, path: str, body: dict) -> dict:
        """POST BODY (an idempotent request: a keepalive, a read) to every endpoint at once;
        the first answer wins. A dead member then costs nothing, and while a new Raft
        leader is being elected the first member that has one answers."""
        async def one(i: int) -> tuple[int, dict]:
            return i, await self._one(i, path, body)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(self.endpoints))]
        errors: list[BaseException] = []
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    idx, data = await fut
                except (EtcdUnavailable, EtcdError) as e:
                    errors.append(e)
                    continue
                self._first = idx  # the sequential calls (transactions) start there
                return data
        finally:
            for t in tasks:
                t.cancel()
        refused = [e for e in errors if isinstance(e, EtcdError)]
        if refused:
            raise refused[0]
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): "
                              + "; ".join(str(e) for e in errors))

    # --- the cluster ---------------------------------------------------------------------------

    async def members(self) -> list[dict]:
        """[{"ID": ..., "name": ..., "peerURLs": [...], "clientURLs": [...]}, ...]"""
        return list((await self.call("cluster/member/list", {})).get("members", []))

    async def raft_leader(self) -> str:
        """The member ID of the current Raft leader ("" if none)."""
        return str((await self.call_any("maintenance/status", {})).get("leader", ""))

    async def endpoint_status(self) -> list[dict]:
        """Each endpoint's own view, asked at once: [{"endpoint", "ok", "member_id", "leader",
        "error"}]; a member that does not answer (or has no leader) is not ok."""
        async def one(url: str) -> dict:
            try:
                d = await self._post(url, "maintenance/status", {})
            except (EtcdUnavailable, EtcdError) as e:
                return {"endpoint": url, "ok": False, "error": str(e)}
            member = str(d.get("header", {}).get("member_id", ""))
            leader = str(d.get("leader", ""))
            return {"endpoint": url, "ok": leader not in ("", "0"), "member_id": member,
                    "leader": leader, "error": None if leader not in ("", "0") else "no leader"}

        return list(await asyncio.gather(*(one(u) for u in self.endpoints)))

    async def move_leader(self, target_id: str, leader_urls: list[str]) -> None:
        """Hand the Raft leadership to TARGET_ID; etcd takes it only from the leader, so it
        goes to one of the leader's LEADER_URLS."""
        last: BaseException | None = None
        for url in leader_urls:
            try:
                await self._post(url, "maintenance/transfer-leadership",
                                 {"targetID": target_id})
                return
            except EtcdUnavailable as e:
                last = e
        raise EtcdUnavailable(f"the Raft leader did not answer: {last}")

    # --- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (its id, the TTL etcd granted)."""
        r = await self.call("lease/grant", {"TTL": str(ttl_s)})
        return int(r["ID"]), int(r.get("TTL", 0))

    async def lease_keepalive(self, lease: int) -> int:
        """Renew LEASE; the TTL it has again, 0 if etcd no longer knows it (expired)."""
        r = await self.call_any("lease/keepalive", {"ID": str(lease)})
        return int(r.get("TTL", 0))

    async def lease_ttl(self, lease: int) -> int:
        """The seconds LEASE has left (-1 if it does not exist)."""
        r = await self.call_any("lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL", -1))

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if e.code != GRPC_NOT_FOUND:
                raise

    # --- keys ------------------------------------------------------------------------------------

    async def get(self, key: str, prefix: bool = False) -> list[KV]:
        body = op_get(key, prefix)["request_range"]
        r = await self.call_any("kv/range", body)
        return [_kv(d) for d in r.get("kvs", [])]

    async def put(self, key: str, value: str, lease: int = 0) -> None:
        await self.call("kv/put", op_put(key, value, lease)["request_put"])

    async def delete(self, key: str, prefix: bool = False) -> None:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        await self.call("kv/deleterange", body)

    async def txn(self, compare: list[dict], success: list[dict],
                  failure: list[dict]) -> TxnResult:
        r = await self.call("kv/txn", {"compare": compare, "success": success,
                                       "failure": failure})
        ranges = [[_kv(d) for d in resp["response_range"].get("kvs", [])]
                  for resp in r.get("responses", []) if "response_range" in resp]
        return TxnResult(bool(r.get("succeeded", False)), ranges)
