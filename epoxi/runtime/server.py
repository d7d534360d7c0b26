"""A grpc.aio server with the health and reflection services every Epoxi service serves.

A server is bound first (``bind_grpc_server``: its port, and so its address, are known) and
started second (``GrpcServer.start`` with the servicers), so whatever the servicers need to know
about their own address can be built before them. Health stays NOT_SERVING until ``serving()``.

A server is built with the process's ``Security`` (``epoxi.runtime.security``): its port is TLS
(mTLS) when that has a certificate, and its first interceptor checks bearer tokens when that has
tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epoxi.observability import grpc_tracing
from epoxi.runtime.limits import grpc_options, message_limit
from epoxi.runtime.security import PLAINTEXT, Security

# An ``add_XServicer_to_server``-style callable, and the full name of the service it adds.
Register = tuple[Callable[[grpc.aio.Server], None], str]


@dataclass
class GrpcServer:
    """A bound server; ``port`` is the bound port."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    security: Security = PLAINTEXT
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
    security: Security = PLAINTEXT,
) -> GrpcServer:
    """A server bound to ``address`` (``host:0`` picks a free port), not yet started, that takes
    messages up to ``max_message_bytes`` (default: ``limits.message_limit()`` of the default
    email limit), served and guarded as ``security`` says, and traced while tracing is on."""
    limit = message_limit() if max_message_bytes is None else max_message_bytes
    server = grpc.aio.server(
        interceptors=[*grpc_tracing.server_interceptors(), *security.server_interceptors(), *interceptors],
        options=grpc_options(limit),
    )
    credentials = security.server_credentials()
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return GrpcServer(server, health.aio.HealthServicer(), port, security=security)


async def start_grpc_server(
    address: str,
    register: Iterable[Register],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int | None = None,
    security: Security = PLAINTEXT,
) -> GrpcServer:
    """Bind to ``address`` and start serving ``register``'s servicers with health and reflection."""
    server = bind_grpc_server(address, interceptors, max_message_bytes, security)
    await server.start(register)
    return server
