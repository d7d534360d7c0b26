"""A router against the dev registry, and the test nodes it routes to, for the router tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devmesh.registry.app import RunningRegistry
from epoxi.registry.client import Consul
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.services.router.nodes import ContractNodes


@pytest.fixture
async def router(registry: RunningRegistry) -> AsyncIterator[RunningRouter]:
    r = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0))
    yield r
    await r.close()


@pytest.fixture
async def contract_nodes(consul: Consul) -> AsyncIterator[ContractNodes]:
    """Test nodes that answer as the node contract says, started by the test (tests/services/router/nodes.py)."""
    n = ContractNodes(consul)
    yield n
    await n.close()
