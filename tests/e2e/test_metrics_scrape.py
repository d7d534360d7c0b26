"""Every service's /metrics, scraped across processes after a known workload, and parsed with
prometheus_client's parser: a mesh of processes (devmesh.supervisor.Mesh, with the SMTP
ingress), a real sink that refuses one recipient, and one RouteEmails call of 30 emails to two
routing keys on two nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi.envelope import new_email
from epoxi.registry import client
from epoxi.routing import routing_key
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from tests.scrape import Scrape, scrape
from tests.support import batch_without_waiting, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALPHA_IP, BETA_IP = "127.0.0.2", "127.0.0.4"
ALPHA = routing_key("alpha.example", ALPHA_IP)  # on node1, the only node with its IP
BETA = routing_key("beta.example", BETA_IP)  # on node2
REFUSED = "nobody@beta.example"
ALPHA_EMAILS, BETA_EMAILS = 20, 10


def email(to: str, ip: str) -> email_pb2.Email:
    return new_email(
        "Sender <sender@epoxi.dev>", to=[to], subject="scrape", text="hi", delivery=email_pb2.Delivery(ip=ip)
    )


WORKLOAD = (
    [email(f"u{i}@alpha.example", ALPHA_IP) for i in range(ALPHA_EMAILS)]
    + [email(f"u{i}@beta.example", BETA_IP) for i in range(BETA_EMAILS - 1)]
    + [email(REFUSED, BETA_IP)]
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sink() -> AsyncIterator[Sink]:
    s = await Sink(replies={REFUSED: "550 5.1.1 No such user here"}).start()
    yield s
    await s.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> AsyncIterator[Mesh]:
    nodes = [NodeSpec("node1", [ALPHA_IP, "127.0.0.3"]), NodeSpec("node2", [BETA_IP, "127.0.0.5"])]
    m = Mesh(
        data_dir=tmp_path_factory.mktemp("scrape"),
        nodes=nodes,
        route=f"*={sink.address}",
        ingress=True,
        check_interval="200ms",
    )
    await m.start()
    try:
        assert m.consul is not None
        await batch_without_waiting(m.consul)
        async with channel(m.address("router")) as ch:
            reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
                router_pb2.RouteEmailsRequest(emails=WORKLOAD), timeout=30
            )
        assert reply.successful_batches == 2, reply
        assert {b.routing_key: b.node for b in reply.batches} == {ALPHA: "node1", BETA: "node2"}
        yield m
    finally:
        await m.stop()


async def test_the_router_counts_the_workload(mesh: Mesh) -> None:
    m = await scrape(mesh.metrics_url("router"))
    assert m.value("epoxi_router_emails_total", outcome="accepted") == ALPHA_EMAILS + BETA_EMAILS
    assert m.value("epoxi_router_emails_total", outcome="failed") == 0
    assert m.value("epoxi_router_batches_total", node="node1", outcome="accepted") == 1
    assert m.value("epoxi_router_batches_total", node="node2", outcome="accepted") == 1
    assert m.total("epoxi_router_batches_total") == 2
    assert m.value("epoxi_router_placements_total", decision="placed") == 2
    assert m.value("epoxi_router_fallbacks_total") == 0
    assert m.value("epoxi_router_route_seconds_count") == 1
    assert (
        m.value("epoxi_grpc_server_handled_total", method="epoxi.v1.RouterService/RouteEmails", code="OK")
        == 1
    )


async def test_the_router_shows_the_registry_s_probes_its_view_age_and_lag(mesh: Mesh) -> None:
    # The registry probes the router's health every check interval (the mesh waited only for the nodes').
    async def probed() -> float:
        m = await scrape(mesh.metrics_url("router"))
        return m.total("epoxi_grpc_server_handled_total", method="grpc.health.v1.Health/Check")

    assert await eventually(probed) >= 1
    m = await scrape(mesh.metrics_url("router"))
    age = m.value("epoxi_router_registry_view_age_seconds")
    assert 0 <= age < 60, age
    assert m.value("epoxi_registry_blocking_query_lag_seconds_count") >= 1


async def deliveries(mesh: Mesh, node: str) -> Scrape:
    """``node``'s figures, once every recipient of the workload on it has its outcome."""
    wanted = ALPHA_EMAILS if node == "node1" else BETA_EMAILS
    key = ALPHA if node == "node1" else BETA

    async def done() -> Scrape | None:
        m = await scrape(mesh.metrics_url(node))
        return m if m.total("epoxi_node_deliveries_total", routing_key=key) >= wanted else None

    return await eventually(done)


