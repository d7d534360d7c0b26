"""Helpers for the registry contract suite."""

from __future__ import annotations

from typing import Any

import aiohttp
from consul import Check

from epoxi import durations
from epoxi.registry.client import Consul
from tests.support import eventually


async def debug_duration(consul: Consul, name: str) -> float:
    """A duration setting from ``/v1/agent/self``'s ``DebugConfig``, in seconds."""
    me: dict[str, Any] = await consul.agent.self()
    value = me["DebugConfig"][name]
    return (
        durations.parse(value) / durations.SECOND
        if isinstance(value, str)
        else float(value) / durations.SECOND
    )


async def call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    """The status code and body text of one request."""
    async with http.request(method, path, **kwargs) as response:
        return response.status, await response.text()


async def catalog_status(consul: Consul, check_id: str) -> str | None:
    """The status the catalog shows for one of the agent node's checks, ``None`` if it has none."""
    node = (await consul.agent.self())["Config"]["NodeName"]
    _, checks = await consul.health.node(node)
    return next((c["Status"] for c in checks if c["CheckID"] == check_id), None)


async def synced(consul: Consul, check_id: str, status: str) -> None:
    """Wait until the catalog shows the check with ``status``: a real agent syncs its checks to
    the catalog in the background (anti-entropy), and sessions are validated against the catalog."""

    async def shown() -> bool:
        return await catalog_status(consul, check_id) == status

    await eventually(shown, seconds=15)


async def ttl_service(consul: Consul, name: str, passing: bool = True) -> str:
    """A service with one TTL check (critical until passed), synced to the catalog; its check ID."""
    await consul.agent.service.register(name, check=Check.ttl("60s"))
    check_id = f"service:{name}"
    if passing:
        await consul.agent.check.ttl_pass(check_id)
    await synced(consul, check_id, "passing" if passing else "critical")
    return check_id


async def ttl_node_check(http: aiohttp.ClientSession, consul: Consul, name: str, passing: bool = True) -> str:
    """A node-level TTL check (no service) registered through the agent, synced; its ID (= name)."""
    body: dict[str, Any] = {"Name": name, "TTL": "60s", **({"Status": "passing"} if passing else {})}
    assert await call(http, "PUT", "/v1/agent/check/register", json=body) == (200, "")
    await synced(consul, name, "passing" if passing else "critical")
    return name


async def create_session(http: aiohttp.ClientSession, body: dict[str, Any]) -> str:
    """``PUT /v1/session/create`` with a raw body (py-consul cannot send every field); the ID."""
    async with http.put("/v1/session/create", json=body) as response:
        assert response.status == 200, await response.text()
        session_id: str = (await response.json())["ID"]
    return session_id
