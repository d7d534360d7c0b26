"""``GET /admin/pipelines*`` through the gateway, in front of the real monitor, registry and nodes."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp

from devmesh.registry.app import RunningRegistry
from devmesh.supervisor import spawn
from gateway import main as gateway_main
from gateway.app import Gateway
from services.monitor.main import RunningMonitor
from tests.support import Nodes, eventually


async def get(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def test_get_admin_pipelines_is_cluster_stats(cluster: Nodes, http: aiohttp.ClientSession) -> None:
    body = await get(http, "/admin/pipelines")
    stats = body["pipelineStats"]
    assert (stats["totalPipelines"], stats["totalNodes"]) == (3, 2)
    assert stats["pipelinesPerNode"] == {"node1": 2, "node2": 1}
    assert stats["pipelinesPerRoutingKey"]["gmail.com_127_0_0_2"] == 1
    # Zero counters are shown (uint64 is a JSON string in proto3 JSON).
    assert stats["totals"] == {
        "queued": "0",
        "inFlight": "0",
        "deferred": "0",
        "delivered": "0",
        "bounced": "0",
    }
    assert body["healthSummary"] == {"healthy": 3, "unhealthy": 0}
    assert [n["id"] for n in body["nodes"]] == ["node1", "node2"]
    assert body["nodes"][1]["egressIps"] == ["127.0.0.2", "127.0.0.4"]


async def test_get_admin_pipelines_health(cluster: Nodes, http: aiohttp.ClientSession) -> None:
    body = await get(http, "/admin/pipelines/health")
    assert [r["pipeline"]["routingKey"] for r in body["results"]] == [
        "gmail.com_127_0_0_2",
        "gmail.com_127_0_0_4",
        "yahoo.com_127_0_0_3",
    ]
    assert all(r["healthy"] and r["status"] == "passing" for r in body["results"])
    assert body["summary"] == {"healthy": 3, "unhealthy": 0}


async def test_get_admin_pipelines_routing_key(cluster: Nodes, http: aiohttp.ClientSession) -> None:
    body = await get(http, "/admin/pipelines/yahoo.com_127_0_0_3")
    [result] = body["results"]
    assert result["pipeline"]["node"] == "node1"
    assert result["pipeline"]["healthy"] is True
    assert result["outputs"][0].startswith("running")


async def test_admin_errors_are_status_json(monitor: RunningMonitor, http: aiohttp.ClientSession) -> None:
    assert await get(http, "/admin/pipelines/gmail.com_127_0_0_9", 404) == {
        "code": 5,
        "message": "no pipeline has routing key gmail.com_127_0_0_9",
        "details": [],
    }
    bad = await get(http, "/admin/pipelines/not-a-key", 400)
    assert (bad["code"], bad["message"]) == (
        3,
        "routing key 'not-a-key' is not <domain>_<source ip>, e.g. gmail.com_192_168_1_1",
    )
    assert (await get(http, "/admin/nothing", 404))["code"] == 5
    async with http.put("/admin/pipelines") as resp:
        assert resp.status == 405
        assert (await resp.json())["code"] == 12


async def test_gateway_finds_the_monitor_in_the_registry(
    registry: RunningRegistry, monitor: RunningMonitor
) -> None:
    config = gateway_main.GatewayConfig(listen="127.0.0.1:0", consul=registry.address, timeout=5.0)
    gateway: Gateway = await gateway_main.start(config)
    try:
        async with aiohttp.ClientSession(base_url=f"http://{gateway.address}") as http:

            async def answered() -> Any:
                async with http.get("/admin/pipelines/health") as resp:
                    return await resp.json() if resp.status == 200 else None

            # 503 until the registry's GRPC check of the monitor has passed once.
            assert await eventually(answered) == {"results": [], "summary": {"healthy": 0, "unhealthy": 0}}
    finally:
        await gateway.close()


async def test_processes_print_ready_lines_and_leave_the_registry_on_sigterm(
    registry: RunningRegistry, consul: Any
) -> None:
    async def monitors() -> list[str]:
        _, entries = await consul.health.service("epoxi-monitor", passing=True)
        return [f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries]

    monitor = await spawn(
        "monitor",
        [
            "services.monitor",
            "--listen",
            "127.0.0.1:0",
            "--consul",
            registry.address,
            "--check-interval",
            "200ms",
        ],
    )
    gateway = None
    try:
        assert monitor.lines[-1].strip() == f"monitor listening on {monitor.address}"
        assert await eventually(monitors) == [monitor.address]
        gateway = await spawn("gateway", ["gateway", "--listen", "127.0.0.1:0", "--consul", registry.address])
        assert gateway.lines[-1].strip() == f"gateway listening on {gateway.address}"
        async with aiohttp.ClientSession() as http:
            body = await get(http, f"http://{gateway.address}/admin/pipelines")
        assert body["pipelineStats"]["totalPipelines"] == 0
        assert await gateway.stop(signal.SIGTERM) == 0
        gateway = None
    finally:
        if gateway is not None:
            await gateway.stop()
        code = await monitor.stop(signal.SIGTERM)
    assert code == 0
    _, entries = await consul.health.service("epoxi-monitor")
    assert entries == []
