"""``/v1/session/*``: defaults, renewal, destruction and TTL invalidation of held locks."""

from __future__ import annotations

import aiohttp
import pytest

from epoxi.registry.client import Consul
from tests.devmesh.registry.support import debug_duration
from tests.support import eventually

pytestmark = pytest.mark.consul


async def test_session_defaults(consul: Consul, prefix: str) -> None:
    me = await consul.agent.self()
    session_id = await consul.session.create(name=prefix)

    index, info = await consul.session.info(session_id)

    assert int(index) >= info["ModifyIndex"]
    assert info == {
        "ID": session_id,
        "Name": prefix,
        "Node": me["Config"]["NodeName"],
        "LockDelay": 15_000_000_000,
        "Behavior": "release",
        "TTL": "",
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": None,
        "CreateIndex": info["CreateIndex"],
        "ModifyIndex": info["CreateIndex"],
    }
    _, sessions = await consul.session.list()
    assert session_id in [s["ID"] for s in sessions]


async def test_create_options_and_renew(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"name": prefix, "behavior": "delete", "lockdelay": "2s", "ttl": "60s", "NodeChecks": []}
    async with http.put("/v1/session/create", json=body) as response:
        session_id = (await response.json())["ID"]

    renewed = await consul.session.renew(session_id)

    assert (renewed["Behavior"], renewed["LockDelay"], renewed["TTL"]) == ("delete", 2_000_000_000, "60s")
    assert renewed["NodeChecks"] == []


async def test_destroy_releases_the_lock(consul: Consul, prefix: str) -> None:
    session_id = await consul.session.create(name=prefix, lock_delay=0)
    await consul.kv.put(f"{prefix}/lock", "me", acquire=session_id)

    assert await consul.session.destroy(session_id) is True

    assert (await consul.session.info(session_id))[1] is None
    _, entry = await consul.kv.get(f"{prefix}/lock")
    assert "Session" not in entry
    other = await consul.session.create(name=f"{prefix}-other")
    assert await consul.kv.put(f"{prefix}/lock", "you", acquire=other) is True


async def ttl_session(
    consul: Consul, http: aiohttp.ClientSession, prefix: str, behavior: str
) -> tuple[str, float]:
    """A session with the shortest TTL the agent allows (py-consul refuses TTLs under 10s)."""
    ttl = (await consul.agent.self())["DebugConfig"]["SessionTTLMin"]
    async with http.put(
        "/v1/session/create", json={"Name": prefix, "TTL": ttl, "Behavior": behavior}
    ) as response:
        assert response.status == 200, await response.text()
        session_id: str = (await response.json())["ID"]
    return session_id, await debug_duration(consul, "SessionTTLMin")


async def test_ttl_invalidation_releases_keys_and_arms_lock_delay(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    session_id, ttl = await ttl_session(consul, http, prefix, "release")
    key = f"{prefix}/leader"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    async def invalidated() -> bool:
        return (await consul.session.info(session_id))[1] is None

    await eventually(invalidated, seconds=2 * ttl + 15)

    _, entry = await consul.kv.get(key)
    assert entry is not None
    assert "Session" not in entry
    assert entry["Value"] == b"me"
    successor = await consul.session.create(name=f"{prefix}-next")
    assert await consul.kv.put(key, "next", acquire=successor) is False  # the 15s lock-delay


async def test_ttl_invalidation_deletes_keys(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    session_id, ttl = await ttl_session(consul, http, prefix, "delete")
    key = f"{prefix}/ephemeral"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    async def deleted() -> bool:
        _, entry = await consul.kv.get(key)
        return entry is None

    await eventually(deleted, seconds=2 * ttl + 15)
    assert (await consul.session.info(session_id))[1] is None
