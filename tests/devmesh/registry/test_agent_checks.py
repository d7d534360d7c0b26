"""``/v1/agent/check/register`` and maintenance mode, in Consul's shapes and status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from consul import Check

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul

DEFAULT_SERVICE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)


async def call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async with http.request(method, path, **kwargs) as response:
        return response.status, await response.text()


async def health_checks(consul: Consul, service: str) -> dict[str, dict[str, Any]]:
    """The checks ``/v1/health/service/<service>`` lists for its one instance, by check ID."""
    _, [entry] = await consul.health.service(service)
    return {c["CheckID"]: c for c in entry["Checks"]}


async def test_check_registered_with_a_service_id_is_listed_under_it(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, tags=["t1"], check=Check.ttl("30s"))
    body = {"Name": f"{prefix} extra", "ServiceID": prefix, "TTL": "30s", "Notes": "second opinion"}
    assert await call(http, "PUT", "/v1/agent/check/register", json=body) == (200, "")

    check = (await consul.agent.checks())[f"{prefix} extra"]  # the ID defaults to the name
    assert {k: check[k] for k in ("Name", "Status", "Notes", "ServiceID", "ServiceName", "ServiceTags")} == {
        "Name": f"{prefix} extra",
        "Status": "critical",
        "Notes": "second opinion",
        "ServiceID": prefix,
        "ServiceName": prefix,
        "ServiceTags": ["t1"],
    }
    assert check["Type"] == "ttl"
    # Node checks first, then the service's (in check ID order).
    assert list(await health_checks(consul, prefix)) == ["serfHealth", f"{prefix} extra", f"service:{prefix}"]

    await consul.agent.check.ttl_pass(f"{prefix} extra", notes="fine")
    assert (await health_checks(consul, prefix))[f"{prefix} extra"]["Output"] == "fine"
    await consul.agent.service.deregister(prefix)
    assert f"{prefix} extra" not in await consul.agent.checks()


async def test_check_register_takes_py_consul_payload_with_id_and_status(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    check_id = f"{prefix}-own"
    try:
        assert await consul.agent.check.register(
            "own check", check=Check.ttl("30s"), check_id=check_id, service_id=prefix
        )
        check = (await consul.agent.checks())[check_id]
        assert (check["Name"], check["ServiceID"], check["Status"]) == ("own check", prefix, "critical")
    finally:
        await consul.agent.check.deregister(check_id)
    assert check_id not in await consul.agent.checks()


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"TTL": "10s"}, 400, "Missing check name"),
        ({"Name": "x", "TTL": "10s", "Status": "fine"}, 400, "Bad check status"),
        ({"Name": "x"}, 400, "Invalid check: TTL must be > 0 for TTL checks"),
        (
            {"Name": "x", "CheckID": "y", "TTL": "10s"},
            400,
            'Request decode failed: json: unknown field "CheckID"',
        ),
        (
            {"Name": "x", "TTL": "10s", "ServiceID": "epoxi-no-such-service"},
            404,
            'ServiceID "epoxi-no-such-service" does not exist',
        ),
    ],
)
async def test_check_register_errors(
    http: aiohttp.ClientSession, body: dict[str, Any], status: int, reason: str
) -> None:
    assert await call(http, "PUT", "/v1/agent/check/register", json=body) == (status, reason)


async def test_service_maintenance_adds_and_removes_a_critical_check(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    await consul.agent.check.ttl_pass(f"service:{prefix}")
    check_id = f"_service_maintenance:{prefix}"
    path = f"/v1/agent/service/maintenance/{prefix}"

    assert await call(http, "PUT", path, params={"enable": "true", "reason": "disk swap"}) == (200, "")
    check = (await consul.agent.checks())[check_id]
    assert {k: check[k] for k in ("Name", "Status", "Notes", "ServiceID", "ServiceName")} == {
        "Name": "Service Maintenance Mode",
        "Status": "critical",
        "Notes": "disk swap",
        "ServiceID": prefix,
        "ServiceName": prefix,
    }
    assert (await health_checks(consul, prefix))[check_id]["Notes"] == "disk swap"
    _, passing = await consul.health.service(prefix, passing=True)
    assert passing == []
    # A second enable keeps the first reason.
    assert await call(http, "PUT", path, params={"enable": "true", "reason": "other"}) == (200, "")
    assert (await consul.agent.checks())[check_id]["Notes"] == "disk swap"

    assert await call(http, "PUT", path, params={"enable": "false"}) == (200, "")
    assert check_id not in await consul.agent.checks()
    _, passing = await consul.health.service(prefix, passing=True)
    assert [e["Service"]["ID"] for e in passing] == [prefix]
    assert await call(http, "PUT", path, params={"enable": "false"}) == (200, "")  # already off


async def test_service_maintenance_default_reason_through_py_consul(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    assert await consul.agent.service.maintenance(prefix, True)
    assert (await consul.agent.checks())[f"_service_maintenance:{prefix}"]["Notes"] == DEFAULT_SERVICE_REASON
    assert await consul.agent.service.maintenance(prefix, False)
    assert f"_service_maintenance:{prefix}" not in await consul.agent.checks()


async def test_service_maintenance_errors(http: aiohttp.ClientSession, consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    path = f"/v1/agent/service/maintenance/{prefix}"
    assert await call(http, "PUT", path) == (400, "Missing value for enable")
    assert await call(http, "PUT", path, params={"enable": "yes"}) == (400, 'Invalid value for enable: "yes"')
    assert await call(http, "PUT", f"{path}-missing", params={"enable": "true"}) == (
        404,
        f'Unknown service ID "{prefix}-missing". Ensure that the service ID is passed, not the service name.',
    )
    assert await call(http, "GET", path, params={"enable": "true"}) == (405, "method GET not allowed")


@pytest.fixture
async def node_maintenance_off(consul: Consul) -> AsyncIterator[None]:
    """Node maintenance affects every service of the agent: always switch it off again."""
    yield
    await consul.agent.maintenance(False)


async def test_node_maintenance_adds_and_removes_a_node_check(
    consul: Consul, http: aiohttp.ClientSession, prefix: str, node_maintenance_off: None
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    await consul.agent.check.ttl_pass(f"service:{prefix}")

    assert await call(
        http, "PUT", "/v1/agent/maintenance", params={"enable": "true", "reason": "rack move"}
    ) == (
        200,
        "",
    )
    check = (await consul.agent.checks())["_node_maintenance"]
    assert {k: check[k] for k in ("Name", "Status", "Notes", "ServiceID")} == {
        "Name": "Node Maintenance Mode",
        "Status": "critical",
        "Notes": "rack move",
        "ServiceID": "",
    }
    # A node check: listed among the node's checks of every service, which then is not passing.
    assert "_node_maintenance" in await health_checks(consul, prefix)
    _, passing = await consul.health.service(prefix, passing=True)
    assert passing == []

    assert await call(http, "PUT", "/v1/agent/maintenance", params={"enable": "false"}) == (200, "")
    assert "_node_maintenance" not in await consul.agent.checks()
    _, passing = await consul.health.service(prefix, passing=True)
    assert [e["Service"]["ID"] for e in passing] == [prefix]
    assert await call(http, "PUT", "/v1/agent/maintenance") == (400, "Missing value for enable")
