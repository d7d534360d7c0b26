"""What the ``epoxi`` admin and send commands exit with, and how a gRPC error maps to it.

One table, so every command means the same by the same number (docs/cli.md).
"""

from __future__ import annotations

import sys

import grpc

OK = 0
# The call ran, but what it reports failed: unhealthy pipelines, a stop or move that failed,
# emails that were not accepted.
FAILED = 1
# A usage error or an argument the service refused (INVALID_ARGUMENT), as argparse exits.
USAGE = 2
NOT_FOUND = 3
UNREACHABLE = 4
DENIED = 5

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: USAGE,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: UNREACHABLE,
    grpc.StatusCode.UNAUTHENTICATED: DENIED,
    grpc.StatusCode.PERMISSION_DENIED: DENIED,
}

EPILOG = """exit codes:
  0  ok
  1  the operation ran but reports failure (unhealthy pipelines, a failed stop or move,
     emails not accepted), or the service failed otherwise (e.g. ABORTED, INTERNAL)
  2  usage error, or an argument the service refused (INVALID_ARGUMENT)
  3  not found (NOT_FOUND: unknown routing key or message id, no shaping to clear)
  4  cannot reach the service (UNAVAILABLE, DEADLINE_EXCEEDED)
  5  not allowed (UNAUTHENTICATED, PERMISSION_DENIED)"""


def for_code(code: grpc.StatusCode) -> int:
    return _BY_CODE.get(code, FAILED)


def rpc_failed(command: str, error: grpc.aio.AioRpcError) -> int:
    """Say ``epoxi <command>: <CODE>: <message>`` on stderr; the exit code for it."""
    code = error.code()
    print(f"epoxi {command}: {code.name}: {error.details() or 'no details'}", file=sys.stderr)
    return for_code(code)


def usage(command: str, message: str) -> int:
    print(f"epoxi {command}: {message}", file=sys.stderr)
    return USAGE
