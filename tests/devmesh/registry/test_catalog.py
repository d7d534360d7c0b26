"""``/v1/catalog/*``, ``/v1/status/leader`` and ``/v1/agent/self``."""

from __future__ import annotations

import re

import aiohttp
import pytest

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul


async def test_catalog_services_lists_names_with_tags(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, service_id=f"{prefix}-1", tags=["x"])
    await consul.agent.service.register(prefix, service_id=f"{prefix}-2", tags=["y"])

    index, services = await consul.catalog.services()

    assert int(index) > 0
    assert sorted(services[prefix]) == ["x", "y"]
    assert services["consul"] == []


async def test_catalog_service_returns_service_nodes(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, address="10.9.8.7", port=2525, tags=["mx"], meta={"k": "v"})
    me = await consul.agent.self()

    _, nodes = await consul.catalog.service(prefix)
    _, tagged = await consul.catalog.service(prefix, tag="mx")
    _, untagged = await consul.catalog.service(prefix, tag="nope")

    [node] = nodes
    assert node["Node"] == me["Config"]["NodeName"]
    assert node["Datacenter"] == "dc1"
    assert (node["ServiceID"], node["ServiceName"], node["ServiceTags"]) == (prefix, prefix, ["mx"])
    assert (node["ServiceAddress"], node["ServicePort"], node["ServiceMeta"]) == (
        "10.9.8.7",
        2525,
        {"k": "v"},
    )
    assert node["ServiceWeights"] == {"Passing": 1, "Warning": 1}
    assert node["CreateIndex"] <= node["ModifyIndex"]
    assert tagged == nodes
    assert untagged == []


async def test_catalog_nodes_has_the_agent_node(consul: Consul) -> None:
    me = await consul.agent.self()

    _, nodes = await consul.catalog.nodes()

    assert me["Config"]["NodeName"] in [n["Node"] for n in nodes]
    assert all({"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"} <= set(n) for n in nodes)


async def test_status_leader_and_agent_self(consul: Consul) -> None:
    leader = await consul.status.leader()
    me = await consul.agent.self()

    assert re.fullmatch(r"[0-9.]+:8300", leader)
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["Server"] is True
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", me["Config"]["Version"])
    assert me["Member"]["Name"] == me["Config"]["NodeName"]


async def test_agent_self_config_and_status_in_consul_shapes(
    consul: Consul, http: aiohttp.ClientSession
) -> None:
    async with http.get("/v1/agent/self") as response:
        assert response.status == 200
        config = (await response.json())["Config"]
    assert config["Datacenter"] == "dc1"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", config["NodeID"])
    _, [node] = await consul.catalog.nodes()
    assert (node["Node"], node["ID"]) == (config["NodeName"], config["NodeID"])

    # On a dev agent the one server is the leader and the only peer, on 127.0.0.1:8300.
    async with http.get("/v1/status/leader") as response:
        assert (response.status, response.content_type) == (200, "application/json")
        assert await response.json() == "127.0.0.1:8300"
    async with http.get("/v1/status/peers") as response:
        assert (response.status, response.content_type) == (200, "application/json")
        assert await response.json() == ["127.0.0.1:8300"]
