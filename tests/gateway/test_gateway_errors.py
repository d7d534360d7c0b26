from __future__ import annotations

import json

import grpc
import pytest

from gateway.errors import http_status, status_response

# grpc-gateway's table, written out independently of gateway.errors.
TABLE = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_http_status_follows_grpc_gateway(name: str) -> None:
    assert http_status(grpc.StatusCode[name]) == TABLE[name]


def test_status_response_is_a_google_rpc_status() -> None:
    response = status_response(grpc.StatusCode.NOT_FOUND, "no pipeline has routing key x")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert response.body is not None
    assert json.loads(bytes(response.body)) == {  # type: ignore[arg-type]
        "code": 5,
        "message": "no pipeline has routing key x",
        "details": [],
    }


def test_status_response_http_code_can_be_overridden() -> None:
    response = status_response(grpc.StatusCode.UNIMPLEMENTED, "GET only", http=405)
    assert response.status == 405
