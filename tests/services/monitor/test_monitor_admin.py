"""Admin actions: start on the best node, stop everywhere, rebalance; real nodes and the dev registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from devmesh.sink import Sink
from epoxi.v1 import email_pb2, monitor_pb2_grpc, node_pb2, pipeline_pb2
from epoxi.v1 import monitor_pb2 as m
from services.monitor import cluster as plan
from tests.services.monitor.support import equals
from tests.support import Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub


# --- planning (pure) ---


def state(node: str, ips: list[str], *pipelines: tuple[str, str, int]) -> node_pb2.GetNodeStateResponse:
    """A node's live state; each pipeline is (domain, source IP, unfinished messages)."""
    return node_pb2.GetNodeStateResponse(
        node=node_pb2.NodeInfo(id=node, egress_ips=ips, pipeline_count=len(pipelines)),
        pipelines=[
            pipeline_pb2.PipelineInfo(
                routing_key=f"{d}_{ip.replace('.', '_')}",
                node=node,
                domain=d,
                source_ip=ip,
                counters=pipeline_pb2.PipelineCounters(deferred=busy),
            )
            for d, ip, busy in pipelines
        ],
    )


def moves_of(moves: list[m.PipelineMove]) -> list[tuple[str, str, str]]:
    return [(mv.routing_key, mv.from_node, mv.to_node) for mv in moves]


def test_plan_moves_from_the_most_to_the_least_loaded_owner() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a", ["1.1.1.1"], *((d, "1.1.1.1", 0) for d in ("a.com", "b.com", "c.com", "d.com", "e.com"))
            ),
            state("b", ["1.1.1.1"]),
            state("c", ["1.1.1.1", "2.2.2.2"]),
        ]
    )
    assert moves_of(moves) == [
        ("a.com_1_1_1_1", "a", "b"),
        ("b.com_1_1_1_1", "a", "c"),
        ("c.com_1_1_1_1", "a", "b"),
    ]
    assert all(mv.state == m.PIPELINE_MOVE_STATE_PLANNED for mv in moves)
    assert (skipped, counts) == ([], {"a": 2, "b": 2, "c": 1})


def test_plan_leaves_counts_that_differ_by_one() -> None:
    moves, _, counts = plan.plan_rebalance(
        [
            state("a", ["1.1.1.1"], ("a.com", "1.1.1.1", 0), ("b.com", "1.1.1.1", 0)),
            state("b", ["1.1.1.1"], ("c.com", "1.1.1.1", 0)),
        ]
    )
    assert (moves, counts) == ([], {"a": 2, "b": 1})


def test_plan_skips_busy_pipelines_and_moves_idle_ones() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a", ["1.1.1.1"], ("a.com", "1.1.1.1", 3), ("b.com", "1.1.1.1", 0), ("c.com", "1.1.1.1", 0)
            ),
            state("b", ["1.1.1.1"]),
        ]
    )
    assert moves_of(moves) == [("b.com_1_1_1_1", "a", "b")]
    assert [(s.pipeline.routing_key, s.to_node) for s in skipped] == [("a.com_1_1_1_1", "b")]
    assert "3 unfinished" in skipped[0].reason
    assert counts == {"a": 2, "b": 1}


def test_plan_needs_an_owner_of_the_ip_not_running_the_key() -> None:
    moves, skipped, _ = plan.plan_rebalance(
        [
            state(
                "a",
                ["1.1.1.1", "2.2.2.2"],
                ("a.com", "2.2.2.2", 0),
                ("b.com", "1.1.1.1", 0),
                ("c.com", "2.2.2.2", 0),
            ),
            state("b", ["1.1.1.1"], ("b.com", "1.1.1.1", 0)),
            state("c", ["3.3.3.3"]),
        ]
    )
    # b owns only .1, where it already runs b.com; c owns none of a's IPs.
    assert (moves, skipped) == ([], [])


# --- StartPipelineOptimal ---


async def keys_by_node(monitor_stub: Stub) -> dict[str, list[str]]:
    response = await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(passing_only=True), timeout=5)
    return {n: [p.routing_key for p in g.pipelines] for n, g in response.nodes.items()}


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


