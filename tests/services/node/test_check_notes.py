"""What an operator reads in the Consul UI: each check's Notes say what it means, its Output
stays the one-line state, and the node's Meta names its /metrics address."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from devmesh.registry.app import RunningRegistry
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2_grpc
from services.node.main import NodeConfig, RunningNode
from tests.services.node.support import KEY, start
from tests.support import CHECK_INTERVAL, eventually

PIPELINE_ID = f"epoxi-pipeline-n1-{KEY}"


@pytest.fixture
def node_config(node_config: NodeConfig, registry: RunningRegistry) -> NodeConfig:
    return replace(node_config, consul=registry.address, check_interval=CHECK_INTERVAL)


async def get(registry: RunningRegistry, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"http://{registry.address}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_pipeline_and_node_checks_carry_notes_and_keep_the_state_as_output(
    node: RunningNode, registry: RunningRegistry
) -> None:
    async with channel(node.address) as ch:
        await start(node_pb2_grpc.NodeServiceStub(ch))

    async def checks() -> dict[str, Any] | None:
        found: dict[str, Any] = await get(registry, "/v1/agent/checks")
        pipeline = found.get(f"service:{PIPELINE_ID}")
        return found if pipeline and pipeline["Output"] else None

    found = await eventually(checks)
    pipeline, own = found[f"service:{PIPELINE_ID}"], found["service:n1"]
    assert pipeline["Notes"].startswith(f"TTL check kept passing by node n1 while pipeline {KEY} runs;")
    assert "critical while the pipeline restarts after a crash" in pipeline["Notes"]
    assert pipeline["Output"] == "running: 0 queued, 0 in flight, 0 deferred, 0 delivered, 0 bounced"
    assert own["Notes"].startswith(f"gRPC health check of Epoxi node n1 at {node.address}")
    assert own["Notes"] != own["Output"]

    # The same through the health endpoint Consul's UI reads.
    [entry] = await get(registry, "/v1/health/service/epoxi-pipeline")
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    assert (check["Notes"], check["Output"]) == (pipeline["Notes"], pipeline["Output"])


async def test_the_node_names_its_metrics_address_in_its_meta(
    node: RunningNode, registry: RunningRegistry
) -> None:
    assert node.metrics_address
    [entry] = await get(registry, "/v1/health/service/epoxi-node")
    assert entry["Service"]["Meta"]["metrics"] == node.metrics_address
