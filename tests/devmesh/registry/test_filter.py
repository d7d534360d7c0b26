"""``?filter``: a filter expression is never silently dropped.

Consul answers an expression it cannot parse with a plain-text 500,
``Failed to create boolean expression evaluator: <why>`` (``HTTPHandlers.wrap`` has no 400 for
it). The dev registry evaluates no expression, so it answers every one that way rather than
return the unfiltered list.
"""

from __future__ import annotations

import os

import aiohttp
import pytest
from consul import Check

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul

EVALUATOR_ERROR = "Failed to create boolean expression evaluator: "

# The list endpoints Consul documents ``filter`` for, as paths under a service named {p}.
FILTERED = [
    "/v1/agent/services",
    "/v1/agent/checks",
    "/v1/catalog/nodes",
    "/v1/catalog/service/{p}",
    "/v1/catalog/node/{node}",
    "/v1/health/service/{p}",
    "/v1/health/checks/{p}",
    "/v1/health/state/any",
    "/v1/health/node/{node}",
]


async def node_name(consul: Consul) -> str:
    name: str = (await consul.agent.self())["Config"]["NodeName"]
    return name


@pytest.mark.parametrize("path", FILTERED)
async def test_an_unparsable_filter_is_a_500_with_the_evaluator_error(
    consul: Consul, http: aiohttp.ClientSession, prefix: str, path: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    url = path.format(p=prefix, node=await node_name(consul))
    async with http.get(url, params={"filter": "foo"}) as response:
        assert response.status == 500
        assert response.content_type == "text/plain"
        assert (await response.text()).startswith(EVALUATOR_ERROR)


async def test_an_empty_filter_is_no_filter(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    async with http.get(f"/v1/health/service/{prefix}", params={"filter": ""}) as response:
        assert response.status == 200
        assert [e["Service"]["ID"] for e in await response.json()] == [prefix]


async def test_kv_takes_no_filter(http: aiohttp.ClientSession, prefix: str) -> None:
    async with http.get(f"/v1/kv/{prefix}/missing", params={"filter": "foo"}) as response:
        assert response.status == 404


@pytest.mark.parametrize("path", [*FILTERED, "/v1/catalog/services"])
async def test_the_dev_registry_refuses_even_a_valid_filter(
    consul: Consul, http: aiohttp.ClientSession, registry_addr: str, prefix: str, path: str
) -> None:
    if registry_addr == os.environ.get("CONSUL_HTTP_ADDR"):
        pytest.skip("a real Consul evaluates the expression")
    url = path.format(p=prefix, node=await node_name(consul))
    async with http.get(url, params={"filter": f'Service == "{prefix}"'}) as response:
        assert response.status == 500
        assert await response.text() == (
            f"{EVALUATOR_ERROR}the development registry does not evaluate filter expressions "
            f'(filter "Service == \\"{prefix}\\"")'
        )


async def test_query_options_are_checked_before_the_filter(http: aiohttp.ClientSession, prefix: str) -> None:
    async with http.get(f"/v1/health/service/{prefix}", params={"filter": "foo", "wait": "soon"}) as response:
        assert (response.status, await response.text()) == (400, "Invalid wait time")