async def test_start_optimal_lands_on_the_least_loaded_owner(cluster: Nodes, monitor_stub: Stub) -> None:
    # Both own .2; node2 runs one pipeline, node1 two.
    response = await monitor_stub.StartPipelineOptimal(
        m.StartPipelineOptimalRequest(
            domain="Outlook.com", source_ip="127.0.0.2", policy=pipeline_pb2.PipelinePolicy(batch_size=7)
        ),
        timeout=10,
    )
    assert (response.node.id, response.started) == ("node2", True)
    assert (response.pipeline.node, response.pipeline.routing_key) == ("node2", "outlook.com_127_0_0_2")
    assert response.pipeline.policy.batch_size == 7
    await eventually(
        lambda: equals(
            keys_by_node(monitor_stub),
            {
                "node1": ["gmail.com_127_0_0_2", "yahoo.com_127_0_0_3"],
                "node2": ["gmail.com_127_0_0_4", "outlook.com_127_0_0_2"],
            },
        )
    )
    # Now tied 2/2, node1 would win on ID; but node2 already runs the key, so nothing new starts.
    again = await monitor_stub.StartPipelineOptimal(
        m.StartPipelineOptimalRequest(domain="outlook.com", source_ip="127.0.0.2"), timeout=10
    )
    assert (again.node.id, again.started) == ("node2", False)
    listed = await cluster.stub("node1").ListPipelines(node_pb2.ListPipelinesRequest(), timeout=5)
    assert "outlook.com_127_0_0_2" not in [p.routing_key for p in listed.pipelines]


async def test_start_optimal_errors(cluster: Nodes, monitor_stub: Stub) -> None:
    unowned = await rpc_error(
        monitor_stub.StartPipelineOptimal(
            m.StartPipelineOptimalRequest(domain="gmail.com", source_ip="127.0.0.9"), timeout=5
        )
    )
    assert (unowned.code(), unowned.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no passing node owns source IP 127.0.0.9 (routing key gmail.com_127_0_0_9)",
    )
    bad = await rpc_error(
        monitor_stub.StartPipelineOptimal(
            m.StartPipelineOptimalRequest(domain="nodot", source_ip="300.1.1.1"), timeout=5
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain 'nodot'" in bad.details() and "source_ip '300.1.1.1'" in bad.details()
    # The node's own error comes back with its code.
    node_error = await rpc_error(
        monitor_stub.StartPipelineOptimal(
            m.StartPipelineOptimalRequest(domain="aol.com", source_ip="127.0.0.4", policy_name="nosuch"),
            timeout=5,
        )
    )
    assert node_error.code() == grpc.StatusCode.NOT_FOUND
    assert node_error.details().startswith(
        f"node node2 at {cluster.running['node2'].address}: no valid policy 'nosuch'"
    )


# --- StopPipelineByRoutingKey ---


async def test_stop_by_routing_key_stops_it_on_every_node(cluster: Nodes, monitor_stub: Stub) -> None:
    await cluster.start_pipeline("node2", "gmail.com", "127.0.0.2")  # node1 runs it too
    key = "gmail.com_127_0_0_2"

    async def runners() -> list[str]:
        response = await monitor_stub.FindPipelinesByRoutingKey(
            m.FindPipelinesByRoutingKeyRequest(routing_key=key), timeout=5
        )
        return sorted(p.node for p in response.pipelines)

    await eventually(lambda: equals(runners(), ["node1", "node2"]))
    response = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key="GMAIL.com_127_0_0_2"), timeout=10
    )
    assert response.stopped_count == 2
    assert [(o.node, o.stopped, o.pipeline.routing_key, o.error_code) for o in response.outcomes] == [
        ("node1", True, key, ""),
        ("node2", True, key, ""),
    ]
    for node in ("node1", "node2"):
        listed = await cluster.stub(node).ListPipelines(node_pb2.ListPipelinesRequest(), timeout=5)
        assert key not in [p.routing_key for p in listed.pipelines]
    await eventually(lambda: equals(runners(), []))
    assert (await keys_by_node(monitor_stub))["node1"] == ["yahoo.com_127_0_0_3"]
    gone = await rpc_error(
        monitor_stub.StopPipelineByRoutingKey(m.StopPipelineByRoutingKeyRequest(routing_key=key), timeout=5)
    )
    assert (gone.code(), gone.details()) == (grpc.StatusCode.NOT_FOUND, f"no pipeline has routing key {key}")
    bad = await rpc_error(
        monitor_stub.StopPipelineByRoutingKey(
            m.StopPipelineByRoutingKeyRequest(routing_key="gmail.com"), timeout=5
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- Rebalance ---


@pytest.fixture
async def lopsided(nodes: Nodes, sink: Sink, consul: Any) -> AsyncIterator[Nodes]:
    """node1 runs five pipelines on .2 (aol.com with a deferred message); node2 owns .2 and runs none."""
    await nodes.start("node1", "127.0.0.2")
    await nodes.start("node2", "127.0.0.2")
    for domain in ("aol.com", "gmail.com", "hotmail.com", "outlook.com", "yahoo.com"):
        await nodes.start_pipeline("node1", domain, "127.0.0.2")
    sink.replies["bob@aol.com"] = "451 4.3.0 try later"
    email = email_pb2.Email(
        to=["bob@aol.com"], subject="hi", text="hello", delivery=email_pb2.Delivery(ip="127.0.0.2")
    )
    setattr(email, "from", "sender@epoxi.dev")
    await nodes.stub("node1").EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key="aol.com_127_0_0_2", emails=[email]), timeout=5
    )

    async def deferred() -> bool:
        s = await nodes.stub("node1").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        return any(p.routing_key == "aol.com_127_0_0_2" and p.counters.deferred == 1 for p in s.pipelines)

    await eventually(deferred)
    await eventually(lambda: equals(passing_nodes(consul), {"node1", "node2"}))
    yield nodes


