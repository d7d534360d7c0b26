"""Wiring for the HTTP gateway: its settings, the monitor's address (given or discovered), the HTTP server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epoxi import durations, settings, validation
from epoxi.registry import client
from epoxi.runtime.channels import RPC_TIMEOUT
from epoxi.runtime.lifecycle import serve_main
from epoxi.settings import program, setting
from epoxi.v1 import monitor_pb2
from gateway.app import MAX_REQUEST_BYTES, Gateway, start_gateway
from gateway.upstream import RegistryUpstream, StaticUpstream, Upstream

MONITOR_SERVICE = "epoxi-monitor"
SERVICES = [monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]]


@program(
    "epoxi gateway", "Serve the monitor's HTTP admin API (google.api.http).", env_prefix="EPOXI_GATEWAY_"
)
@dataclass(frozen=True)
class GatewayConfig:
    listen: str = setting("127.0.0.1:8080", help="HTTP host:port")
    monitor: str | None = setting(
        None, shown=f"a passing {MONITOR_SERVICE} from the registry", help="the monitor's gRPC host:port"
    )
    consul: str | None = setting(
        None,
        env=("EPOXI_GATEWAY_CONSUL", "CONSUL_HTTP_ADDR"),
        help="registry HTTP address, used when --monitor is not given",
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


async def start(config: GatewayConfig) -> Gateway:
    upstream: Upstream
    if config.monitor:
        upstream = StaticUpstream(config.monitor)
    else:
        upstream = RegistryUpstream(client.connect(config.consul), MONITOR_SERVICE, owns_client=True)
    return await start_gateway(
        config.listen, SERVICES, upstream, config.timeout, config.stop_grace, config.max_request_bytes
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse(GatewayConfig, argv)
    return serve_main("gateway", lambda: start(config))
