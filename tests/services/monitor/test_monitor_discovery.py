"""Discovery calls against the dev registry and real nodes."""

from __future__ import annotations

import signal
from typing import Any

import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.supervisor import spawn
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc
from epoxi.v1 import node_pb2 as m_node
from tests.services.monitor.support import contains, excludes
from tests.support import Nodes, eventually, passing_nodes


def keys_by_node(response: m.FindAllPipelinesResponse) -> dict[str, list[str]]:
    return {node: [p.routing_key for p in group.pipelines] for node, group in response.nodes.items()}


async def test_find_all_pipelines_groups_them_by_node(
    cluster: Nodes, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    response = await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(), timeout=5)
    assert keys_by_node(response) == {
        "node1": ["gmail.com_127_0_0_2", "yahoo.com_127_0_0_3"],
        "node2": ["gmail.com_127_0_0_4"],
    }
    [p] = [p for p in response.nodes["node2"].pipelines]
    assert p.healthy
    assert (p.domain, p.source_ip, p.address) == ("gmail.com", "127.0.0.4", cluster.running["node2"].address)


async def test_find_pipelines_by_routing_key(
    cluster: Nodes, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    response = await monitor_stub.FindPipelinesByRoutingKey(
        m.FindPipelinesByRoutingKeyRequest(routing_key="GMAIL.com_127_0_0_2", passing_only=True), timeout=5
    )
    assert [(p.routing_key, p.node) for p in response.pipelines] == [("gmail.com_127_0_0_2", "node1")]
    none = await monitor_stub.FindPipelinesByRoutingKey(
        m.FindPipelinesByRoutingKeyRequest(routing_key="gmail.com_127_0_0_3"), timeout=5
    )
    assert list(none.pipelines) == []


@pytest.mark.parametrize("key", ["", "gmail.com", "gmail_127_0_0_1", "gmail.com_127_0_0"])
async def test_malformed_routing_keys_are_invalid_arguments(
    monitor: Any, monitor_stub: monitor_pb2_grpc.MonitorServiceStub, key: str
) -> None:
    calls = [
        monitor_stub.FindPipelinesByRoutingKey(
            m.FindPipelinesByRoutingKeyRequest(routing_key=key), timeout=5
        ),
        monitor_stub.FindNodeForRoutingKey(m.FindNodeForRoutingKeyRequest(routing_key=key), timeout=5),
        monitor_stub.HealthCheckRoutingKey(m.HealthCheckRoutingKeyRequest(routing_key=key), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            e.value.details()
            == f"routing key {key!r} is not <domain>_<source ip>, e.g. gmail.com_192_168_1_1"
        )


async def test_find_node_prefers_the_node_already_running_the_key(
    cluster: Nodes, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    # node2 has fewer pipelines, but node1 already runs gmail.com on .2.
    response = await monitor_stub.FindNodeForRoutingKey(
        m.FindNodeForRoutingKeyRequest(routing_key="gmail.com_127_0_0_2"), timeout=5
    )
    assert (response.node.id, response.has_pipeline) == ("node1", True)
    assert response.node.address == cluster.running["node1"].address


async def test_find_node_chooses_the_least_loaded_owner(
    cluster: Nodes, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    response = await monitor_stub.FindNodeForRoutingKey(
        m.FindNodeForRoutingKeyRequest(routing_key="example.org_127_0_0_2"), timeout=5
    )
    assert (response.node.id, response.has_pipeline) == ("node2", False)
    assert list(response.node.egress_ips) == ["127.0.0.2", "127.0.0.4"]
    only_owner = await monitor_stub.FindNodeForRoutingKey(
        m.FindNodeForRoutingKeyRequest(routing_key="example.org_127_0_0_3"), timeout=5
    )
    assert (only_owner.node.id, only_owner.has_pipeline) == ("node1", False)


async def test_find_node_for_an_unowned_ip_is_not_found(
    cluster: Nodes, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.FindNodeForRoutingKey(
            m.FindNodeForRoutingKeyRequest(routing_key="gmail.com_127_0_0_99"), timeout=5
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no passing node owns source IP 127.0.0.99 (routing key gmail.com_127_0_0_99)"


async def test_a_killed_node_drops_out_of_passing_answers(
    cluster: Nodes,
    registry: RunningRegistry,
    consul: Any,
    monitor_stub: monitor_pb2_grpc.MonitorServiceStub,
    tmp_path: Any,
) -> None:
    node3 = await spawn(
        "node3",
        [
            "services.node",
            *("--id", "node3", "--egress-ip", "127.0.0.5", "--listen", "127.0.0.1:0"),
            *("--spool", str(tmp_path / "node3.db"), "--route", f"*={cluster.sink}"),
            *("--consul", registry.address, "--check-interval", "200ms"),
        ],
    )
    try:
        await eventually(lambda: contains(passing_nodes(consul), "node3"))
        await cluster.stub_at(node3.address).StartPipeline(
            m_node.StartPipelineRequest(domain="gmail.com", source_ip="127.0.0.5"), timeout=5
        )
        found = await monitor_stub.FindNodeForRoutingKey(
            m.FindNodeForRoutingKeyRequest(routing_key="gmail.com_127_0_0_5"), timeout=5
        )
        assert (found.node.id, found.has_pipeline) == ("node3", True)
    finally:
        await node3.stop(signal.SIGKILL)

    async def node3_only_in_all() -> bool:
        passing = await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(passing_only=True), timeout=5)
        return "node3" not in passing.nodes

    await eventually(node3_only_in_all)
    await eventually(lambda: excludes(passing_nodes(consul), "node3"))
    everything = await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(), timeout=5)
    [dead] = everything.nodes["node3"].pipelines
    assert dead.routing_key == "gmail.com_127_0_0_5"
    assert not dead.healthy
    assert keys_by_node(everything)["node1"] == ["gmail.com_127_0_0_2", "yahoo.com_127_0_0_3"]

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.FindNodeForRoutingKey(
            m.FindNodeForRoutingKeyRequest(routing_key="gmail.com_127_0_0_5"), timeout=5
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    health = await monitor_stub.HealthCheckRoutingKey(
        m.HealthCheckRoutingKeyRequest(routing_key="gmail.com_127_0_0_5"), timeout=5
    )
    [result] = health.results
    assert (result.healthy, result.status) == (False, "critical")
    assert (health.summary.healthy, health.summary.unhealthy) == (0, 1)

    stats = await monitor_stub.GetPipelineStats(m.GetPipelineStatsRequest(), timeout=5)
    assert stats.stats.total_pipelines == 4
    assert stats.stats.pipelines_per_node["node3"] == 1
