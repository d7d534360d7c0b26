"""gRPC runtime shared by every service: server bootstrap, graceful shutdown, client channels."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

RPC_TIMEOUT = 10.0

# Retry only what never reached a handler; everything else is the caller's decision.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

Register = Callable[[grpc.aio.Server], None]


@dataclass
class Server:
    """A started grpc.aio server with its health service; ``port`` is the bound port."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str] = field(default_factory=list)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    address: str,
    register: Iterable[tuple[Register, str]],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> Server:
    """Start a server on ``address`` (``host:0`` picks a free port) with health and reflection.

    ``register`` pairs a ``add_XServicer_to_server``-style callable with the full service name.
    """
    server = grpc.aio.server(interceptors=list(interceptors))
    health_servicer = health.aio.HealthServicer()
    names = []
    for add, name in register:
        add(server)
        names.append(name)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Server(server, health_servicer, port, names)


def channel(target: str) -> grpc.aio.Channel:
    """One long-lived channel per target, retrying UNAVAILABLE."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )


class Channels:
    """Caches one channel per target for the life of a service."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = channel(target)
        return ch

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels))


async def run_until_signalled(
    main: Callable[[asyncio.Event], Awaitable[None]],
) -> None:
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


class Running(Protocol):
    """A started service: where it listens, and how to stop it gracefully."""

    @property
    def address(self) -> str: ...

    async def close(self) -> None: ...


def serve_main(
    name: str,
    parser: argparse.ArgumentParser,
    start: Callable[[argparse.Namespace], Awaitable[Running]],
    argv: list[str] | None = None,
) -> int:
    """A service's ``main``: parse flags, start it, print ``<name> listening on <address>``
    (the line ``devmesh.supervisor`` and other tooling wait for), and run until SIGTERM or SIGINT."""
    args = parser.parse_args(argv)
    configure_logging()

    async def serve(stop: asyncio.Event) -> None:
        service = await start(args)
        try:
            print(f"{name} listening on {service.address}", flush=True)
            await stop.wait()
        finally:
            await service.close()

    asyncio.run(run_until_signalled(serve))
    return 0


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
