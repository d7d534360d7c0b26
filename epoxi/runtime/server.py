"""A grpc.aio server with the health and reflection services every Epoxi service serves.

A server is bound first (``bind_grpc_server``: its port, and so its address, are known) and
started second (``GrpcServer.start`` with the servicers), so whatever the servicers need to know
about their own address can be built before them. Health stays NOT_SERVING until ``serving()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epoxi.runtime.limits import grpc_options, message_limit

# An ``add_XServicer_to_server``-style callable, and the full name of the service it adds.
Register = tuple[Callable[[grpc.aio.Server], None], str]


@dataclass
class GrpcServer:
    """A bound server; ``port`` is the bound port."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str] = field(default_factory=list)

    async def start(self, register: Iterable[Register]) -> None:
        """Add the servicers, health and reflection, and start serving."""
        for add, name in register:
            add(self.server)
            self.service_names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def bind_grpc_server(
    address: str,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int | None = None,
) -> GrpcServer:
    """A server bound to ``address`` (``host:0`` picks a free port), not yet started, that takes
    messages up to ``max_message_bytes`` (default: ``limits.message_limit()`` of the default
    email limit)."""
    limit = message_limit() if max_message_bytes is None else max_message_bytes
    server = grpc.aio.server(interceptors=list(interceptors), options=grpc_options(limit))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return GrpcServer(server, health.aio.HealthServicer(), port)


async def start_grpc_server(
    address: str,
    register: Iterable[Register],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int | None = None,
) -> GrpcServer:
    """Bind to ``address`` and start serving ``register``'s servicers with health and reflection."""
    server = bind_grpc_server(address, interceptors, max_message_bytes)
    await server.start(register)
    return server
