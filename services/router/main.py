"""Wiring for the router: flags, the gRPC server, registry watches and self-registration."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from epoxi import runtime
from epoxi.registry import client, services
from epoxi.v1 import router_pb2, router_pb2_grpc
from services.router.discovery import ClusterView
from services.router.servicer import RouterServicer

SERVICE = "epoxi-router"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--id", default=env("EPOXI_ROUTER_ID", f"router-{socket.gethostname()}"))
    parser.add_argument("--listen", default=env("EPOXI_ROUTER_LISTEN", "127.0.0.1:50051"), help="host:port")
    parser.add_argument("--advertise", default=env("EPOXI_ROUTER_ADVERTISE"), help="address others dial")
    parser.add_argument("--consul", default=env("CONSUL_HTTP_ADDR"), help="registry HTTP address")
    parser.add_argument("--max-batch", type=int, default=int(env("EPOXI_ROUTER_MAX_BATCH", "500")))
    parser.add_argument("--check-interval", default=env("EPOXI_ROUTER_CHECK_INTERVAL", "5s"))


@dataclass
class RunningRouter:
    address: str
    id: str
    server: runtime.Server
    consul: Any
    view: ClusterView
    channels: runtime.Channels

    async def close(self) -> None:
        await self.server.stop()
        try:
            await self.consul.agent.service.deregister(self.id)
        except Exception as e:  # the registry may be gone first; its check then reaps us
            log.warning("could not deregister %s: %s", self.id, e)
        finally:
            await self.view.close()
            await self.channels.close()
            await self.consul.close()


async def start_router(args: argparse.Namespace) -> RunningRouter:
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
    address = args.advertise or f"{args.listen.rpartition(':')[0]}:{server.port}"
    router = RunningRouter(address, args.id, server, consul, view, channels)
    try:
        await consul.agent.service.register(
            **services.grpc_service_registration(SERVICE, args.id, address, args.check_interval)
        )
    except BaseException:
        await router.close()
        raise
    return router


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epoxi router", description="Route emails to node pipelines.")
    add_arguments(parser)
    return runtime.serve_main("router", parser, start_router, argv)
