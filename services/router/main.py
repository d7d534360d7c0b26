"""Wiring for the router: flags, the gRPC server, registry watches and self-registration."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from epoxi import runtime
from epoxi.registry import client, services
from epoxi.v1 import router_pb2, router_pb2_grpc
from services.router.discovery import ClusterView
from services.router.servicer import RouterServicer

SERVICE = "epoxi-router"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--id", default=env("EPOXI_ROUTER_ID", f"router-{socket.gethostname()}"))
    parser.add_argument("--listen", default=env("EPOXI_ROUTER_LISTEN", "127.0.0.1:50051"), help="host:port")
    parser.add_argument("--advertise", default=env("EPOXI_ROUTER_ADVERTISE"), help="address others dial")
    parser.add_argument("--consul", default=env("CONSUL_HTTP_ADDR"), help="registry HTTP address")
    parser.add_argument("--max-batch", type=int, default=int(env("EPOXI_ROUTER_MAX_BATCH", "500")))
    parser.add_argument("--check-interval", default=env("EPOXI_ROUTER_CHECK_INTERVAL", "5s"))


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    consul = client.connect(args.consul)
    channels = runtime.Channels()
    view = ClusterView(consul).start()
    servicer = RouterServicer(view, channels, max_batch=args.max_batch)
    server = await runtime.start_server(
        args.listen,
        [
            (
                lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s),
                router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
            )
        ],
    )
    host = args.listen.rpartition(":")[0]
    address = args.advertise or f"{host}:{server.port}"
    try:
        await consul.agent.service.register(
            **services.grpc_service_registration(SERVICE, args.id, address, args.check_interval)
        )
        print(f"router listening on {address}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        try:
            await consul.agent.service.deregister(args.id)
        finally:
            await view.close()
            await channels.close()
            await consul.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epoxi router", description="Route emails to node pipelines.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    runtime.configure_logging()
    asyncio.run(runtime.run_until_signalled(lambda stop: run(args, stop)))
    return 0
