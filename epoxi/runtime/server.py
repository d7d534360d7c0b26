"""A grpc.aio server with the health and reflection services every Epoxi service serves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# An ``add_XServicer_to_server``-style callable, and the full name of the service it adds.
Register = tuple[Callable[[grpc.aio.Server], None], str]


@dataclass
class GrpcServer:
    """A started server; ``port`` is the bound port. Health stays NOT_SERVING until ``serving()``."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str] = field(default_factory=list)

    async def serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


async def start_grpc_server(
    address: str,
    register: Iterable[Register],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> GrpcServer:
    """Start a server on ``address`` (``host:0`` picks a free port) with health and reflection."""
    server = grpc.aio.server(interceptors=list(interceptors))
    health_servicer = health.aio.HealthServicer()
    names = []
    for add, name in register:
        add(server)
        names.append(name)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return GrpcServer(server, health_servicer, port, names)
