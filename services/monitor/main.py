"""Wiring for the monitor: flags, the gRPC server, and its own registration as ``epoxi-monitor``.

In-process use (tests, tools)::

    monitor = await start_monitor(MonitorConfig(consul=registry_addr))
    ...  # dial monitor.address
    await monitor.close()
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass
from types import TracebackType

from epoxi import runtime
from epoxi.registry import client, services
from epoxi.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.servicer import MonitorService, RegistryError

log = logging.getLogger(__name__)

SERVICE = "epoxi-monitor"
SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


@dataclass
class MonitorConfig:
    # Registry address; None means $CONSUL_HTTP_ADDR, then 127.0.0.1:8500.
    consul: str | None = None
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    # Registry service ID; default monitor-<hostname>-<port>.
    id: str | None = None
    check_interval: str = "5s"
    # Seconds to wait for each node's GetNodeState.
    node_timeout: float = 2.0
    # Seconds to wait for each node's StartPipeline or StopPipeline.
    admin_timeout: float = 15.0
    stop_grace: float = 5.0


class RunningMonitor:
    """A started monitor: ``address`` is what others dial; ``close()`` leaves the registry and stops."""

    def __init__(
        self,
        id: str,
        address: str,
        server: runtime.Server,
        consul: client.Consul,
        channels: runtime.Channels,
        stop_grace: float = 5.0,
    ) -> None:
        self.id = id
        self.address = address
        self.server = server
        self.consul = consul
        self.channels = channels
        self.stop_grace = stop_grace
        self._closed = False

    async def close(self) -> None:
        """Deregister (so nobody is sent here any more), drain the server, close the clients."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                await self.consul.agent.service.deregister(self.id)
            except RegistryError as e:
                log.warning("deregistering %s failed: %s", self.id, e)
            await self.server.stop(self.stop_grace)
        finally:
            try:
                await self.channels.close()
            finally:
                await self.consul.close()

    async def __aenter__(self) -> RunningMonitor:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_monitor(config: MonitorConfig) -> RunningMonitor:
    """Serve MonitorService (with health and reflection) and register it with a GRPC check."""
    consul = client.connect(config.consul)
    channels = runtime.Channels()
    servicer = MonitorService(consul, channels, config.node_timeout, config.admin_timeout)
    try:
        server = await runtime.start_server(
            config.listen,
            [(lambda s: monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, s), SERVICE_NAME)],
        )
    except BaseException:
        await consul.close()
        raise
    address = config.advertise or advertised_address(config.listen, server.port)
    service_id = config.id or f"monitor-{socket.gethostname()}-{server.port}"
    running = RunningMonitor(service_id, address, server, consul, channels, config.stop_grace)
    try:
        await consul.agent.service.register(
            **services.grpc_service_registration(SERVICE, service_id, address, config.check_interval)
        )
    except BaseException:
        await running.close()
        raise
    return running


def advertised_address(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0]
    if host in _WILDCARDS:
        host = socket.getfqdn()
    return f"{host}:{port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--id", default=env("EPOXI_MONITOR_ID"), help="registry service ID")
    parser.add_argument(
        "--listen", default=env("EPOXI_MONITOR_LISTEN", "127.0.0.1:50052"), help="host:port (port 0: any)"
    )
    parser.add_argument("--advertise", default=env("EPOXI_MONITOR_ADVERTISE"), help="address others dial")
    parser.add_argument(
        "--consul", default=env("EPOXI_MONITOR_CONSUL", env("CONSUL_HTTP_ADDR")), help="registry HTTP address"
    )
    parser.add_argument(
        "--check-interval",
        default=env("EPOXI_MONITOR_CHECK_INTERVAL", "5s"),
        help="registry GRPC check interval",
    )
    parser.add_argument(
        "--node-timeout",
        type=float,
        default=float(env("EPOXI_MONITOR_NODE_TIMEOUT", "2")),
        help="seconds to wait for each node's live state",
    )


def config_from_args(args: argparse.Namespace) -> MonitorConfig:
    return MonitorConfig(
        consul=args.consul or None,
        listen=args.listen,
        advertise=args.advertise,
        id=args.id,
        check_interval=args.check_interval,
        node_timeout=args.node_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="epoxi monitor", description="Cluster-wide pipeline discovery, stats and health."
    )
    add_arguments(parser)
    return runtime.serve_main("monitor", parser, lambda args: start_monitor(config_from_args(args)), argv)
