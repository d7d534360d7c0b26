"""Agent service registration, as ``/v1/agent/service/*`` and ``/v1/agent/services`` answer it."""

from __future__ import annotations

import aiohttp
import pytest
from consul import Check

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul


async def test_register_shows_agent_service_json(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(
        prefix,
        service_id=f"{prefix}-1",
        address="10.1.2.3",
        port=8080,
        tags=["v1", "smtp"],
        meta={"zone": "a"},
    )

    service = (await consul.agent.services())[f"{prefix}-1"]

    assert service == {
        "ID": f"{prefix}-1",
        "Service": prefix,
        "Tags": ["v1", "smtp"],
        "Meta": {"zone": "a"},
        "Port": 8080,
        "Address": "10.1.2.3",
        "TaggedAddresses": {
            "lan_ipv4": {"Address": "10.1.2.3", "Port": 8080},
            "wan_ipv4": {"Address": "10.1.2.3", "Port": 8080},
        },
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Datacenter": "dc1",
    }


async def test_service_id_defaults_to_name_and_single_service_has_content_hash(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, port=1)

    async with http.get(f"/v1/agent/service/{prefix}") as response:
        body = await response.json()
        assert response.status == 200
        assert body["ID"] == prefix
        assert body["ContentHash"] == response.headers["X-Consul-ContentHash"]


async def test_mixed_case_keys_are_accepted(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"nAmE": prefix, "PORT": 25, "tags": ["x"], "CHECKS": [{"ttl": "30s", "NOTES": "n"}]}

    async with http.put("/v1/agent/service/register", json=body) as response:
        assert response.status == 200
        assert await response.text() == ""

    services = await consul.agent.services()
    assert services[prefix]["Port"] == 25
    assert services[prefix]["Tags"] == ["x"]
    assert (await consul.agent.checks())[f"service:{prefix}"]["Notes"] == "n"


async def test_generated_check_ids_names_and_initial_status(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, service_id=f"{prefix}-a", check=Check.ttl("30s"))
    await consul.agent.service.register(
        prefix, service_id=f"{prefix}-b", check=Check.ttl("30s"), extra_checks=[Check.ttl("30s")]
    )

    checks = await consul.agent.checks()

    one = checks[f"service:{prefix}-a"]
    assert (one["Name"], one["Status"], one["Output"], one["Type"]) == (
        f"Service '{prefix}' check",
        "critical",
        "",
        "ttl",
    )
    assert one["ServiceID"] == f"{prefix}-a" and one["ServiceName"] == prefix
    assert {f"service:{prefix}-b:1", f"service:{prefix}-b:2"} <= set(checks)
    assert f"service:{prefix}-b" not in checks


async def test_check_name_id_status_and_notes_are_honoured(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check = {"CheckID": f"{prefix}-alive", "Name": "alive", "TTL": "30s", "Status": "passing", "Notes": "hi"}
    async with http.put("/v1/agent/service/register", json={"Name": prefix, "Check": check}) as response:
        assert response.status == 200

    got = (await consul.agent.checks())[f"{prefix}-alive"]

    assert (got["Name"], got["Status"], got["Notes"], got["ServiceID"]) == ("alive", "passing", "hi", prefix)


async def test_reregistering_updates_and_keeps_check_state(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, port=1, tags=["old"], check=Check.ttl("30s"))
    await consul.agent.check.ttl_pass(f"service:{prefix}", notes="fine")
    _, before = await consul.catalog.service(prefix)

    await consul.agent.service.register(prefix, port=2, tags=["new"], check=Check.ttl("30s"))

    _, after = await consul.catalog.service(prefix)
    assert (after[0]["ServicePort"], after[0]["ServiceTags"]) == (2, ["new"])
    assert after[0]["CreateIndex"] == before[0]["CreateIndex"]
    assert after[0]["ModifyIndex"] > before[0]["ModifyIndex"]
    check = (await consul.agent.checks())[f"service:{prefix}"]
    assert (check["Status"], check["Output"], check["ServiceTags"]) == ("passing", "fine", ["new"])


async def test_identical_reregistration_leaves_the_catalog_untouched(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, port=1, tags=["t"])
    _, before = await consul.catalog.service(prefix)

    await consul.agent.service.register(prefix, port=1, tags=["t"])

    _, after = await consul.catalog.service(prefix)
    assert after[0]["ModifyIndex"] == before[0]["ModifyIndex"]


async def test_replace_existing_checks(consul: Consul, prefix: str) -> None:
    first = {"CheckID": f"{prefix}-1", "TTL": "30s"}
    second = {"CheckID": f"{prefix}-2", "TTL": "30s"}
    await consul.agent.service.register(prefix, check=first, extra_checks=[second])

    await consul.agent.service.register(prefix, check=first)
    assert {f"{prefix}-1", f"{prefix}-2"} <= set(await consul.agent.checks())

    await consul.agent.service.register(prefix, check=first, replace_existing_checks=True)
    checks = await consul.agent.checks()
    assert f"{prefix}-1" in checks
    assert f"{prefix}-2" not in checks


async def test_deregister_removes_service_and_checks_everywhere(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))

    assert await consul.agent.service.deregister(prefix) is True

    assert prefix not in await consul.agent.services()
    assert f"service:{prefix}" not in await consul.agent.checks()
    _, nodes = await consul.catalog.service(prefix)
    assert nodes == []
    _, checks = await consul.health.checks(prefix)
    assert checks == []
