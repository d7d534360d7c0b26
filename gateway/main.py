"""Wiring for the HTTP gateway: its settings, each service's upstream (given or discovered), the
HTTP server, and its telemetry (``gateway.telemetry``: a span per request, request metrics
served at ``/metrics`` with its registry client's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from epoxi import durations, settings, validation
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.metrics import new_registry
from epoxi.registry import client
from epoxi.registry.metrics import RegistryMetrics
from epoxi.runtime.channels import RPC_TIMEOUT, Channels
from epoxi.runtime.lifecycle import Closable, serve_main
from epoxi.runtime.security import Security, SecurityConfig, load_security
from epoxi.settings import group, program, setting
from epoxi.v1 import monitor_pb2, router_pb2
from gateway.app import MAX_REQUEST_BYTES, Backend, Gateway, start_gateway
from gateway.telemetry import GatewayMetrics, HttpTelemetry
from gateway.upstream import RegistryUpstream, StaticUpstream, Upstream

MONITOR_SERVICE = "epoxi-monitor"
ROUTER_SERVICE = "epoxi-router"
MONITOR = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]
ROUTER = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
SERVICES = [MONITOR, ROUTER]
# The media types of each google.api.HttpBody request field (its contract says which).
MEDIA_TYPES = {"epoxi.v1.RouteRawEmailRequest.message": ["message/rfc822"]}


@program(
    "epoxi gateway",
    "Serve the mesh's HTTP API (google.api.http): the monitor's and the router's methods.",
    env_prefix="EPOXI_GATEWAY_",
)
@dataclass(frozen=True)
class GatewayConfig:
    listen: str = setting("127.0.0.1:8080", help="HTTP host:port")
    monitor: str | None = setting(
        None, shown=f"a passing {MONITOR_SERVICE} from the registry", help="the monitor's gRPC host:port"
    )
    router: str | None = setting(
        None, shown=f"a passing {ROUTER_SERVICE} from the registry", help="the router's gRPC host:port"
    )
    consul: str | None = setting(
        None,
        env=("EPOXI_GATEWAY_CONSUL", "CONSUL_HTTP_ADDR"),
        help="registry HTTP address, used for the services not given by address",
    )
    timeout: float = setting(
        RPC_TIMEOUT, parse=durations.seconds, shown="10s", help="how long one gRPC call may take"
    )
    stop_grace: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how long requests under way may take at shutdown"
    )
    max_request_bytes: int = setting(
        MAX_REQUEST_BYTES,
        parse=validation.parse_size,
        shown=validation.format_size(MAX_REQUEST_BYTES).replace(" ", ""),
        metavar="SIZE",
        help="the largest request body accepted (bytes, or KiB, MiB, GiB); a larger one is refused with 413",
    )
    # TLS (mTLS) to the monitor and the router. The caller's Authorization header travels on as
    # its bearer token, so a token of the gateway's own (EPOXI_TOKEN*) is never sent.
    security: SecurityConfig = group(SecurityConfig)
    # Log format and the /metrics address (epoxi.observability.config).
    telemetry: TelemetryConfig = group(TelemetryConfig)


def upstream(address: str | None, service: str, registry: Any, channels: Channels | None = None) -> Upstream:
    """``address`` when given, else a passing instance of ``service`` from ``registry``."""
    if address:
        return StaticUpstream(address, channels)
    return RegistryUpstream(registry, service, channels)


async def start(config: GatewayConfig) -> Gateway:
    resources: list[Closable] = []
    metrics = new_registry("gateway") if config.telemetry.metrics_on else None
    registry = None
    if not (config.monitor and config.router):
        registry = client.connect(config.consul, metrics=RegistryMetrics(metrics))
        resources.append(registry)
    security = _dialling(load_security(config.security))
    monitor = Backend(
        MONITOR, upstream(config.monitor, MONITOR_SERVICE, registry, Channels(security=security))
    )
    router = Backend(ROUTER, upstream(config.router, ROUTER_SERVICE, registry, Channels(security=security)))
    http = HttpTelemetry(GatewayMetrics(metrics))
    gateway = await start_gateway(
        config.listen,
        [monitor, router],
        config.timeout,
        config.stop_grace,
        config.max_request_bytes,
        health=monitor,
        media_types=MEDIA_TYPES,
        resources=resources,
        middlewares=[http.middleware],
    )
    try:
        await gateway.expose_metrics(config.telemetry, metrics)
    except BaseException:
        await gateway.close()
        raise
    return gateway


def _dialling(security: Security) -> Security:
    return dataclasses.replace(security, token=None, tokens=None)


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse(GatewayConfig, argv)
    return serve_main("gateway", lambda: start(config), config.telemetry)
