"""``/v1/health/*``: filters, node checks and blocking queries."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from consul import Check

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul


async def register_pair(consul: Consul, prefix: str) -> None:
    """``<prefix>-up`` passing with tags a, b; ``<prefix>-down`` critical with tag a."""
    await consul.agent.service.register(
        prefix, service_id=f"{prefix}-up", tags=["a", "b"], check=Check.ttl("30s")
    )
    await consul.agent.service.register(
        prefix, service_id=f"{prefix}-down", tags=["a"], check=Check.ttl("30s")
    )
    await consul.agent.check.ttl_pass(f"service:{prefix}-up")


async def test_service_health_includes_node_and_service_checks(consul: Consul, prefix: str) -> None:
    await register_pair(consul, prefix)
    me = await consul.agent.self()

    _, nodes = await consul.health.service(prefix)

    by_id = {entry["Service"]["ID"]: entry for entry in nodes}
    assert set(by_id) == {f"{prefix}-up", f"{prefix}-down"}
    up = by_id[f"{prefix}-up"]
    assert up["Node"]["Node"] == me["Config"]["NodeName"]
    assert [c["CheckID"] for c in up["Checks"]] == ["serfHealth", f"service:{prefix}-up"]
    assert up["Checks"][0]["Status"] == "passing"
    assert up["Service"]["Tags"] == ["a", "b"]


async def test_passing_filter(consul: Consul, prefix: str) -> None:
    await register_pair(consul, prefix)

    _, nodes = await consul.health.service(prefix, passing=True)

    assert [entry["Service"]["ID"] for entry in nodes] == [f"{prefix}-up"]


async def test_tag_filters_must_all_match(http: aiohttp.ClientSession, consul: Consul, prefix: str) -> None:
    await register_pair(consul, prefix)

    async with http.get(f"/v1/health/service/{prefix}", params=[("tag", "a"), ("tag", "B")]) as response:
        both = await response.json()
    _, only_a = await consul.health.service(prefix, tag="a")

    assert [entry["Service"]["ID"] for entry in both] == [f"{prefix}-up"]
    assert {entry["Service"]["ID"] for entry in only_a} == {f"{prefix}-up", f"{prefix}-down"}


async def test_query_meta_headers(http: aiohttp.ClientSession, consul: Consul, prefix: str) -> None:
    await register_pair(consul, prefix)

    async with http.get(f"/v1/health/service/{prefix}") as response:
        assert response.status == 200
        assert int(response.headers["X-Consul-Index"]) > 0
        assert response.headers["X-Consul-KnownLeader"] == "true"
        assert response.headers["X-Consul-LastContact"] == "0"
        assert response.headers["Content-Type"] == "application/json"


async def test_blocking_query_wakes_on_change(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, service_id=f"{prefix}-1", check=Check.ttl("30s"))
    index, _ = await consul.health.service(prefix, passing=True)

    waiter = asyncio.create_task(consul.health.service(prefix, passing=True, index=index, wait="30s"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await consul.agent.check.ttl_pass(f"service:{prefix}-1")

    new_index, nodes = await asyncio.wait_for(waiter, 15)
    assert int(new_index) > int(index)
    assert [entry["Service"]["ID"] for entry in nodes] == [f"{prefix}-1"]


async def test_blocking_query_times_out_with_the_same_index(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix)
    index, before = await consul.health.service(prefix)

    same_index, after = await consul.health.service(prefix, index=index, wait="1s")

    assert same_index == index
    assert after == before


async def test_checks_of_service_and_checks_in_state(consul: Consul, prefix: str) -> None:
    await register_pair(consul, prefix)

    _, checks = await consul.health.checks(prefix)
    _, critical = await consul.health.state("critical")
    _, passing = await consul.health.state("passing")

    assert {c["CheckID"] for c in checks} == {f"service:{prefix}-up", f"service:{prefix}-down"}
    assert f"service:{prefix}-down" in {c["CheckID"] for c in critical}
    assert {"serfHealth", f"service:{prefix}-up"} <= {c["CheckID"] for c in passing}
