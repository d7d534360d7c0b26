"""Wiring for the router: its settings, the gRPC server, the registry watch of the nodes, the
owner cache, and self-registration.

In-process use (tests, tools)::

    router = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry_addr))
    ...  # dial router.address
    await router.close()
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from epoxi import durations, settings, validation
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.grpc_metrics import GrpcServerMetrics
from epoxi.observability.metrics import new_registry
from epoxi.registry import client, services
from epoxi.registry.metrics import RegistryMetrics
from epoxi.runtime.channels import Channels
from epoxi.runtime.lifecycle import Service, serve_main
from epoxi.runtime.limits import message_limit
from epoxi.runtime.security import SecurityConfig, load_security
from epoxi.settings import group, program, setting
from epoxi.v1 import router_pb2, router_pb2_grpc
from services.router.discovery import ClusterView
from services.router.metrics import RouterMetrics
from services.router.owners import DEFAULT_MAX_ENTRIES, OwnerCache, Owners
from services.router.servicer import RouterServicer

SERVICE = "epoxi-router"
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


@program("epoxi router", "Route emails to node pipelines.", env_prefix="EPOXI_ROUTER_")
@dataclass(frozen=True)
class RouterConfig:
    id: str = setting(
        default_factory=lambda: f"router-{socket.gethostname()}",
        shown="router-<hostname>",
        help="registry service ID",
    )
    listen: str = setting("127.0.0.1:50051", help="host:port to serve gRPC on (port 0: any)")
    advertise: str | None = setting(None, shown="from --listen", help="the address others dial")
    consul: str | None = setting(
        None,
        env=("EPOXI_ROUTER_CONSUL", "CONSUL_HTTP_ADDR"),
        shown="127.0.0.1:8500",
        help="registry HTTP address",
    )
    max_batch: int = setting(500, parse=int, help="most emails per batch handed to a node")
    owner_cache_size: int = setting(
        DEFAULT_MAX_ENTRIES,
        parse=_positive_int,
        shown="100000",
        help="most routing keys whose owning node the router remembers (least recently used go first)",
    )
    # The one size limit (epoxi.validation); it also sizes the gRPC messages (epoxi.runtime.limits).
    max_email_bytes: int = validation.max_email_bytes_setting("EPOXI_ROUTER_")
    check_interval: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how often the registry probes the router's health"
    )
    stop_grace: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how long calls under way may take at shutdown"
    )
    # TLS for its server and its calls to the nodes, and bearer tokens (epoxi.runtime.security).
    security: SecurityConfig = group(SecurityConfig)
    # Log format and the /metrics address (epoxi.observability.config).
    telemetry: TelemetryConfig = group(TelemetryConfig)


class RunningRouter(Service):
    view: ClusterView
    channels: Channels
    servicer: RouterServicer
    metrics: RouterMetrics


async def start_router(config: RouterConfig) -> RunningRouter:
    """Watch the registry's nodes, serve RouterService and its metrics, register as ``epoxi-router``."""
    security = load_security(config.security)
    router = RunningRouter("router", config.stop_grace)
    registry = new_registry("router") if config.telemetry.metrics_on else None
    metrics = router.metrics = RouterMetrics(registry)
    async with router.starting():
        consul = router.closing(client.connect(config.consul, metrics=RegistryMetrics(registry)))
        max_message_bytes = message_limit(config.max_email_bytes)
        router.channels = router.closing(Channels(max_message_bytes, security))
        router.view = router.closing(ClusterView(consul).start())
        metrics.watch_view(router.view.answered_at)
        servicer = router.servicer = RouterServicer(
            router.view,
            router.channels,
            Owners(consul, OwnerCache(config.owner_cache_size)),
            max_batch=config.max_batch,
            max_email_bytes=config.max_email_bytes,
            metrics=metrics,
        )
        router.listen(
            config.listen,
            config.advertise,
            interceptors=[GrpcServerMetrics(registry)] if registry is not None else [],
            max_message_bytes=max_message_bytes,
            security=security,
        )
        await router.expose_metrics(config.telemetry, registry, before_scrape=[metrics.before_scrape])
        await router.serve(
            [(lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s), SERVICE_NAME)]
        )
        await router.register_service(
            consul,
            security.with_tls_check(
                services.with_metrics(
                    services.grpc_service_registration(
                        SERVICE, config.id, router.address, durations.go(config.check_interval)
                    ),
                    router.metrics_address,
                )
            ),
        )
    return router


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse(RouterConfig, argv)
    return serve_main("router", lambda: start_router(config), config.telemetry, config.id)
