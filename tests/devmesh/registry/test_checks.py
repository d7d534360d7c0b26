"""Check updates, TTL expiry, gRPC probing and the reaper."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from consul import Check
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epoxi.registry.client import Consul
from tests.devmesh.registry.support import debug_duration
from tests.support import eventually

pytestmark = pytest.mark.consul

SERVICE = "epoxi.test.Probe"


class CountingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """A health service that counts the probes it has answered, by serving status."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: Counter[int] = Counter()

    async def Check(self, request: Any, context: Any) -> Any:
        response = await super().Check(request, context)
        self.answered[response.status] += 1
        return response


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[int, CountingHealth]]:
    server = grpc.aio.server()
    servicer = CountingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def agent_check(consul: Consul, check_id: str, **wanted: str) -> dict[str, Any] | None:
    check: dict[str, Any] | None = (await consul.agent.checks()).get(check_id)
    if check is not None and all(check.get(key) == value for key, value in wanted.items()):
        return check
    return None


async def test_pass_warn_fail_set_status_and_output(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    check_id = f"service:{prefix}"

    await consul.agent.check.ttl_warn(check_id, notes="slow")
    assert await agent_check(consul, check_id, Status="warning", Output="slow")
    await consul.agent.check.ttl_fail(check_id, notes="down")
    assert await agent_check(consul, check_id, Status="critical", Output="down")
    await consul.agent.check.ttl_pass(check_id)
    assert await agent_check(consul, check_id, Status="passing", Output="")


async def test_update_endpoint_takes_status_and_output(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))

    body = {"status": "warning", "OUTPUT": "queue deep"}
    async with http.put(f"/v1/agent/check/update/service:{prefix}", json=body) as response:
        assert response.status == 200

    assert await agent_check(consul, f"service:{prefix}", Status="warning", Output="queue deep")


async def test_ttl_expiry_keeps_last_output(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("1s"))
    check_id = f"service:{prefix}"
    await consul.agent.check.ttl_pass(check_id, notes="alive")

    check = await eventually(lambda: agent_check(consul, check_id, Status="critical"))

    assert check["Output"] == "TTL expired (last output before timeout follows): alive"
    _, nodes = await consul.health.service(prefix)
    assert nodes[0]["Checks"][-1]["Status"] == "critical"


async def test_ttl_expiry_without_output(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("1s"))
    check_id = f"service:{prefix}"
    await consul.agent.check.ttl_pass(check_id)

    check = await eventually(lambda: agent_check(consul, check_id, Status="critical"))

    assert check["Output"] == "TTL expired"


async def test_grpc_check_follows_serving_status(
    consul: Consul, prefix: str, health_server: tuple[int, CountingHealth]
) -> None:
    port, servicer = health_server
    target = f"127.0.0.1:{port}/{SERVICE}"
    await consul.agent.service.register(prefix, port=port, check=Check.grpc(target, "1s", timeout="2s"))
    check_id = f"service:{prefix}"

    check = await eventually(lambda: agent_check(consul, check_id, Status="passing"))
    assert check["Output"] == f"gRPC check {target}: success"
    assert (check["Type"], check["Interval"], check["Timeout"]) == ("grpc", "1s", "2s")

    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    check = await eventually(lambda: agent_check(consul, check_id, Status="critical"))
    assert check["Output"] == f"gRPC {target} serving status: NOT_SERVING"

    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await eventually(lambda: agent_check(consul, check_id, Status="passing"))


async def test_grpc_check_thresholds_hold_the_status_until_reached(
    consul: Consul, prefix: str, health_server: tuple[int, CountingHealth]
) -> None:
    port, servicer = health_server
    target = f"127.0.0.1:{port}/{SERVICE}"
    check = {
        "GRPC": target,
        "Interval": "1s",
        "Status": "passing",
        "SuccessBeforePassing": 2,
        "FailuresBeforeWarning": 1,
        "FailuresBeforeCritical": 3,
    }
    await consul.agent.service.register(prefix, port=port, check=check)
    check_id = f"service:{prefix}"
    await eventually(lambda: agent_check(consul, check_id, Output=f"gRPC check {target}: success"))

    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    seen: list[str] = []

    async def critical() -> bool:
        status: str = (await consul.agent.checks())[check_id]["Status"]
        seen.append(status)
        return status == "critical"

    await eventually(critical)
    # One failure turns it warning; only the third in a row makes it critical.
    assert servicer.answered[health_pb2.HealthCheckResponse.NOT_SERVING] >= 3
    assert "warning" in seen and seen.index("warning") < seen.index("critical")
    assert set(seen) <= {"passing", "warning", "critical"}

    served = servicer.answered[health_pb2.HealthCheckResponse.SERVING]
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await eventually(lambda: agent_check(consul, check_id, Status="passing"))
    assert servicer.answered[health_pb2.HealthCheckResponse.SERVING] - served >= 2


async def test_grpc_check_of_unreachable_server_is_critical(consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.grpc("127.0.0.1:1", "1s", timeout="1s"))

    async def probed() -> dict[str, Any] | None:
        check = await agent_check(consul, f"service:{prefix}", Status="critical")
        return check if check and check["Output"] else None

    check = await eventually(probed)

    assert check["Output"].startswith("rpc error: code = ")


async def test_critical_service_is_reaped(consul: Consul, prefix: str) -> None:
    # A real Consul reaps after 1m + up to 30s at the earliest; the wait below allows for it.
    minimum = await debug_duration(consul, "CheckDeregisterIntervalMin")
    period = await debug_duration(consul, "CheckReapInterval")
    check = {"TTL": "1s", "DeregisterCriticalServiceAfter": "1s"}
    await consul.agent.service.register(prefix, check=check)
    await consul.agent.check.ttl_pass(f"service:{prefix}")

    async def gone() -> bool:
        return prefix not in await consul.agent.services()

    await eventually(gone, seconds=10 + minimum + 2 * period)
    assert f"service:{prefix}" not in await consul.agent.checks()
