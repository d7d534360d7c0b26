"""One lifecycle for every service: start in one order, stop in one order, also after a failed start.

Start: the service opens what it needs (``open``, ``closing``), ``listen`` binds its server
(so its ``address`` is known to whatever it builds next), ``serve`` starts the server and turns
health SERVING, ``register`` puts it in the registry, and ``run`` starts its background tasks. Stop (``close``), always in this order, whatever got started:

1. health NOT_SERVING, so health checks and clients turn away at once;
2. background tasks cancelled (nothing re-registers the service behind our back);
3. deregistration, newest first;
4. the server stopped, with ``grace`` for the calls under way;
5. whatever was opened closed, newest first (pipelines, clients, stores).

A service subclasses ``Service`` to carry its own handles, and ``start_x`` builds it inside
``async with service.starting():``, which closes what was started if anything raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import grpc

from epoxi.observability import tracing
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.logs import configure_logging
from epoxi.observability.metrics import BeforeScrape, MetricsEndpoint
from epoxi.registry.client import RegistryError
from epoxi.runtime.security import PLAINTEXT, Security, SecurityError
from epoxi.runtime.server import GrpcServer, Register, bind_grpc_server
from epoxi.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


class Server(Protocol):
    """What the lifecycle needs of a server: gRPC (``GrpcServer``) or HTTP (the gateway's)."""

    async def serving(self) -> None: ...

    async def not_serving(self) -> None: ...

    async def stop(self, grace: float) -> None: ...


class Closable(Protocol):
    async def close(self) -> None: ...


class Running(Closable, Protocol):
    """A started server of any kind: where it listens, and how to stop it."""

    @property
    def address(self) -> str: ...


C = TypeVar("C", bound=Closable)


class Service:
    def __init__(self, name: str, grace: float = 5.0) -> None:
        self.name = name
        self.grace = grace
        self.address = ""
        self._opened = AsyncExitStack()
        self.server: Server | None = None
        self._deregister: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.metrics_address = ""  # host:port of its /metrics, once exposed

    # Starting

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[Self]:
        """Build the service inside this block; if anything raises, what was started is stopped."""
        try:
            yield self
        except BaseException:
            await self.close()
            raise

    async def open(self, resource: AbstractAsyncContextManager[T]) -> T:
        """Enter ``resource`` now and exit it at step 5 of ``close``."""
        return await self._opened.enter_async_context(resource)

    def closing(self, resource: C) -> C:
        """Close ``resource`` at step 5 of ``close``."""
        self._opened.push_async_callback(resource.close)
        return resource

    def on_close(self, callback: Callable[[], Awaitable[object]]) -> None:
        """Await ``callback()`` at step 5 of ``close`` (before what was opened earlier)."""
        self._opened.push_async_callback(callback)

    def listen(
        self,
        listen: str,
        advertise: str | None = None,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        max_message_bytes: int | None = None,
        security: Security = PLAINTEXT,
    ) -> GrpcServer:
        """Bind a gRPC server to ``listen``: from now on ``address`` is where others reach it
        (``advertise``, else the bound address, a wildcard host written as the FQDN). It takes
        messages up to ``max_message_bytes`` (``epoxi.runtime.limits``), and is served and
        guarded as ``security`` says (``epoxi.runtime.security``)."""
        server = bind_grpc_server(listen, interceptors, max_message_bytes, security)
        self.server = server
        self.address = advertise or advertised_address(listen, server.port)
        log.info("%s: gRPC on %s: %s", self.name, self.address, security.describe())
        if security.tokens is None:
            log.warning(
                "%s: access control is off: no tokens file (EPOXI_TOKENS_FILE), so every method "
                "is open to whoever reaches %s",
                self.name,
                self.address,
            )
        return server

    async def serve(self, register: Iterable[Register]) -> None:
        """Start the server ``listen`` bound with these servicers, and turn health SERVING."""
        server = self.server
        if not isinstance(server, GrpcServer):
            raise RuntimeError(f"{self.name}: serve() needs listen() first")
        await server.start(register)
        await server.serving()

    async def attach(self, server: Server, address: str) -> None:
        """Take a started ``server`` that others reach at ``address``, and turn its health SERVING."""
        self.server = server
        self.address = address
        await server.serving()

    async def expose_metrics(
        self, telemetry: TelemetryConfig, registry: Any, before_scrape: Iterable[BeforeScrape] = ()
    ) -> str:
        """Serve ``registry`` (a ``prometheus_client.CollectorRegistry``) at
        ``http://<telemetry.metrics_listen>/metrics`` until step 5 of ``close``, and print
        ``<name> metrics on http://<address>/metrics``; nothing when metrics are off. Returns
        ``metrics_address`` (empty when off)."""
        if not telemetry.metrics_on or registry is None:
            return ""
        endpoint = MetricsEndpoint(registry, list(before_scrape))
        self.metrics_address = await endpoint.start(telemetry.metrics_listen)
        self.closing(endpoint)
        print(f"{self.name} metrics on http://{self.metrics_address}/metrics", flush=True)
        return self.metrics_address

    async def register(
        self,
        what: str,
        register: Callable[[], Awaitable[object]],
        deregister: Callable[[], Awaitable[object]],
    ) -> None:
        """``await register()`` now, and ``deregister()`` at step 3 of ``close``."""
        self._deregister.append((what, deregister))
        await register()

    async def register_service(self, consul: Any, registration: dict[str, Any]) -> None:
        """Register a registry service (``agent.service.register`` keyword arguments)."""
        service_id = registration["service_id"]
        await self.register(
            f"service {service_id}",
            lambda: consul.agent.service.register(**registration),
            lambda: consul.agent.service.deregister(service_id),
        )

    def run(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` in the background until step 2 of ``close``."""
        task = asyncio.create_task(work, name=f"{self.name}: {name}")
        self._tasks.append(task)
        return task

    # Stopping

    async def close(self) -> None:
        """Stop, in the order above. A step that fails is logged and the next one still runs."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.server is not None:
                await self._step("turning health NOT_SERVING", self.server.not_serving())
            tasks, self._tasks = self._tasks, []
            await self._step("stopping background tasks", cancel_and_wait(*tasks))
            for what, deregister in reversed(self._deregister):
                try:
                    await deregister()
                except RegistryError as e:  # the registry may be gone first; our checks then lapse
                    log.warning("%s: deregistering %s failed: %s", self.name, what, e)
                except Exception:
                    log.exception("%s: deregistering %s failed", self.name, what)
            if self.server is not None:
                await self._step("stopping the server", self.server.stop(self.grace))
        finally:
            await self._opened.aclose()

    async def _step(self, what: str, step: Awaitable[object]) -> None:
        try:
            await step
        except Exception:
            log.exception("%s: %s failed", self.name, what)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def advertised_address(listen: str, port: int) -> str:
    """Where others reach a server listening on ``listen`` and bound to ``port``."""
    host = listen.rpartition(":")[0]
    if host in _WILDCARDS:
        host = socket.getfqdn()
    return f"{host}:{port}"


# Young collections this many allocations apart (CPython's default is 700): a message's
# short-lived objects mostly die before one, so fewer survive into the older generations.
YOUNG_COLLECTION_EVERY = 10_000


def settle_heap() -> None:
    """Once a service has started: collect, then freeze what is left (modules, servers, stores)
    out of every later collection, so each full collection walks only what came since; and
    collect the young generation less often. Together about 2% of a node's CPU under load."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, older, oldest)


async def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)``; SIGTERM and SIGINT set the event so ``main`` can shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serve_main(
    name: str,
    start: Callable[[], Awaitable[Running]],
    telemetry: TelemetryConfig | None = None,
    instance_id: str | None = None,
) -> int:
    """A service's ``main``: log as ``telemetry`` says, export traces when the ``OTEL_*``
    environment asks for it (as ``epoxi-<name>``, instance ``instance_id``), start the service,
    print ``<name> listening on <address>`` (the line ``devmesh.supervisor`` and other tooling
    wait for), and run until SIGTERM or SIGINT; then stop it and export the spans still buffered.
    A security setting that cannot be used (``SecurityError``) ends it with its message, exit 2."""
    telemetry = telemetry or TelemetryConfig()
    configure_logging(fmt=telemetry.log_format)
    tracing.configure(f"epoxi-{name.split()[0]}", instance_id)

    async def serve(stop: asyncio.Event) -> None:
        service = await start()
        settle_heap()
        try:
            print(f"{name} listening on {service.address}", flush=True)
            await stop.wait()
        finally:
            await service.close()

    try:
        asyncio.run(run_until_signalled(serve))
    except SecurityError as e:
        print(f"{name}: cannot start: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        tracing.shutdown()
    return 0
