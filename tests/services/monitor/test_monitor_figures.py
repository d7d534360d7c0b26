"""Stats and health of a known cluster, figure by figure, over gRPC and through the gateway's
HTTP routes: two nodes, three pipelines, and mail in every state but bounced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import aiohttp
import pytest
from google.protobuf import duration_pb2, json_format, message

from devmesh.sink import Sink
from epoxi.registry import services
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, pipeline_pb2
from tests.services.monitor.support import enqueue, equals, key_of, mail
from tests.support import Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub
M = TypeVar("M", bound=message.Message)

FAST = pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=20_000_000))
# One message an hour, one at a time: the first goes out, the next waits in flight for the rate
# limit, the rest stay queued.
TRICKLE = pipeline_pb2.PipelinePolicy(
    batch_timeout=duration_pb2.Duration(nanos=20_000_000),
    allowed_messages=1,
    message_interval=duration_pb2.Duration(seconds=3600),
    batch_size=1,
    max_connections=1,
)
GMAIL, YAHOO, AOL = (
    key_of("gmail.com", "127.0.0.2"),
    key_of("yahoo.com", "127.0.0.3"),
    key_of("aol.com", "127.0.0.4"),
)
# The registry check output of each pipeline once its mail settled.
LINES = {
    AOL: "running: 2 queued, 1 in flight, 0 deferred, 1 delivered, 0 bounced",
    GMAIL: "running: 0 queued, 0 in flight, 0 deferred, 3 delivered, 0 bounced",
    YAHOO: "running: 0 queued, 0 in flight, 2 deferred, 0 delivered, 0 bounced",
}


async def start(nodes: Nodes, id: str, domain: str, ip: str, policy: pipeline_pb2.PipelinePolicy) -> None:
    await nodes.stub(id).StartPipeline(
        node_pb2.StartPipelineRequest(domain=domain, source_ip=ip, policy=policy), timeout=5
    )


@pytest.fixture
async def known(nodes: Nodes, sink: Sink, consul: Any, monitor_stub: Stub) -> AsyncIterator[Nodes]:
    """n1 (.2, .3): gmail.com from .2 with 3 delivered, yahoo.com from .3 with 2 deferred; n2
    (.2, .4): aol.com from .4 with 1 delivered, 1 in flight, 2 queued."""
    await nodes.start("n1", "127.0.0.2", "127.0.0.3")  # retries a minute away: deferred stays deferred
    await nodes.start("n2", "127.0.0.2", "127.0.0.4")
    await start(nodes, "n1", "gmail.com", "127.0.0.2", FAST)
    await start(nodes, "n1", "yahoo.com", "127.0.0.3", FAST)
    await start(nodes, "n2", "aol.com", "127.0.0.4", TRICKLE)
    sink.reply_rule = lambda rcpt: "451 4.3.0 later" if rcpt.endswith("@yahoo.com") else None
    n1, n2 = nodes.running["n1"].address, nodes.running["n2"].address
    await enqueue(nodes, n1, GMAIL, mail("gmail.com", "127.0.0.2", "g", 3), "g")
    await enqueue(nodes, n1, YAHOO, mail("yahoo.com", "127.0.0.3", "y", 2), "y")
    await enqueue(nodes, n2, AOL, mail("aol.com", "127.0.0.4", "a", 4), "a")
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    # A node registers passing; its gRPC check's first run then fills its output.
    await eventually(lambda: node_checks_ran(consul))

    async def settled() -> bool:
        health = await monitor_stub.HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
        return {r.pipeline.routing_key: list(r.outputs) for r in health.results} == {
            k: [line] for k, line in LINES.items()
        }

    # The registry shows what the nodes hold once each pipeline's check has its new output.
    await eventually(settled)
    yield nodes


async def node_checks_ran(consul: Any) -> bool:
    """Whether every node's own check has run (and so has an output)."""
    _, entries = await consul.health.service(services.NODE_SERVICE)
    checks = [c for e in entries for c in e["Checks"] if c["ServiceID"] == e["Service"]["ID"]]
    return bool(checks) and all(c["Output"] for c in checks)


