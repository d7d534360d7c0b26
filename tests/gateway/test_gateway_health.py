"""GET /healthz: 200 while the monitor answers gRPC health SERVING, 503 saying why otherwise;
against the real monitor (and the dev registry), then with the monitor stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devmesh.registry.app import RunningRegistry
from gateway.app import Gateway
from gateway.main import MONITOR, GatewayConfig, start
from services.monitor.main import MonitorConfig, start_monitor
from tests.support import unused_address


async def _health(gateway: Gateway) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{gateway.address}/healthz") as resp,
    ):
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


@pytest.fixture
async def gateway_config(registry: RunningRegistry) -> GatewayConfig:
    return GatewayConfig(listen="127.0.0.1:0", consul=registry.address, router=unused_address(), timeout=2.0)


async def test_healthz_follows_the_monitor(registry: RunningRegistry, gateway_config: GatewayConfig) -> None:
    monitor = await start_monitor(MonitorConfig(listen="127.0.0.1:0", consul=registry.address))
    gateway = await start(GatewayConfig(**{**vars(gateway_config), "monitor": monitor.address}))
    try:
        assert await _health(gateway) == (200, {"status": "SERVING"})
        await monitor.close()
        status, body = await _health(gateway)
        assert status == 503
        assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert body["message"].startswith("epoxi.v1.MonitorService health check failed: UNAVAILABLE")
    finally:
        await monitor.close()
        await gateway.close()


async def test_healthz_without_a_monitor_in_the_registry(gateway_config: GatewayConfig) -> None:
    gateway = await start(gateway_config)
    try:
        assert await _health(gateway) == (
            503,
            {"code": 14, "message": "no passing epoxi-monitor in the registry", "details": []},
        )
    finally:
        await gateway.close()


@pytest.fixture
async def not_serving() -> AsyncIterator[str]:
    """A gRPC server whose health says the monitor's service is NOT_SERVING."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set(MONITOR.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_healthz_when_the_monitor_is_not_serving(
    gateway_config: GatewayConfig, not_serving: str
) -> None:
    gateway = await start(GatewayConfig(**{**vars(gateway_config), "monitor": not_serving}))
    try:
        status, body = await _health(gateway)
    finally:
        await gateway.close()
    assert (status, body["message"]) == (503, "epoxi.v1.MonitorService answers health NOT_SERVING")


async def test_healthz_is_get_only(gateway_config: GatewayConfig) -> None:
    gateway = await start(gateway_config)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://{gateway.address}/healthz") as resp,
        ):
            assert (resp.status, resp.headers["Allow"]) == (405, "GET")
            assert (await resp.json())["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    finally:
        await gateway.close()
