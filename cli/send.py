"""``epoxi send``: route emails through a router and print the summary.

It dials as the shared security settings say (``epoxi.runtime.security``: ``--tls-ca`` or
EPOXI_TLS_CA for TLS, ``--tls-cert``/``--tls-key`` for mTLS, ``--token-file`` or EPOXI_TOKEN for a
token with scope ``submit``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from google.protobuf import json_format

from epoxi import settings
from epoxi.envelope import new_email
from epoxi.runtime.channels import RPC_TIMEOUT, channel
from epoxi.runtime.security import SecurityConfig, SecurityError, load_security
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epoxi send", description="Route emails through a router.")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--json", type=Path, help="a file with a RouteEmailsRequest as JSON")
    parser.add_argument("--from", dest="sender", default="Epoxi <sender@epoxi.dev>", help="the sender")
    parser.add_argument("--to", action="append", default=[], help="a recipient (repeatable)")
    parser.add_argument("--subject", default="Hello from Epoxi mesh", help="the subject")
    parser.add_argument("--text", default="Sent with epoxi send.", help="the plain-text body")
    parser.add_argument("--ip", default="", help="source IP; empty lets the router pick from --ip-pool")
    parser.add_argument("--ip-pool", default="", help="the IP pool to pick from (default: the router's)")
    settings.add_arguments(parser, SecurityConfig)
    return parser


async def send(args: argparse.Namespace) -> int:
    try:
        security = load_security(settings.from_args(SecurityConfig, args))
    except (SecurityError, ValueError) as e:
        print(f"epoxi send: {e}", file=sys.stderr)
        return 2
    if args.json:
        request = json_format.Parse(args.json.read_text(), router_pb2.RouteEmailsRequest())
    else:
        if not args.to:
            print("epoxi send: give --to (repeatable) or --json FILE", file=sys.stderr)
            return 2
        email = new_email(
            args.sender,
            to=args.to,
            subject=args.subject,
            text=args.text,
            delivery=email_pb2.Delivery(ip=args.ip),
        )
        request = router_pb2.RouteEmailsRequest(emails=[email], ip_pool=args.ip_pool)
    async with channel(args.router, security=security) as ch:
        reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(request, timeout=RPC_TIMEOUT)
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
    return 0 if reply.failed_batches == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(send(build_parser().parse_args(argv)))
