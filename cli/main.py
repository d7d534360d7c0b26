"""The ``epoxi`` command: one entry point for every service, the dev mesh and a sender."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from pathlib import Path

from google.protobuf import json_format

from epoxi import envelope, runtime
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc

# Each service module has main(argv); imported only when chosen.
SERVICES = {
    "registry": "devmesh.registry.__main__",
    "node": "services.node.main",
    "router": "services.router.main",
    "monitor": "services.monitor.main",
    "gateway": "gateway.main",
    "sink": "devmesh.sink",
}


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--json", type=Path, help="a file with a RouteEmailsRequest as JSON")
    parser.add_argument("--from", dest="sender", default="Epoxi <sender@devmesh.launch>")
    parser.add_argument("--to", action="append", default=[])
    parser.add_argument("--subject", default="Hello from Epoxi mesh")
    parser.add_argument("--text", default="Sent with epoxi send.")
    parser.add_argument("--ip", default="", help="source IP; empty lets the router pick from --ip-pool")
    parser.add_argument("--ip-pool", default="")


async def send(args: argparse.Namespace) -> int:
    if args.json:
        request = json_format.Parse(args.json.read_text(), router_pb2.RouteEmailsRequest())
    else:
        if not args.to:
            print("epoxi send: give --to (repeatable) or --json FILE", file=sys.stderr)
            return 2
        email = envelope.new_email(
            args.sender,
            to=args.to,
            subject=args.subject,
            text=args.text,
            delivery=email_pb2.Delivery(ip=args.ip),
        )
        request = router_pb2.RouteEmailsRequest(emails=[email], ip_pool=args.ip_pool)
    async with runtime.channel(args.router) as ch:
        reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(request, timeout=runtime.RPC_TIMEOUT)
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
    return 0 if reply.failed_batches == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        module = importlib.import_module(SERVICES[argv[0]])
        return int(module.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="epoxi", description="Epoxi mesh: distributed email delivery.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} (see 'epoxi {name} --help')", add_help=False)
    from devmesh import launch as dev

    dev.add_arguments(sub.add_parser("dev", help="run the whole mesh on this machine, with a demo batch"))
    _send_arguments(sub.add_parser("send", help="route emails through a router"))
    args = parser.parse_args(argv)
    if args.command == "send":
        return asyncio.run(send(args))
    runtime.configure_logging("WARNING")
    code = 0

    async def dev_main(stop: asyncio.Event) -> None:
        nonlocal code
        code = await dev.run(args, stop)

    asyncio.run(runtime.run_until_signalled(dev_main))
    return code
