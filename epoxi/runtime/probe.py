"""``python -m epoxi.runtime.probe HOST:PORT[/SERVICE]``: one gRPC health check, for container
healthchecks (the image has no grpcurl).

It dials as every service dials (``epoxi.runtime.channels``, with the shared ``EPOXI_TLS_*`` and
``EPOXI_TOKEN*`` environment: TLS when a CA or certificate is given, the certificate presented
for mTLS, ``EPOXI_TLS_SERVER_NAME`` as the name to verify) and calls
``grpc.health.v1.Health/Check``. Exit status 0 when the answer is SERVING, 1 for any other
answer or error, 2 for settings that cannot be used; it prints one line saying which.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epoxi.runtime.channels import channel
from epoxi.runtime.security import Security, SecurityError, security_from_environment

SERVING = health_pb2.HealthCheckResponse.SERVING


async def probe(target: str, deadline: float, security: Security) -> tuple[bool, str]:
    """``(serving, what was seen)`` for ``host:port`` or ``host:port/service``."""
    server, _, service = target.partition("/")
    async with channel(server, security=security) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except grpc.aio.AioRpcError as e:
            return False, f"{target}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epoxi.runtime.probe", description="Check a gRPC server's health once."
    )
    parser.add_argument("target", help="host:port, or host:port/service")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    args = parser.parse_args(argv)
    try:
        security = security_from_environment()
    except SecurityError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    serving, seen = asyncio.run(probe(args.target, args.timeout, security))
    print(seen, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
