"""A whole mesh behind the gateway, each service a process of its own (``devmesh.supervisor.Mesh``:
the dev registry, a sink, two nodes, the router, the monitor and the gateway), supervised from
an event loop on a thread of its own. Blocking clients (schemathesis calls over ``requests``)
use it from the test's thread; and nothing the services do touches this process's global
``random``, which Hypothesis watches while it generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from devmesh.supervisor import Mesh

T = TypeVar("T")


class LiveMesh:
    def __init__(self, data: Path, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.env = env or {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live mesh", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.gateway = ""  # host:port of the gateway's HTTP server

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``work`` on the mesh's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def __enter__(self) -> LiveMesh:
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()

    def _closing(self, close: Callable[[], Awaitable[object]]) -> None:
        self._stack.push_async_callback(close)

    async def _start(self) -> None:
        mesh = await Mesh(self.data, check_interval="200ms", env=self.env).start()
        self._closing(mesh.stop)
        self.gateway = mesh.address("gateway")
