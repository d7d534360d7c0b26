"""The router's /metrics after known routing: emails and batches by outcome, fallbacks,
placement decisions, the age of its registry view, its gRPC calls, and its registry client.
Over real gRPC and HTTP, against test nodes that answer as the node contract says."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from epoxi.observability.config import TelemetryConfig
from epoxi.registry.client import Consul
from services.router.main import SERVICE, RouterConfig, RunningRouter, start_router
from tests.scrape import scrape
from tests.services.router.nodes import ContractNodes, Fault, Script
from tests.services.router.support import email, route, sees

IP = "127.0.0.2"


def metrics_url(router: RunningRouter) -> str:
    return f"http://{router.metrics_address}/metrics"


async def registered_meta(consul: Consul, service_id: str) -> dict[str, str]:
    _, entries = await consul.health.service(SERVICE)
    [entry] = [e for e in entries if e["Service"]["ID"] == service_id]
    meta: dict[str, str] = entry["Service"].get("Meta") or {}
    return meta


async def test_counts_emails_batches_fallbacks_and_placements(
    router: RunningRouter, contract_nodes: ContractNodes, consul: Consul
) -> None:
    a = await contract_nodes.start("a", IP)
    await contract_nodes.start("b", IP)
    await contract_nodes.all_passing()
    await sees(router, "a", "b")
    # The first new key goes to a (both run nothing; a ranks first), which refuses it once:
    # it falls back to b.
    a.faults.append(Script(Fault.REFUSE, grpc.StatusCode.RESOURCE_EXHAUSTED))
    reply = await route(router, email("u@one.example", ip=IP), email("v@one.example", ip=IP))
    assert reply.successful_batches == 1 and reply.fallbacks_used == 1, reply
    reply = await route(router, *(email(f"u@k{i}.example", ip=IP) for i in range(3)))
    assert reply.successful_batches == 3, reply
    # one.example again: its owner is known now.
    reply = await route(router, email("w@one.example", ip=IP), email("x@nowhere.example", ip="10.9.9.9"))
    assert reply.successful_batches == 1 and reply.failed_batches == 1, reply
    with pytest.raises(grpc.aio.AioRpcError):
        await route(router, email("not an address", ip=IP), email("y@one.example", ip=IP))

    m = await scrape(metrics_url(router))
    assert m.value("epoxi_router_emails_total", outcome="accepted") == 2 + 3 + 1
    assert m.value("epoxi_router_emails_total", outcome="failed") == 1
    assert m.value("epoxi_router_emails_total", outcome="unknown") == 0
    assert m.value("epoxi_router_emails_total", outcome="invalid") == 2
    assert m.total("epoxi_router_batches_total", outcome="accepted") == 1 + 3 + 1
    assert m.value("epoxi_router_batches_total", node="b", outcome="accepted") >= 2  # one.example twice
    assert m.value("epoxi_router_batches_total", node="none", outcome="failed") == 1
    assert m.value("epoxi_router_fallbacks_total") == 1
    assert m.value("epoxi_router_placements_total", decision="placed") == 1 + 3
    assert m.value("epoxi_router_placements_total", decision="existing") == 1
    assert m.value("epoxi_router_placements_total", decision="none") == 1
    assert m.value("epoxi_router_route_seconds_count") == 3  # the refused call routed nothing
    age = m.value("epoxi_router_registry_view_age_seconds")
    assert 0 <= age < 60, age

    method = "epoxi.v1.RouterService/RouteEmails"
    assert m.value("epoxi_grpc_server_handled_total", method=method, code="OK") == 3
    assert m.value("epoxi_grpc_server_handled_total", method=method, code="INVALID_ARGUMENT") == 1
    assert m.value("epoxi_grpc_server_handling_seconds_count", method=method) == 4
    # The node watch's blocking queries answered (the dev registry says LastContact 0).
    assert m.value("epoxi_registry_blocking_query_lag_seconds_count") >= 1
    assert m.value("epoxi_registry_blocking_query_lag_seconds_sum") == 0
    assert m.value("epoxi_build_info", service="router") == 1

    meta = await registered_meta(consul, f"router-{socket.gethostname()}")  # the default ID
    assert meta["metrics"] == router.metrics_address


@pytest.fixture
async def router_without_metrics(registry: RunningRegistry) -> AsyncIterator[RunningRouter]:
    config = RouterConfig(
        id="router-quiet",
        listen="127.0.0.1:0",
        consul=registry.address,
        check_interval=1.0,
        telemetry=TelemetryConfig(metrics_listen="off"),
    )
    r = await start_router(config)
    yield r
    await r.close()


async def test_with_metrics_off_nothing_is_served_or_registered(
    router_without_metrics: RunningRouter, contract_nodes: ContractNodes, consul: Consul
) -> None:
    await contract_nodes.start("a", IP)
    await contract_nodes.all_passing()
    await sees(router_without_metrics, "a")
    reply = await route(router_without_metrics, email("u@one.example", ip=IP))
    assert reply.successful_batches == 1
    assert router_without_metrics.metrics_address == ""
    assert not router_without_metrics.metrics.on
    assert "metrics" not in await registered_meta(consul, "router-quiet")
