"""A running mesh for the ``epoxi`` command's tests (``devmesh.supervisor.Mesh``: every service
its own process, the sink writing what it receives to a maildir), one per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from devmesh.supervisor import Mesh
from tests.cli.support import NODES, store_fast_default_policy


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    m = await Mesh(tmp_path_factory.mktemp("mesh"), nodes=list(NODES), check_interval="200ms").start()
    try:
        await store_fast_default_policy(m.consul or "")
        yield m
    finally:
        await m.stop()
