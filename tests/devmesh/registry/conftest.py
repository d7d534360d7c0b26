"""Fixtures for the registry contract: the dev registry always, a real Consul when ``CONSUL_HTTP_ADDR`` is set.

Tests only talk HTTP to ``registry_addr``: through py-consul (``epoxi.registry.client``) and, where
py-consul cannot show a status code or body, through raw aiohttp requests. Names are unique per
test and cleaned up afterwards, so the suite can also run against a shared real agent. Settings
that differ between the two (minimum session TTL, reaper timing) are read from
``/v1/agent/self``'s ``DebugConfig``, which both expose.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest

from devmesh.registry.app import serve
from devmesh.registry.state import RegistryConfig
from epoxi import durations
from epoxi.registry.client import Consul, connect

T = TypeVar("T")

BACKENDS = ["dev", *(["consul"] if os.environ.get("CONSUL_HTTP_ADDR") else [])]

# Fast enough for tests; the CLI keeps Consul's defaults (10s, 1m, 30s).
DEV_CONFIG = dict(
    node_name="epoxi-dev-node",
    session_ttl_min=1 * durations.SECOND,
    check_deregister_interval_min=0,
    check_reap_interval=100 * durations.MILLISECOND,
)


@pytest.fixture(params=BACKENDS)
async def registry_addr(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "consul":
        yield os.environ["CONSUL_HTTP_ADDR"]
        return
    registry = await serve("127.0.0.1", 0, RegistryConfig(**DEV_CONFIG))  # type: ignore[arg-type]
    try:
        yield registry.address
    finally:
        await registry.close()


@pytest.fixture
def prefix() -> str:
    """A unique name prefix for everything one test creates."""
    return f"epoxi-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def consul(registry_addr: str, prefix: str) -> AsyncIterator[Consul]:
    client = connect(registry_addr)
    try:
        yield client
    finally:
        try:
            for service_id in await client.agent.services():
                if service_id.startswith(prefix):
                    await client.agent.service.deregister(service_id)
            await client.kv.delete(prefix, recurse=True)
            _, sessions = await client.session.list()
            for session in sessions:
                if session["Name"].startswith(prefix):
                    await client.session.destroy(session["ID"])
        finally:
            await client.close()


@pytest.fixture
async def http(registry_addr: str) -> AsyncIterator[aiohttp.ClientSession]:
    scheme = "" if "://" in registry_addr else "http://"
    async with aiohttp.ClientSession(base_url=f"{scheme}{registry_addr}") as session:
        yield session


async def eventually(probe: Callable[[], Awaitable[T | None]], within: float = 15.0, step: float = 0.1) -> T:
    """Poll ``probe`` until it returns something other than ``None``; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            value = await probe()
            if value is not None:
                return value
            await asyncio.sleep(step)


async def debug_duration(consul: Consul, name: str) -> float:
    """A duration setting from ``/v1/agent/self``'s ``DebugConfig``, in seconds."""
    me: dict[str, Any] = await consul.agent.self()
    value = me["DebugConfig"][name]
    return (
        durations.parse(value) / durations.SECOND
        if isinstance(value, str)
        else float(value) / durations.SECOND
    )
