"""gRPC status → HTTP error, as grpc-gateway maps it: a ``google.rpc.Status`` JSON body.

{"code": 5, "message": "no pipeline has routing key ...", "details": []}

A 401 (UNAUTHENTICATED) carries ``WWW-Authenticate: Bearer``, and a 403 (PERMISSION_DENIED)
the same challenge with ``error="insufficient_scope"``, as RFC 6750 has bearer-token servers say it.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2

log = logging.getLogger(__name__)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_DETAILS_KEY = "grpc-status-details-bin"
# RFC 6750 section 3: how a bearer-token resource says a token is missing or wrong, or lacks scope.
CHALLENGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAUTHENTICATED: 'Bearer realm="epoxi"',
    grpc.StatusCode.PERMISSION_DENIED: 'Bearer realm="epoxi", error="insufficient_scope"',
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC code; 500 for UNKNOWN, INTERNAL, DATA_LOSS and anything else."""
    return HTTP_STATUS.get(code, 500)


def code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


class GatewayError(Exception):
    """An error the gateway itself answers with, before or instead of calling the service."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        http: int | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http = http if http is not None else http_status(code)
        self.headers = headers
        # The connection cannot carry another request (its body could not be read): say so.
        self.close = close

    def response(self) -> web.Response:
        response = status_response(self.code, self.message, self.http, headers=self.headers)
        if self.close:
            response.force_close()
        return response


def status_response(
    code: grpc.StatusCode,
    message: str,
    http: int | None = None,
    status: status_pb2.Status | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON ``google.rpc.Status`` response; ``status`` (from the call's trailers) supplies details."""
    body = status_pb2.Status(code=code_number(code), message=message)
    if status is not None:
        body.details.extend(status.details)
    if code in CHALLENGES:
        headers = {"WWW-Authenticate": CHALLENGES[code], **(headers or {})}
    return web.json_response(
        _status_json(body), status=http if http is not None else http_status(code), headers=headers
    )


def _status_json(status: status_pb2.Status) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
    except (json_format.Error, TypeError, KeyError):
        # A detail whose type this process does not know cannot be shown as JSON.
        log.warning("dropping status details of unknown types: %s", [d.type_url for d in status.details])
        return {"code": status.code, "message": status.message, "details": []}


def rpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    code = error.code()
    return status_response(code, error.details() or "", status=rich_status(error))


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a server attached with grpcio-status, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer must not turn the error into a crash
                log.warning("ignoring malformed %s trailer", _DETAILS_KEY)
    return None
