"""Assembling the dev registry: the aiohttp application and a helper that serves it.

Body and header limits are Go's ``net/http`` defaults, as Consul keeps them: no limit on a
request body (only ``PUT /v1/kv`` refuses a large one, by its Content-Length), and up to
``http.DefaultMaxHeaderBytes`` (1 MiB) for the request line and each header line, where aiohttp
would stop at 8 KiB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from devmesh.registry.acl import ACL
from devmesh.registry.acl_tokens import ACLTokenEndpoints
from devmesh.registry.agent import AgentEndpoints
from devmesh.registry.catalog import CatalogEndpoints
from devmesh.registry.check_tls import CheckTLS
from devmesh.registry.checks import CheckRunner
from devmesh.registry.health import HealthEndpoints
from devmesh.registry.kv import KVEndpoints
from devmesh.registry.sessions import SessionEndpoints, SessionTimers
from devmesh.registry.state import RegistryConfig, Store
from devmesh.registry.web import Router

STORE = web.AppKey("store", Store)
MAX_HEADER_BYTES = 1 << 20  # http.DefaultMaxHeaderBytes


def create_app(config: RegistryConfig | None = None) -> web.Application:
    """An application serving Consul's HTTP API from a fresh in-memory store."""
    store = Store(config)
    acl = ACL(store.config)
    runner = CheckRunner(store, CheckTLS.from_config(store.config))
    timers = SessionTimers(store)
    router = Router(acl.headers)
    for endpoints in (
        AgentEndpoints(store, runner, acl),
        CatalogEndpoints(store, acl),
        HealthEndpoints(store, acl),
        KVEndpoints(store, acl),
        SessionEndpoints(store, timers, acl),
        ACLTokenEndpoints(store, acl),
    ):
        for pattern, methods, handler in endpoints.routes():
            router.add(pattern, methods, handler)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        runner.start_reaper()
        yield
        timers.close()
        await runner.close()

    app = web.Application(client_max_size=0)  # 0: no limit
    app[STORE] = store
    app.cleanup_ctx.append(lifecycle)
    # [\s\S]: a path may hold a newline (%0A), which ".*" would leave to aiohttp's own 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", router.dispatch)
    return app


@dataclass
class RunningRegistry:
    """A served registry: where it listens, and how to stop it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``, the form ``CONSUL_HTTP_ADDR`` and ``epoxi.registry.client.connect`` take."""
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(
    host: str = "127.0.0.1", port: int = 8500, config: RegistryConfig | None = None
) -> RunningRegistry:
    """Start serving on ``host:port`` (port 0 picks a free one) and return at once."""
    # handler_cancellation: a blocking query whose client went away stops at once, so shutdown
    # does not wait out open long polls.
    runner = web.AppRunner(
        create_app(config),
        access_log=None,
        shutdown_timeout=1.0,
        handler_cancellation=True,
        max_line_size=MAX_HEADER_BYTES,
        max_field_size=MAX_HEADER_BYTES,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    return RunningRegistry(runner=runner, host=host, port=int(bound[1]))
