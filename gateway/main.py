"""Wiring for the HTTP gateway: flags, the monitor's address (given or discovered), the HTTP server."""

from __future__ import annotations

import argparse
import os

from epoxi import runtime
from epoxi.registry import client
from epoxi.v1 import monitor_pb2
from gateway.app import Gateway, start_gateway
from gateway.upstream import RegistryUpstream, StaticUpstream, Upstream

MONITOR_SERVICE = "epoxi-monitor"
SERVICES = [monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--listen", default=env("EPOXI_GATEWAY_LISTEN", "127.0.0.1:8080"), help="HTTP host:port"
    )
    parser.add_argument(
        "--monitor",
        default=env("EPOXI_GATEWAY_MONITOR"),
        help=f"the monitor's gRPC host:port (default: a passing {MONITOR_SERVICE} from the registry)",
    )
    parser.add_argument(
        "--consul",
        default=env("EPOXI_GATEWAY_CONSUL") or env("CONSUL_HTTP_ADDR"),
        help="registry HTTP address, used when --monitor is not given",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env("EPOXI_GATEWAY_TIMEOUT", str(runtime.RPC_TIMEOUT))),
        help="seconds per gRPC call",
    )


async def start(args: argparse.Namespace) -> Gateway:
    upstream: Upstream
    if args.monitor:
        upstream = StaticUpstream(args.monitor)
    else:
        upstream = RegistryUpstream(client.connect(args.consul), MONITOR_SERVICE, owns_client=True)
    return await start_gateway(args.listen, SERVICES, upstream, args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="epoxi gateway", description="Serve the monitor's HTTP admin API (google.api.http)."
    )
    add_arguments(parser)
    return runtime.serve_main("gateway", parser, start, argv)
