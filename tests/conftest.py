"""Fixtures shared across the suite: each builds the real thing, yields it, and closes it.

``consul`` is a registry client for ``registry_addr`` (by default the ``registry``). ``node``
is started from ``node_config``: a module that needs another node (registered, other
IPs, other timings) overrides ``node_config``, and ``stub`` dials whichever ``node`` it gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import RegistryConfig
from devmesh.sink import Sink
from epoxi.registry.client import Consul, connect
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2_grpc
from services.node.main import NodeConfig, RunningNode, start_node
from tests.support import SOURCE_IP, Nodes


@pytest.fixture
async def registry() -> AsyncIterator[RunningRegistry]:
    """The development registry on a free port. Output-only check updates reach the catalog at
    once (a Consul agent defers them by check_update_interval, 5m by default)."""
    r = await serve("127.0.0.1", 0, RegistryConfig(check_update_interval=0))
    yield r
    await r.close()


@pytest.fixture
def registry_addr(registry: RunningRegistry) -> str:
    """The registry ``consul`` talks to: ``registry`` here; the registry contract suite
    (tests/devmesh/registry) overrides it with each backend it runs against."""
    return registry.address


@pytest.fixture
async def consul(registry_addr: str) -> AsyncIterator[Consul]:
    c = connect(registry_addr)
    yield c
    await c.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A real SMTP server on 127.0.0.1 that records what it receives and from which address."""
    s = await Sink().start()
    yield s
    await s.stop()


@pytest.fixture
def node_config(tmp_path: Path, sink: Sink) -> NodeConfig:
    """Node n1, sending from 127.0.0.2 and .3 to the sink, without a registry; fast retries."""
    return NodeConfig(
        id="n1",
        egress_ips=[SOURCE_IP, "127.0.0.3"],
        spool=tmp_path / "n1" / "spool.db",
        routes={"*": sink.address},
        ehlo_name="n1.epoxi.test",
        retry_base=0.01,
        stop_grace=1.0,
    )


@pytest.fixture
async def node(node_config: NodeConfig) -> AsyncIterator[RunningNode]:
    async with await start_node(node_config) as n:
        yield n


@pytest.fixture
async def stub(node: RunningNode) -> AsyncIterator[node_pb2_grpc.NodeServiceStub]:
    async with channel(node.address) as ch:
        yield node_pb2_grpc.NodeServiceStub(ch)


@pytest.fixture
async def nodes(registry: RunningRegistry, sink: Sink, tmp_path: Path) -> AsyncIterator[Nodes]:
    """Several registered nodes, started by the test."""
    n = Nodes(tmp_path, sink.address, registry.address)
    yield n
    await n.close()
