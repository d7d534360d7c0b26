"""Stats and health checks against the dev registry and real nodes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from devmesh.registry.app import serve
from devmesh.sink import Sink
from epoxi.registry import services
from epoxi.v1 import email_pb2, monitor_pb2_grpc, node_pb2, pipeline_pb2
from epoxi.v1 import monitor_pb2 as m
from services.monitor.main import MonitorConfig, start_monitor
from tests.services.monitor.support import register_pipeline
from tests.support import Nodes, eventually

Stub = monitor_pb2_grpc.MonitorServiceStub


async def test_pipeline_stats_count_from_the_registry_and_sum_live_counters(
    cluster: Nodes, sink: Sink, monitor_stub: Stub
) -> None:
    email = email_pb2.Email(
        to=["ann@gmail.com"], subject="hi", text="hello", delivery=email_pb2.Delivery(ip="127.0.0.2")
    )
    setattr(email, "from", "sender@epoxi.dev")
    await cluster.stub("node1").EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key="gmail.com_127_0_0_2", emails=[email, email]), timeout=5
    )
    await sink.wait_for(2)

    async def delivered() -> m.PipelineStats | None:
        stats = (await monitor_stub.GetPipelineStats(m.GetPipelineStatsRequest(), timeout=5)).stats
        return stats if stats.totals.delivered == 2 else None

    stats = await eventually(delivered)
    assert stats is not None
    assert (stats.total_pipelines, stats.total_nodes) == (3, 2)
    # Per pipeline too, each as its node reports it, in node and routing-key order.
    cluster_stats = await monitor_stub.GetClusterStats(m.GetClusterStatsRequest(), timeout=5)
    assert [(p.node, p.routing_key, p.counters.delivered, p.healthy) for p in cluster_stats.pipelines] == [
        ("node1", "gmail.com_127_0_0_2", 2, True),
        ("node1", "yahoo.com_127_0_0_3", 0, True),
        ("node2", "gmail.com_127_0_0_4", 0, True),
    ]
    assert {p.status for p in cluster_stats.pipelines} == {pipeline_pb2.PIPELINE_STATUS_RUNNING}
    assert dict(stats.pipelines_per_node) == {"node1": 2, "node2": 1}
    assert dict(stats.pipelines_per_routing_key) == {
        "gmail.com_127_0_0_2": 1,
        "yahoo.com_127_0_0_3": 1,
        "gmail.com_127_0_0_4": 1,
    }
    assert (stats.totals.queued, stats.totals.in_flight, stats.totals.bounced) == (0, 0, 0)


async def test_cluster_stats(cluster: Nodes, monitor_stub: Stub) -> None:
    response = await monitor_stub.GetClusterStats(m.GetClusterStatsRequest(), timeout=5)
    assert response.pipeline_stats.total_pipelines == 3
    assert (response.health_summary.healthy, response.health_summary.unhealthy) == (3, 0)
    assert [(n.id, n.pipeline_count, list(n.egress_ips)) for n in response.nodes] == [
        ("node1", 2, ["127.0.0.2", "127.0.0.3"]),
        ("node2", 1, ["127.0.0.2", "127.0.0.4"]),
    ]
    assert response.nodes[0].address == cluster.running["node1"].address
    assert [(h.node, h.healthy, h.status, h.answered) for h in response.node_health] == [
        ("node1", True, "passing", True),
        ("node2", True, "passing", True),
    ]


async def test_a_node_that_does_not_answer_contributes_no_counters(
    cluster: Nodes, consul: Any, monitor_stub: Stub
) -> None:
    ghost = node_pb2.NodeInfo(id="ghost", address="127.0.0.1:1", egress_ips=["127.0.0.9"], pipeline_count=7)
    registration = services.node_registration(ghost, "1s", "1m")
    registration["check"] = {"Name": "always passing", "TTL": "1m", "Status": "passing"}
    await consul.agent.service.register(**registration)

    response = await monitor_stub.GetClusterStats(m.GetClusterStatsRequest(), timeout=5)
    assert response.pipeline_stats.total_nodes == 3
    assert response.pipeline_stats.pipelines_per_node["ghost"] == 0
    # Its registry entry stands in for the live state it could not give.
    assert [(n.id, n.pipeline_count) for n in response.nodes] == [("ghost", 7), ("node1", 2), ("node2", 1)]
    # Passing in the registry, but it did not answer.
    assert [(h.node, h.healthy, h.answered) for h in response.node_health] == [
        ("ghost", True, False),
        ("node1", True, True),
        ("node2", True, True),
    ]


async def test_health_check_all(cluster: Nodes, monitor_stub: Stub) -> None:
    response = await monitor_stub.HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
    assert [(r.pipeline.routing_key, r.pipeline.node) for r in response.results] == [
        ("gmail.com_127_0_0_2", "node1"),
        ("gmail.com_127_0_0_4", "node2"),
        ("yahoo.com_127_0_0_3", "node1"),
    ]
    assert all(r.healthy and r.status == "passing" for r in response.results)
    assert all(len(r.outputs) == 1 and r.outputs[0].startswith("running") for r in response.results)
    assert (response.summary.healthy, response.summary.unhealthy) == (3, 0)


async def test_failing_and_warning_checks_show_in_health(
    cluster: Nodes, consul: Any, monitor_stub: Stub
) -> None:
    stuck = await register_pipeline(consul, "node9", "stuck.example", "127.0.0.8")
    slow = await register_pipeline(consul, "node9", "slow.example", "127.0.0.8")
    # Checks start critical, and Consul syncs an output-only change late: pass first, then fail.
    await consul.agent.check.ttl_pass(stuck, notes="running")
    await consul.agent.check.ttl_fail(stuck, notes="failed: smtp refused 3 times")
    await consul.agent.check.ttl_warn(slow, notes="deferring: 4xx from mx")

    response = await monitor_stub.HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
    by_key = {r.pipeline.routing_key: r for r in response.results}
    assert (by_key["stuck.example_127_0_0_8"].healthy, by_key["stuck.example_127_0_0_8"].status) == (
        False,
        "critical",
    )
    assert list(by_key["stuck.example_127_0_0_8"].outputs) == ["failed: smtp refused 3 times"]
    assert (by_key["slow.example_127_0_0_8"].healthy, by_key["slow.example_127_0_0_8"].status) == (
        False,
        "warning",
    )
    assert (response.summary.healthy, response.summary.unhealthy) == (3, 2)

    one = await monitor_stub.HealthCheckRoutingKey(
        m.HealthCheckRoutingKeyRequest(routing_key="stuck.example_127_0_0_8")
    )
    assert [r.pipeline.name for r in one.results] == ["epoxi-pipeline-node9-stuck.example_127_0_0_8"]
    assert (one.summary.healthy, one.summary.unhealthy) == (0, 1)

    cluster_stats = await monitor_stub.GetClusterStats(m.GetClusterStatsRequest(), timeout=5)
    assert (cluster_stats.health_summary.healthy, cluster_stats.health_summary.unhealthy) == (3, 2)
    # No node9 answers for them: they show as registered, unhealthy, without counters.
    unanswered = {p.routing_key: p for p in cluster_stats.pipelines if p.node == "node9"}
    assert {k: p.healthy for k, p in unanswered.items()} == {
        "slow.example_127_0_0_8": False,
        "stuck.example_127_0_0_8": False,
    }
    passing = await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(passing_only=True), timeout=5)
    assert "node9" not in passing.nodes


async def test_health_check_routing_key(cluster: Nodes, monitor_stub: Stub) -> None:
    response = await monitor_stub.HealthCheckRoutingKey(
        m.HealthCheckRoutingKeyRequest(routing_key="yahoo.com_127_0_0_3"), timeout=5
    )
    [result] = response.results
    assert (result.pipeline.node, result.healthy, result.status) == ("node1", True, "passing")
    assert (response.summary.healthy, response.summary.unhealthy) == (1, 0)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.HealthCheckRoutingKey(
            m.HealthCheckRoutingKeyRequest(routing_key="yahoo.com_127_0_0_4"), timeout=5
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no pipeline has routing key yahoo.com_127_0_0_4"


async def test_an_empty_cluster_answers_with_zeros(monitor_stub: Stub) -> None:
    stats = (await monitor_stub.GetPipelineStats(m.GetPipelineStatsRequest(), timeout=5)).stats
    assert (stats.total_pipelines, stats.total_nodes, stats.totals.delivered) == (0, 0, 0)
    assert stats.HasField("totals")
    health = await monitor_stub.HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
    assert (list(health.results), health.summary.healthy, health.summary.unhealthy) == ([], 0, 0)


async def test_registry_down_is_unavailable() -> None:
    registry = await serve("127.0.0.1", 0)
    monitor = await start_monitor(
        MonitorConfig(listen="127.0.0.1:0", consul=registry.address, id="monitor-down")
    )
    try:
        await registry.close()
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await Stub(channel).HealthCheckAll(m.HealthCheckAllRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot read epoxi-pipeline from the registry" in (e.value.details() or "")
    finally:
        await monitor.close()


@pytest.mark.parametrize(
    ("call", "request_"),
    [
        ("GetClusterStats", m.GetClusterStatsRequest()),
        ("GetPipelineStats", m.GetPipelineStatsRequest()),
        ("StopPipelineByRoutingKey", m.StopPipelineByRoutingKeyRequest(routing_key="gmail.com_127_0_0_2")),
        ("FindNodeForRoutingKey", m.FindNodeForRoutingKeyRequest(routing_key="gmail.com_127_0_0_2")),
        ("Rebalance", m.RebalanceRequest(dry_run=True)),
    ],
)
async def test_registry_down_is_one_unavailable_per_call(
    call: str, request_: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # These calls ask the registry several things at once; each failed query used to abort the
    # call again, and the second abort logged "Abort already called".
    registry = await serve("127.0.0.1", 0)
    monitor = await start_monitor(
        MonitorConfig(listen="127.0.0.1:0", consul=registry.address, id="monitor-down")
    )
    try:
        await registry.close()
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await getattr(Stub(channel), call)(request_, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "from the registry" in (e.value.details() or "")
    finally:
        await monitor.close()
    assert not [r for r in caplog.records if r.exc_info or "Abort already called" in r.getMessage()]
    assert len([r for r in caplog.records if r.name.startswith("services.monitor")]) == 1
