"""The Storage page's split-brain card, through the web API against two real rblock nodes:
a real split brain (the link cut by nftables, both sides promoted and written), shown on
both sides with what each changed; "keep alpha's data" resolves it: beta's changes are
saved on beta, then overwritten by alpha's, byte for byte."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hvctl.config import load
from hvctl.web.app import make_app
from hvctl.web.users import Users
from tests.hvcluster import shared_loop
from tests.test_replication_failures import nft_usable
from tests.test_split_brain import make_split_brain

PASSWORD = "correct horse"


def test_split_brain_shown_on_both_sides_and_resolved_keeping_alpha(cluster, tmp_path):
    why = nft_usable()
    if why:
        pytest.skip(why)
    c = cluster(size="16M")
    c.start_fresh()
    before = make_split_brain(c, alpha_mib=1, beta_mib=3, demote=("alpha", "beta"))
    c.wait(lambda: all(c.peer(n).get("split_brain") for n in ("alpha", "beta")),
           timeout_s=30, what="both sides see the split brain")

    cfgfile = tmp_path / "hv.toml"
    cfgfile.write_text(c.configs["alpha"].read_text().replace(
        "[resource.r0]", f'[hvctl]\nstate_dir = "{tmp_path}/state"\n\n[resource.r0]', 1))
    cfg = load(cfgfile)
    users = Users(tmp_path / "users.json")
    users.add("ann", "admin", PASSWORD)
    loop = shared_loop()
    client = TestClient(TestServer(make_app(cfg, users)), loop=loop.loop)
    loop.run(client.start_server())

    async def go() -> None:
        await client.post("/login", data={"user": "ann", "password": PASSWORD})
        page = await (await client.get("/storage")).text()
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        h = {"X-CSRF-Token": token}
        st = await (await client.get("/api/v1/storage")).json()
        for n, mib in (("alpha", 1), ("beta", 3)):
            p = st["r0"][n]["peers"][0]
            assert p["split_brain"] and p["connection"] == "StandAlone", p
            assert p["out_of_sync_bytes"] >= mib << 20  # what this side changed, at least
        r = await client.post("/api/v1/resources/r0/resolve", headers=h, json={"keep": "gamma"})
        assert r.status == 400 and "no disk on gamma" in (await r.json())["error"]
        r = await client.post("/api/v1/resources/r0/resolve", headers=h, json={"keep": "alpha"})
        body = await r.json()
        assert r.status == 200, body
        assert "keeping alpha's data" in body["message"] and "beta" in body["message"]
        tasks = await (await client.get("/api/v1/tasks")).json()
        assert (tasks[-1]["user"], tasks[-1]["action"], tasks[-1]["state"]) == (
            "ann", "resolve split brain", "done")

    try:
        loop.run(go())
    finally:
        loop.run(client.close())
    c.wait_synced()
    assert c.disk("beta").read_bytes() == before["alpha"]  # alpha's data won, all of it
    snaps = c.rblock("beta", "splitbrain", "list", "r0").stdout
    assert snaps.startswith("1: ") and "complete" in snaps, snaps  # beta's changes kept

    # resolving again: nothing to resolve, said so
    async def again() -> int:
        cl = TestClient(TestServer(make_app(cfg, users)), loop=loop.loop)
        await cl.start_server()
        try:
            await cl.post("/login", data={"user": "ann", "password": PASSWORD})
            page = await (await cl.get("/storage")).text()
            token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
            r = await cl.post("/api/v1/resources/r0/resolve",
                              headers={"X-CSRF-Token": token}, json={"keep": "beta"})
            assert "not in split brain" in (await r.json())["error"]
            return r.status
        finally:
            await cl.close()
    assert loop.run(again()) == 409
