"""How a daemon's main coroutine runs: `run_async`, on uvloop (`rblock up`, `rblock serve`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run the daemon coroutine on uvloop (a dependency; falls back to asyncio if absent)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)
