"""Fixtures for the registry contract: the dev registry always, a real Consul when ``CONSUL_HTTP_ADDR`` is set.

Tests only talk HTTP to ``registry_addr``: through py-consul (``epoxi.registry.client``) and, where
py-consul cannot show a status code or body, through raw aiohttp requests. Names are unique per
test and cleaned up afterwards, so the suite can also run against a shared real agent. Settings
that differ between the two (minimum session TTL, reaper timing) are read from
``/v1/agent/self``'s ``DebugConfig``, which both expose.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from devmesh.registry.app import serve
from devmesh.registry.state import RegistryConfig
from epoxi import durations
from epoxi.registry.client import Consul, token_from_env

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


@pytest.fixture(autouse=True)
async def clean_up(consul: Consul, prefix: str) -> AsyncIterator[None]:
    """After each test, remove the services, node checks, keys and sessions named with its
    ``prefix`` (``consul`` is the top-level fixture, a client for the ``registry_addr`` above)."""
    yield
    for service_id in await consul.agent.services():
        if service_id.startswith(prefix):
            await consul.agent.service.deregister(service_id)
    for check_id in await consul.agent.checks():
        if check_id.startswith(prefix):
            await consul.agent.check.deregister(check_id)
    await consul.kv.delete(prefix, recurse=True)
    _, sessions = await consul.session.list()
    for session in sessions:
        if session["Name"].startswith(prefix):
            await consul.session.destroy(session["ID"])


@pytest.fixture
async def http(registry_addr: str) -> AsyncIterator[aiohttp.ClientSession]:
    """Raw requests; against a real Consul they carry its token (``CONSUL_HTTP_TOKEN[_FILE]``),
    so the suite also runs against an agent that enforces ACLs."""
    scheme = "" if "://" in registry_addr else "http://"
    token = token_from_env() if registry_addr == os.environ.get("CONSUL_HTTP_ADDR") else None
    headers = {"X-Consul-Token": token} if token else None
    async with aiohttp.ClientSession(base_url=f"{scheme}{registry_addr}", headers=headers) as session:
        yield session
