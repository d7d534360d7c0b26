"""Metrics: each service's own Prometheus registry, served over HTTP at ``/metrics``.

A service builds its registry with ``new_registry`` (the process's CPU, memory and GC figures
included) and its own metrics on it, in one ``metrics`` module per service whose methods the
code calls where something happens. Metrics that are cheaper to read than to keep (queue depths,
ages) are read at scrape time: ``MetricsEndpoint`` awaits its ``before_scrape`` callbacks first.
With metrics off (``--metrics-listen off``) a service builds no registry, and its ``metrics``
methods return at once.

Names follow Prometheus's conventions: ``epoxi_<service>_..._total`` for counters, base units
(``_seconds``, ``_bytes``), and no labels with more values than routing keys and nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

BeforeScrape = Callable[[], Awaitable[None]]
# A scrape waits this long at most for its ``before_scrape`` callbacks; a slow one is logged
# and the scrape serves the figures it has.
SCRAPE_REFRESH_TIMEOUT = 5.0


def new_registry(service: str, version: str = "0.1.0") -> CollectorRegistry:
    """A registry with the process collectors and ``epoxi_build_info{service, version}``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    info = Gauge(
        "epoxi_build_info",
        "Always 1: which Epoxi service and version this is.",
        ["service", "version"],
        registry=registry,
    )
    info.labels(service, version).set(1)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class MetricsEndpoint:
    """An HTTP server answering ``GET /metrics`` with ``registry`` in Prometheus's text format."""

    def __init__(self, registry: CollectorRegistry, before_scrape: Sequence[BeforeScrape] = ()) -> None:
        self.registry = registry
        self.before_scrape = list(before_scrape)
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await self.refresh()
        return web.Response(body=exposition(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def refresh(self) -> None:
        for callback in self.before_scrape:
            try:
                await asyncio.wait_for(callback(), SCRAPE_REFRESH_TIMEOUT)
            except Exception:
                log.exception("metrics: refreshing before a scrape failed")

    async def start(self, listen: str) -> str:
        """Listen on ``listen`` (``host:0``: any free port); returns ``host:port``."""
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]") or None, int(port))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else int(port)
        self.address = f"{host or '0.0.0.0'}:{bound}"
        return self.address

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
