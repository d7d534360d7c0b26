"""The monitor in front of the real parts it reads: the dev registry (in process) and nodes
started with the top-level ``nodes`` fixture; ``monitor_stub`` dials the monitor, ``http`` a
gateway in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from epoxi import policy_store
from epoxi.v1 import monitor_pb2_grpc
from gateway import main as gateway_main
from gateway.app import Backend, start_gateway
from gateway.upstream import StaticUpstream
from services.monitor.main import MonitorConfig, RunningMonitor, start_monitor
from tests.services.monitor.support import equals
from tests.support import Nodes, eventually, passing_nodes, stored_policy


@pytest.fixture
async def monitor(registry: RunningRegistry) -> AsyncIterator[RunningMonitor]:
    m = await start_monitor(
        MonitorConfig(
            listen="127.0.0.1:0",
            consul=registry.address,
            id="monitor-test",
            check_interval=0.2,
            node_timeout=1.0,
        )
    )
    yield m
    await m.close()


@pytest.fixture
async def monitor_stub(monitor: RunningMonitor) -> AsyncIterator[monitor_pb2_grpc.MonitorServiceStub]:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        yield monitor_pb2_grpc.MonitorServiceStub(channel)


@pytest.fixture
async def http(monitor: RunningMonitor) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client of a gateway in front of the monitor."""
    backend = Backend(gateway_main.MONITOR, StaticUpstream(monitor.address))
    gateway = await start_gateway("127.0.0.1:0", [backend], health=backend)
    try:
        async with aiohttp.ClientSession(base_url=f"http://{gateway.address}") as session:
            yield session
    finally:
        await gateway.close()


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


@pytest.fixture
async def default_policy(consul: Any) -> None:
    """A stored "default" policy for the pipelines nodes start by themselves (for new mail, or
    for mail handed to them): batches without waiting, and retries enough to outlast a ``Hold``."""
    await policy_store.put_policy(consul, policy_store.DEFAULT_POLICY, stored_policy(max_retries=10_000))
