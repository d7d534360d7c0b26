"""A router against the dev registry, for the router tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devmesh.registry.app import RunningRegistry
from services.router.main import RouterConfig, RunningRouter, start_router


@pytest.fixture
async def router(registry: RunningRegistry) -> AsyncIterator[RunningRouter]:
    r = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0))
    yield r
    await r.close()
