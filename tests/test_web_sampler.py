"""hvctl/web/sampler.py: every open page shares one sample per interval."""

from __future__ import annotations

import asyncio

from hvctl.web.sampler import Sampler


def test_concurrent_readers_and_streams_share_one_computation():
    calls = []

    async def compute() -> dict:
        calls.append(1)
        await asyncio.sleep(0.01)
        return {"n": len(calls)}

    async def go() -> None:
        s = Sampler(compute, interval_s=0.05, on_error=str)
        got = await asyncio.gather(*(s.get() for _ in range(10)))
        assert got == [{"n": 1}] * 10 and len(calls) == 1
        queues = [s.subscribe() for _ in range(5)]
        firsts = [await q.get() for q in queues]
        assert all(f == firsts[0] for f in firsts)
        seconds = [await q.get() for q in queues]
        assert all(x == seconds[0] for x in seconds) and seconds[0]["n"] > firsts[0]["n"]
        # five streams over two intervals: a sample per interval, not per stream
        assert len(calls) <= seconds[0]["n"] <= 4
        for q in queues:
            s.unsubscribe(q)
        await s.close()

    asyncio.run(go())


def test_an_error_reaches_the_streams_and_the_sampler_goes_on():
    n = 0

    async def compute() -> dict:
        nonlocal n
        n += 1
        if n == 1:
            raise RuntimeError("etcd away")
        return {"ok": n}

    async def go() -> None:
        s = Sampler(compute, interval_s=0.02, on_error=lambda e: f"said: {e}")
        q = s.subscribe()
        assert await q.get() == {"error": "said: etcd away"}
        assert (await q.get())["ok"] >= 2
        await s.close()

    asyncio.run(go())
