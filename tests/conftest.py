"""Fixtures shared across the suite: each builds the real thing, yields it, and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import RegistryConfig
from devmesh.sink import Sink
from epoxi.registry.client import Consul, connect


@pytest.fixture
async def registry() -> AsyncIterator[RunningRegistry]:
    """The development registry on a free port. Output-only check updates reach the catalog at
    once (a Consul agent defers them by check_update_interval, 5m by default)."""
    r = await serve("127.0.0.1", 0, RegistryConfig(check_update_interval=0))
    yield r
    await r.close()


@pytest.fixture
async def consul(registry: RunningRegistry) -> AsyncIterator[Consul]:
    c = connect(registry.address)
    yield c
    await c.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A real SMTP server on 127.0.0.1 that records what it receives and from which address."""
    s = await Sink().start()
    yield s
    await s.stop()