async def test_rebalance_dry_run_plans_and_a_real_run_moves(lopsided: Nodes, monitor_stub: Stub) -> None:
    planned = await monitor_stub.Rebalance(m.RebalanceRequest(dry_run=True), timeout=10)
    expected = [("gmail.com_127_0_0_2", "node1", "node2"), ("hotmail.com_127_0_0_2", "node1", "node2")]
    assert moves_of(list(planned.moves)) == expected
    assert all(mv.state == m.PIPELINE_MOVE_STATE_PLANNED for mv in planned.moves)
    assert [s.pipeline.routing_key for s in planned.skipped] == ["aol.com_127_0_0_2"]
    assert dict(planned.planned_pipelines_per_node) == {"node1": 3, "node2": 2}
    # The dry run changed nothing.
    state2 = await lopsided.stub("node2").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    assert list(state2.pipelines) == []

    done = await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=30)
    assert moves_of(list(done.moves)) == expected
    assert [mv.state for mv in done.moves] == [m.PIPELINE_MOVE_STATE_MOVED] * 2
    assert all(mv.pipeline.node == "node2" for mv in done.moves)
    # The moved pipelines keep their policy (the fixture's short batch timeout).
    assert all(mv.pipeline.policy.batch_timeout.nanos == 50_000_000 for mv in done.moves)
    await eventually(
        lambda: equals(
            keys_by_node(monitor_stub),
            {
                "node1": ["aol.com_127_0_0_2", "outlook.com_127_0_0_2", "yahoo.com_127_0_0_2"],
                "node2": ["gmail.com_127_0_0_2", "hotmail.com_127_0_0_2"],
            },
        )
    )
    # Balanced now: nothing more to move.
    assert list((await monitor_stub.Rebalance(m.RebalanceRequest(dry_run=True), timeout=10)).moves) == []


# --- HTTP ---


async def test_http_post_and_delete_admin_pipelines(
    cluster: Nodes, monitor_stub: Stub, http: aiohttp.ClientSession
) -> None:
    async with http.post("/admin/pipelines", json={"domain": "outlook.com", "sourceIp": "127.0.0.2"}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert (body["node"]["id"], body["started"], body["pipeline"]["routingKey"]) == (
        "node2",
        True,
        "outlook.com_127_0_0_2",
    )
    async with http.post("/admin/pipelines", json={"domain": "outlook.com", "sourceIp": "127.0.0.9"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == 5
    await eventually(
        lambda: equals(
            keys_by_node(monitor_stub),
            {
                "node1": ["gmail.com_127_0_0_2", "yahoo.com_127_0_0_3"],
                "node2": ["gmail.com_127_0_0_4", "outlook.com_127_0_0_2"],
            },
        )
    )

    async with http.delete("/admin/pipelines/outlook.com_127_0_0_2") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["stoppedCount"] == 1
    assert [(o["node"], o["stopped"]) for o in body["outcomes"]] == [("node2", True)]
    await eventually(
        lambda: equals(
            keys_by_node(monitor_stub),
            {"node1": ["gmail.com_127_0_0_2", "yahoo.com_127_0_0_3"], "node2": ["gmail.com_127_0_0_4"]},
        )
    )
    async with http.delete("/admin/pipelines/outlook.com_127_0_0_2") as resp:
        assert resp.status == 404