async def test_each_node_counts_its_key_s_deliveries_and_bounces(mesh: Mesh) -> None:
    m1 = await deliveries(mesh, "node1")
    assert m1.value("epoxi_node_messages_accepted_total", routing_key=ALPHA) == ALPHA_EMAILS
    assert m1.value("epoxi_node_deliveries_total", routing_key=ALPHA, outcome="delivered") == ALPHA_EMAILS
    assert m1.total("epoxi_node_deliveries_total", routing_key=ALPHA, outcome="bounced") == 0
    method = "epoxi.v1.NodeService/EnqueueBatch"
    assert m1.value("epoxi_grpc_server_handled_total", method=method, code="OK") == 1

    m2 = await deliveries(mesh, "node2")
    assert m2.value("epoxi_node_messages_accepted_total", routing_key=BETA) == BETA_EMAILS
    assert m2.value("epoxi_node_deliveries_total", routing_key=BETA, outcome="delivered") == BETA_EMAILS - 1
    assert m2.value("epoxi_node_deliveries_total", routing_key=BETA, outcome="bounced") == 1
    assert m2.value("epoxi_node_smtp_replies_total", routing_key=BETA, **{"class": "5xx"}) == 1
    assert m2.value("epoxi_grpc_server_handled_total", method=method, code="OK") == 1


async def test_every_service_serves_metrics_and_registers_where(mesh: Mesh) -> None:
    serving = [name for name in mesh.processes if name not in ("registry", "sink")]
    assert set(serving) == {"node1", "node2", "router", "monitor", "gateway", "ingress"}
    for name in serving:
        m = await scrape(mesh.metrics_url(name))
        assert m.value("epoxi_build_info", service=name.rstrip("0123456789")) == 1, name
        assert "process_cpu_seconds_total" in m.names, name
    # The registered services name their /metrics in their Meta, for Prometheus's consul_sd.
    assert mesh.consul is not None
    consul = client.connect(mesh.consul)
    try:
        _, registered = await consul.catalog.services()
        for service, name in [
            ("epoxi-router", "router"),
            ("epoxi-monitor", "monitor"),
            ("epoxi-ingress", "ingress"),
        ]:
            assert service in registered, registered
            _, entries = await consul.health.service(service)
            assert [e["Service"]["Meta"].get("metrics") for e in entries] == [
                mesh.processes[name].metrics_address
            ], service
    finally:
        await consul.close()


async def test_the_gateway_counts_requests_by_route(mesh: Mesh) -> None:
    gateway = f"http://{mesh.address('gateway')}"
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/healthz", f"/v1/pipelines/{ALPHA}", "/no/such/path"):
            async with http.get(gateway + path) as response:
                await response.read()
    m = await scrape(mesh.metrics_url("gateway"))
    requests = "epoxi_gateway_http_requests_total"
    assert m.value(requests, method="GET", route="/healthz", code="200") == 2
    assert m.value(requests, method="GET", route="/v1/pipelines/{routing_key}", code="200") == 1
    assert m.total(requests, route="unmatched", code="404") == 1
    assert m.value("epoxi_gateway_http_request_duration_seconds_count", method="GET", route="/healthz") == 2
    assert not [s for s in m.matching(requests) if ALPHA in s.labels["route"] or "/no/" in s.labels["route"]]
