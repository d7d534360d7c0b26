"""The discovery calls through the gateway: each route answers the JSON of the gRPC reply, in
front of the real monitor, registry and nodes."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format, message

from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc
from tests.support import Nodes


def as_json(reply: message.Message) -> Any:
    """The reply as the gateway renders it: lowerCamelCase names, zero values shown."""
    return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)


async def get(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def test_get_v1_pipelines_is_find_all_pipelines(
    cluster: Nodes, http: aiohttp.ClientSession, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    body = await get(http, "/v1/pipelines")
    assert body == as_json(await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(), timeout=5))
    assert sorted(body["nodes"]) == ["node1", "node2"]
    assert [p["routingKey"] for p in body["nodes"]["node1"]["pipelines"]] == [
        "gmail.com_127_0_0_2",
        "yahoo.com_127_0_0_3",
    ]
    for query in ("passingOnly=true", "passing_only=1"):
        passing = await get(http, f"/v1/pipelines?{query}")
        assert passing == as_json(
            await monitor_stub.FindAllPipelines(m.FindAllPipelinesRequest(passing_only=True), timeout=5)
        )
        assert sorted(passing["nodes"]) == ["node1", "node2"]


async def test_get_v1_pipelines_routing_key_is_find_pipelines_by_routing_key(
    cluster: Nodes, http: aiohttp.ClientSession, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    body = await get(http, "/v1/pipelines/GMAIL.com_127_0_0_2?passingOnly=true")
    assert body == as_json(
        await monitor_stub.FindPipelinesByRoutingKey(
            m.FindPipelinesByRoutingKeyRequest(routing_key="GMAIL.com_127_0_0_2", passing_only=True),
            timeout=5,
        )
    )
    assert [(p["routingKey"], p["node"]) for p in body["pipelines"]] == [("gmail.com_127_0_0_2", "node1")]
    # A well-formed key nothing runs is an empty answer, not an error.
    assert await get(http, "/v1/pipelines/gmail.com_127_0_0_3") == {"pipelines": []}


async def test_get_v1_routing_keys_node_is_find_node_for_routing_key(
    cluster: Nodes, http: aiohttp.ClientSession, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    for key, node, has_pipeline in [
        ("gmail.com_127_0_0_2", "node1", True),
        ("example.org_127_0_0_2", "node2", False),
    ]:
        body = await get(http, f"/v1/routing-keys/{key}/node")
        assert body == as_json(
            await monitor_stub.FindNodeForRoutingKey(
                m.FindNodeForRoutingKeyRequest(routing_key=key), timeout=5
            )
        )
        assert (body["node"]["id"], body["hasPipeline"]) == (node, has_pipeline)
    assert await get(http, "/v1/routing-keys/gmail.com_127_0_0_99/node", 404) == {
        "code": 5,
        "message": "no passing node owns source IP 127.0.0.99 (routing key gmail.com_127_0_0_99)",
        "details": [],
    }


async def test_get_v1_pipelines_stats_is_get_pipeline_stats(
    cluster: Nodes, http: aiohttp.ClientSession, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    body = await get(http, "/v1/pipelines:stats")
    assert body == as_json(await monitor_stub.GetPipelineStats(m.GetPipelineStatsRequest(), timeout=5))
    stats = body["stats"]
    assert (stats["totalPipelines"], stats["totalNodes"]) == (3, 2)
    assert stats["pipelinesPerNode"] == {"node1": 2, "node2": 1}
    assert stats["totals"]["queued"] == "0"


@pytest.mark.parametrize("key", ["gmail.com", "gmail_127_0_0_1", "gmail.com_127_0_0", "not-a-key"])
@pytest.mark.parametrize("path", ["/v1/pipelines/{}", "/v1/routing-keys/{}/node"])
async def test_bad_routing_keys_are_400_with_a_status_body(
    monitor: Any, http: aiohttp.ClientSession, path: str, key: str
) -> None:
    assert await get(http, path.format(key), 400) == {
        "code": 3,
        "message": f"routing key {key!r} is not <domain>_<source ip>, e.g. gmail.com_192_168_1_1",
        "details": [],
    }


async def test_discovery_routes_leave_the_admin_routes_alone(
    cluster: Nodes, http: aiohttp.ClientSession
) -> None:
    # A literal beats a variable: neither "stats" nor "health" is taken for a routing key.
    assert "summary" in await get(http, "/admin/pipelines/health")
    assert "stats" in await get(http, "/v1/pipelines:stats")
    assert (await get(http, "/v1/pipelines/a:stats", 400))["code"] == 3
    assert (await get(http, "/v1/routing-keys/gmail.com_127_0_0_2", 404))["code"] == 5
    async with http.post("/v1/pipelines") as resp:
        assert resp.status == 405
        assert (await resp.json())["code"] == 12
