"""The real parts the monitor reads: the dev registry (in process), nodes, an SMTP sink, the monitor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.registry import client, services
from epoxi.runtime.channels import Channels
from epoxi.v1 import monitor_pb2_grpc, node_pb2, node_pb2_grpc, pipeline_pb2
from services.monitor.main import MonitorConfig, RunningMonitor, start_monitor
from services.node.main import NodeConfig, RunningNode, start_node
from tests.support import eventually

CHECK_INTERVAL = 0.2  # seconds: the registry probes and TTLs run fast in tests

T = TypeVar("T")


@pytest.fixture
async def consul(registry: RunningRegistry) -> AsyncIterator[Any]:
    c = client.connect(registry.address)
    yield c
    await c.close()


class Nodes:
    """Starts real nodes against the registry; closes them all at the end."""

    def __init__(self, registry: str, sink: str, data: Path) -> None:
        self.registry = registry
        self.sink = sink
        self.data = data
        self.running: dict[str, RunningNode] = {}
        self.channels = Channels()

    async def start(self, id: str, *egress_ips: str) -> RunningNode:
        node = await start_node(
            NodeConfig(
                id=id,
                egress_ips=list(egress_ips),
                spool=self.data / id / "spool.db",
                routes={"*": self.sink},
                consul=self.registry,
                check_interval=CHECK_INTERVAL,
                stop_grace=1.0,
            )
        )
        self.running[id] = node
        return node

    def stub(self, id: str) -> node_pb2_grpc.NodeServiceStub:
        return self.stub_at(self.running[id].address)

    def stub_at(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self.channels.get(address))

    async def start_pipeline(self, id: str, domain: str, ip: str) -> None:
        # A short batch timeout, so enqueued mail goes out at once.
        policy = pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=50_000_000))
        await self.stub(id).StartPipeline(
            node_pb2.StartPipelineRequest(domain=domain, source_ip=ip, policy=policy), timeout=5
        )

    async def close(self) -> None:
        try:
            await asyncio.gather(*(n.close() for n in self.running.values()))
        finally:
            await self.channels.close()


@pytest.fixture
async def nodes(registry: RunningRegistry, sink: Sink, tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(registry.address, sink.address, tmp_path)
    yield n
    await n.close()


@pytest.fixture
async def monitor(registry: RunningRegistry) -> AsyncIterator[RunningMonitor]:
    m = await start_monitor(
        MonitorConfig(consul=registry.address, id="monitor-test", check_interval=0.2, node_timeout=1.0)
    )
    yield m
    await m.close()


@pytest.fixture
async def stub(monitor: RunningMonitor) -> AsyncIterator[monitor_pb2_grpc.MonitorServiceStub]:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        yield monitor_pb2_grpc.MonitorServiceStub(channel)


async def passing_nodes(consul: Any) -> set[str]:
    _, entries = await consul.health.service(services.NODE_SERVICE, passing=True)
    return {e["Service"]["ID"] for e in entries}


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def contains(value: Awaitable[Any], item: Any) -> bool:
    return item in await value


async def excludes(value: Awaitable[Any], item: Any) -> bool:
    return item not in await value


@pytest.fixture
async def cluster(nodes: Nodes, consul: Any) -> AsyncIterator[Nodes]:
    """node1 owns .2 and .3 and runs two pipelines; node2 owns .2 and .4 and runs one; both pass."""
    await nodes.start("node1", "127.0.0.2", "127.0.0.3")
    await nodes.start("node2", "127.0.0.2", "127.0.0.4")
    await nodes.start_pipeline("node1", "gmail.com", "127.0.0.2")
    await nodes.start_pipeline("node1", "yahoo.com", "127.0.0.3")
    await nodes.start_pipeline("node2", "gmail.com", "127.0.0.4")
    await eventually(lambda: equals(passing_nodes(consul), {"node1", "node2"}))
    yield nodes