async def get(http: aiohttp.ClientSession, path: str, into: type[M]) -> tuple[M, dict[str, Any]]:
    """GET ``path``: the body as the proto ``into``, and as JSON."""
    async with http.get(path) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return json_format.ParseDict(body, into()), body


def expected_stats() -> m.PipelineStats:
    return m.PipelineStats(
        total_pipelines=3,
        total_nodes=2,
        pipelines_per_node={"n1": 2, "n2": 1},
        pipelines_per_routing_key={AOL: 1, GMAIL: 1, YAHOO: 1},
        totals=pipeline_pb2.PipelineCounters(queued=2, in_flight=1, deferred=2, delivered=4, bounced=0),
    )


async def test_stats_figures_over_grpc_and_http(
    known: Nodes, sink: Sink, monitor_stub: Stub, http: aiohttp.ClientSession
) -> None:
    assert len(sink.received) == 4  # 3 to gmail.com, 1 to aol.com

    stats = (await monitor_stub.GetPipelineStats(m.GetPipelineStatsRequest(), timeout=5)).stats
    assert stats == expected_stats()
    over_http, body = await get(http, "/v1/pipelines:stats", m.GetPipelineStatsResponse)
    assert over_http.stats == stats
    assert body["stats"]["totals"] == {
        "queued": "2",
        "inFlight": "1",
        "deferred": "2",
        "delivered": "4",
        "bounced": "0",
    }
    assert body["stats"]["pipelinesPerNode"] == {"n1": 2, "n2": 1}

    cluster = await monitor_stub.GetClusterStats(m.GetClusterStatsRequest(), timeout=5)
    assert cluster.pipeline_stats == expected_stats()
    assert (cluster.health_summary.healthy, cluster.health_summary.unhealthy) == (3, 0)
    assert [(n.id, n.address, list(n.egress_ips), n.pipeline_count, n.load) for n in cluster.nodes] == [
        ("n1", known.running["n1"].address, ["127.0.0.2", "127.0.0.3"], 2, 2),
        ("n2", known.running["n2"].address, ["127.0.0.2", "127.0.0.4"], 1, 3),
    ]
    cluster_http, body = await get(http, "/admin/pipelines", m.GetClusterStatsResponse)
    assert cluster_http == cluster
    assert body["healthSummary"] == {"healthy": 3, "unhealthy": 0}
    assert [(n["id"], n["pipelineCount"], n["load"]) for n in body["nodes"]] == [
        ("n1", 2, "2"),
        ("n2", 1, "3"),
    ]


async def test_health_figures_over_grpc_and_http(
    known: Nodes, monitor_stub: Stub, http: aiohttp.ClientSession
) -> None:
    health = await monitor_stub.HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
    assert [
        (r.pipeline.routing_key, r.pipeline.node, r.healthy, r.status, list(r.outputs))
        for r in health.results
    ] == [
        (AOL, "n2", True, "passing", [LINES[AOL]]),
        (GMAIL, "n1", True, "passing", [LINES[GMAIL]]),
        (YAHOO, "n1", True, "passing", [LINES[YAHOO]]),
    ]
    assert (health.summary.healthy, health.summary.unhealthy) == (3, 0)
    health_http, body = await get(http, "/admin/pipelines/health", m.HealthCheckAllResponse)
    assert health_http == health
    assert [r["outputs"] for r in body["results"]] == [[LINES[AOL]], [LINES[GMAIL]], [LINES[YAHOO]]]

    one = await monitor_stub.HealthCheckRoutingKey(
        m.HealthCheckRoutingKeyRequest(routing_key=YAHOO), timeout=5
    )
    assert [(r.pipeline.node, r.healthy, list(r.outputs)) for r in one.results] == [
        ("n1", True, [LINES[YAHOO]])
    ]
    assert (one.summary.healthy, one.summary.unhealthy) == (1, 0)
    one_http, body = await get(http, f"/admin/pipelines/{YAHOO}", m.HealthCheckRoutingKeyResponse)
    assert one_http == one
    assert body["summary"] == {"healthy": 1, "unhealthy": 0}
