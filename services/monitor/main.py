"""Wiring for the monitor: its settings, the gRPC server, and its registration as ``epoxi-monitor``.

In-process use (tests, tools)::

    monitor = await start_monitor(MonitorConfig(consul=registry_addr))
    ...  # dial monitor.address
    await monitor.close()
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from epoxi import durations, settings
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.grpc_metrics import GrpcServerMetrics
from epoxi.observability.metrics import new_registry
from epoxi.registry import client, services
from epoxi.registry.metrics import RegistryMetrics
from epoxi.runtime.channels import Channels
from epoxi.runtime.lifecycle import Service, serve_main
from epoxi.runtime.security import SecurityConfig, load_security
from epoxi.settings import group, program, setting
from epoxi.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.servicer import MonitorService

SERVICE = "epoxi-monitor"
SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name


@program(
    "epoxi monitor",
    "Cluster-wide pipeline discovery, stats and health.",
    env_prefix="EPOXI_MONITOR_",
)
@dataclass(frozen=True)
class MonitorConfig:
    consul: str | None = setting(
        None,
        env=("EPOXI_MONITOR_CONSUL", "CONSUL_HTTP_ADDR"),
        shown="127.0.0.1:8500",
        help="registry HTTP address",
    )
    listen: str = setting("127.0.0.1:50052", help="host:port to serve gRPC on (port 0: any)")
    advertise: str | None = setting(None, shown="from --listen", help="the address others dial")
    id: str | None = setting(None, shown="monitor-<hostname>-<port>", help="registry service ID")
    check_interval: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how often the registry probes the monitor's health"
    )
    node_timeout: float = setting(
        2.0, parse=durations.seconds, shown="2s", help="how long to wait for each node's live state"
    )
    admin_timeout: float = setting(
        15.0,
        parse=durations.seconds,
        shown="15s",
        help="how long to wait for a node to start or stop a pipeline (a stop drains it and hands its mail over)",
    )
    stop_grace: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how long calls under way may take at shutdown"
    )
    # TLS for its server and its calls to the nodes, and bearer tokens (epoxi.runtime.security).
    security: SecurityConfig = group(SecurityConfig)
    # Log format and the /metrics address (epoxi.observability.config).
    telemetry: TelemetryConfig = group(TelemetryConfig)


class RunningMonitor(Service):
    id: str


async def start_monitor(config: MonitorConfig) -> RunningMonitor:
    """Serve MonitorService (with health and reflection) and its metrics (its gRPC calls and
    its registry client), and register it with a GRPC check."""
    security = load_security(config.security)
    monitor = RunningMonitor("monitor", config.stop_grace)
    registry = new_registry("monitor") if config.telemetry.metrics_on else None
    async with monitor.starting():
        consul = monitor.closing(client.connect(config.consul, metrics=RegistryMetrics(registry)))
        channels = monitor.closing(Channels(security=security))
        interceptors = [GrpcServerMetrics(registry)] if registry is not None else []
        server = monitor.listen(config.listen, config.advertise, interceptors, security=security)
        await monitor.expose_metrics(config.telemetry, registry)
        monitor.id = config.id or f"monitor-{socket.gethostname()}-{server.port}"
        servicer = MonitorService(
            consul, channels, config.node_timeout, config.admin_timeout, monitor.id, monitor.address
        )
        await monitor.serve(
            [(lambda s: monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, s), SERVICE_NAME)]
        )
        await monitor.register_service(
            consul,
            security.with_tls_check(
                services.with_metrics(
                    services.grpc_service_registration(
                        SERVICE, monitor.id, monitor.address, durations.go(config.check_interval)
                    ),
                    monitor.metrics_address,
                )
            ),
        )
    return monitor


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse(MonitorConfig, argv)
    return serve_main("monitor", lambda: start_monitor(config), config.telemetry)
