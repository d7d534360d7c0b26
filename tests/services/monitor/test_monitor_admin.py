"""Admin actions: start on the best node, stop, and both over HTTP; real nodes and the dev registry.
Stops with mail queued are in test_monitor_stop, rebalancing in test_monitor_rebalance."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest

from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, pipeline_pb2
from tests.services.monitor.support import equals
from tests.support import Nodes, eventually

Stub = monitor_pb2_grpc.MonitorServiceStub


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


async def test_stop_by_routing_key_with_nothing_queued(cluster: Nodes, monitor_stub: Stub) -> None:
    key = "gmail.com_127_0_0_2"

    async def runners() -> list[str]:
        response = await monitor_stub.FindPipelinesByRoutingKey(
            m.FindPipelinesByRoutingKeyRequest(routing_key=key), timeout=5
        )
        return sorted(p.node for p in response.pipelines)

    response = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key="GMAIL.com_127_0_0_2"), timeout=10
    )
    assert response.stopped_count == 1
    [outcome] = response.outcomes
    assert (outcome.node, outcome.stopped, outcome.pipeline.routing_key, outcome.error_code) == (
        "node1",
        True,
        key,
        "",
    )
    assert outcome.address == cluster.running["node1"].address
    # Nothing was queued: nothing handed, nothing kept, and the pipeline does not start again.
    assert (
        outcome.messages_handed_off,
        outcome.handed_to_node,
        outcome.messages_kept,
        outcome.kept_reason,
    ) == (
        0,
        "",
        0,
        "",
    )
    listed = await cluster.stub("node1").ListPipelines(node_pb2.ListPipelinesRequest(), timeout=5)
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
