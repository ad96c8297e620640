"""The client of a node's control API (rblock/control_server.py): `ControlClient`, the
`ControlError` it raises, and `in_sync` for the status it returns.

Used by the `rblock` CLI and by hvctl. Kept light on purpose: it imports aiohttp, the
standard library and rblock.config only, never the replica, store or NBD layers (a test,
tests/test_layering.py, holds it to that).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from rblock.config import Address

CLIENT_TIMEOUT_S = 30.0


def in_sync(resource: dict) -> bool:
    """A resource of `rblock status --json` is in sync: its disk and every peer's UpToDate,
    replication Established, nothing out of sync (what scripts wait for after a resync)."""
    return resource["disk"] == "UpToDate" and all(
        p["disk"] == "UpToDate" and p["replication"] == "Established"
        and not p["out_of_sync_bytes"] for p in resource["peers"])


class ControlError(Exception):
    """The node refused a command or could not be reached; the message says which."""


class ControlClient:
    def __init__(self, addr: Address):
        self.addr = addr
        if addr.unix_path:
            self._base = "http://rblock"
        else:
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            self._base = f"http://{host}:{addr.port}"

    def _session(self, timeout_s: float | None = CLIENT_TIMEOUT_S) -> aiohttp.ClientSession:
        connector = (aiohttp.UnixConnector(path=self.addr.unix_path) if self.addr.unix_path
                     else aiohttp.TCPConnector())
        return aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def status(self) -> dict:
        try:
            async with self._session() as s, s.get(self._base + "/v1/status") as resp:
                return await resp.json()
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}; "
                               f"is 'rblock up' running there?") from None

    async def action(self, resource: str, action: str, **body: Any) -> str:
        url = f"{self._base}/v1/resources/{resource}/{action}"
        try:
            async with self._session() as s, s.post(url, json=body) as resp:
                data = await resp.json()
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}; "
                               f"is 'rblock up' running there?") from None
        if "error" in data:
            raise ControlError(data["error"])
        return data["message"]

    async def events(self) -> AsyncIterator[dict]:
        try:
            async with self._session(None) as s, s.get(self._base + "/v1/events") as resp:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the node's control API at {self.addr}: {e}") \
                from None
