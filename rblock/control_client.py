"""The client of a node's control API (rblock/control_server.py): `ControlClient`, the
`ControlError` it raises, `in_sync` for the status it returns and `summarize_metrics` for
its Prometheus scrape.

Used by the `rblock` CLI and by hvctl. Kept light on purpose: it imports aiohttp, the
standard library and rblock.config only, never the replica, store or NBD layers (a test,
tests/test_layering.py, holds it to that); prometheus_client's parser only when
`summarize_metrics` is called.
"""

from __future__ import annotations

import json
import os
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


def summarize_metrics(text: str) -> dict:
    """A node's scrape (`ControlClient.metrics()`, rblock/metrics.py names every metric),
    parsed with prometheus_client's parser into plain numbers, for pages that chart them:

        {"node": "alpha",
         "process": {"cpu_seconds": 1.9, "resident_memory_bytes": 61e6, ...},
         "resources": {"r0": {"writes": 1000.0, "write_bytes": 4096000.0,
                              "write_seconds_sum": 0.031, "write_seconds_count": 1000.0,
                              "resync_sent_bytes": 0.0, ...}}}

    A resource's keys are the metric names without `rblock_` and `_total`; a histogram gives
    `<type>_seconds_sum` and `<type>_seconds_count` (its buckets are left out), the request
    errors `<type>_errors`, the `direction` metrics `resync_sent_bytes`,
    `resync_received_bytes`, `replication_sent_bytes`, `replication_received_bytes`; per-peer
    values are summed over the resource's peers (it has one). The `_info` metrics (state as
    labels) are left out: `ControlClient.status()` has the states. Counters (`writes`,
    `write_bytes`, `*_seconds_*`, `resync_*_bytes`, ...) only grow: chart their differences
    between two scrapes divided by the time between them (rates)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"node": None, "process": {}, "resources": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name.startswith("process_"):
                out["process"][name.removeprefix("process_").removesuffix("_total")] = value
                continue
            if not name.startswith("rblock_") or family.name.endswith("_info") \
                    or name.endswith(("_bucket", "_created")):
                continue
            out["node"] = labels.get("node", out["node"])
            key = name.removeprefix("rblock_").removesuffix("_total")
            if "type" in labels:  # request_seconds_sum -> write_seconds_sum, ...
                key = f"{labels['type']}_{key.removeprefix('request_')}"
            if "direction" in labels:  # resync_bytes -> resync_sent_bytes
                what, _, unit = key.rpartition("_")
                key = f"{what}_{labels['direction']}_{unit}"
            figures = out["resources"].setdefault(labels["resource"], {})
            figures[key] = figures.get(key, 0.0) + value if "peer" in labels else value
    return out


class ControlError(Exception):
    """The node refused a command or could not be reached; the message says which.
    `config_error`: the node found its config file wrong (`adjust`)."""

    def __init__(self, message: str, config_error: bool = False):
        super().__init__(message)
        self.config_error = config_error


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

    def _unreachable(self, e: BaseException) -> ControlError:
        """In words: "connection refused", "no such file" (a socket not there), "timed out",
        not aiohttp's text with a Python tuple in it."""
        os_error = getattr(e, "os_error", None)
        if isinstance(e, aiohttp.ContentTypeError):
            return ControlError(f"{self.addr} answered HTTP {e.status} with something that is "
                                "not rblock's control API; is this node's 'control' address "
                                "right?")
        if isinstance(os_error, OSError) and (os_error.errno or os_error.strerror):
            why = (os.strerror(os_error.errno) if os_error.errno else
                   str(os_error.strerror)).lower()
        elif isinstance(e, (TimeoutError, aiohttp.ServerTimeoutError)):
            why = "timed out"
        elif isinstance(e, aiohttp.ServerDisconnectedError):
            why = "the node closed the connection"
        else:
            why = str(e) or type(e).__name__
        return ControlError(f"cannot reach the node's control API at {self.addr}: {why}; "
                            f"is 'rblock up' running there?")

    async def status(self) -> dict:
        try:
            async with self._session() as s, s.get(self._base + "/v1/status") as resp:
                return await resp.json()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unreachable(e) from None

    async def metrics(self) -> str:
        """The node's `GET /metrics`: Prometheus' text format (see `summarize_metrics`)."""
        try:
            async with self._session() as s, s.get(self._base + "/metrics") as resp:
                if resp.status != 200:
                    raise ControlError(f"the node's control API at {self.addr} answered "
                                       f"/metrics with HTTP {resp.status}: is it an older "
                                       f"rblock without metrics?")
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unreachable(e) from None

    async def action(self, resource: str, action: str, **body: Any) -> str:
        """Run ACTION; its message (also when it changed nothing: see `run`)."""
        return (await self.run(resource, action, **body))[1]

    async def run(self, resource: str, action: str, **body: Any) -> tuple[bool, str]:
        """Run ACTION: (changed, message); changed is False when the resource already was
        as asked and nothing was done (the message says so). Raises ControlError."""
        data = await self._post(f"/v1/resources/{resource}/{action}", body)
        return bool(data.get("changed", True)), data["message"]

    async def adjust(self) -> dict:
        """`rblock adjust`: the node reads its config file again (rblock.node.Node.adjust)."""
        return await self._post("/v1/adjust", {})

    async def _post(self, path: str, body: dict) -> dict:
        try:
            async with self._session() as s, s.post(self._base + path, json=body) as resp:
                data = await resp.json()
        except aiohttp.ContentTypeError:
            raise ControlError(f"the node's control API at {self.addr} does not know {path}: "
                               f"is it an older rblock? restart it") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unreachable(e) from None
        if "error" in data:
            raise ControlError(data["error"], bool(data.get("config_error")))
        return data

    async def events(self, initial: bool = False) -> AsyncIterator[dict]:
        """State changes as they happen; with INITIAL, first the current state of every
        resource ("exists" events, then one for resource "-"; control_server.py)."""
        path = "/v1/events?initial=1" if initial else "/v1/events"
        try:
            async with self._session(None) as s, s.get(self._base + path) as resp:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unreachable(e) from None
