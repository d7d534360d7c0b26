"""Headers into gRPC metadata (Idempotency-Key, X-Request-Id, W3C trace context) and back
(X-Request-Id on every response; the bearer challenge on 401 and 403)."""

from __future__ import annotations

import re

import aiohttp
import grpc
import pytest

from tests.gateway.support import EchoServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def _metadata(http: aiohttp.ClientSession, echo: EchoServer, headers: dict[str, str]) -> dict[str, str]:
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    return {k: v for k, v in echo.servicer.metadata if isinstance(v, str)}


async def test_idempotency_key_and_request_id_are_metadata(
    http: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    headers = {"Idempotency-Key": "order-42", "X-Request-Id": "req-1"}
    async with http.post("/v1/things", json={}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-1"
    md = dict(echo_server.servicer.metadata)
    assert (md["idempotency-key"], md["x-request-id"]) == ("order-42", "req-1")


async def test_a_request_id_is_made_up_when_absent_and_echoed(
    http: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    ids = []
    for _ in range(2):
        async with http.get("/v1/things/abc") as resp:
            ids.append(resp.headers["X-Request-Id"])
        assert dict(echo_server.servicer.metadata)["x-request-id"] == ids[-1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nowhere"),
        ("POST", "/v1/things/abc"),
        ("GET", "/v1/fail/5"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
    ],
)
async def test_every_response_carries_the_request_id(
    http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, path, headers={"X-Request-Id": "mine"}) as resp:
        assert resp.headers["X-Request-Id"] == "mine"


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"X-Request-Id": "é"}, "X-Request-Id: the value must be 1 to 255 printable ASCII characters"),
        ({"X-Request-Id": "x" * 256}, "X-Request-Id: the value is 256 characters long; at most 255"),
        ({"Idempotency-Key": ""}, "Idempotency-Key: the value must be 1 to 255 printable ASCII characters"),
        ({"Grpc-Metadata-Idempotency-Key": "k"}, "send Idempotency-Key as the header of that name"),
        ({"Grpc-Metadata-X-Request-Id": "k"}, "send X-Request-Id as the header of that name"),
    ],
)
async def test_headers_that_cannot_be_metadata_are_400(
    http: aiohttp.ClientSession, headers: dict[str, str], error: str
) -> None:
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
        request_id = resp.headers["X-Request-Id"]
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error in body["message"]
    assert request_id and request_id != headers.get("X-Request-Id")


async def test_repeated_idempotency_keys_are_400(http: aiohttp.ClientSession) -> None:
    headers = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 400
        assert "Idempotency-Key is given 2 times" in (await resp.json())["message"]


async def test_a_valid_traceparent_passes_with_tracestate(
    http: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    md = await _metadata(http, echo_server, {"traceparent": PARENT, "tracestate": "congo=t61rcWkgMzE"})
    assert (md["traceparent"], md["tracestate"]) == (PARENT, "congo=t61rcWkgMzE")
    # A later version may carry more fields after its four.
    future = f"01-{TRACE_ID}-00f067aa0ba902b7-01-more"
    assert (await _metadata(http, echo_server, {"traceparent": future}))["traceparent"] == future


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",  # hex is lower case
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace ID
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent ID
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID}-00f067aa0ba902b7",
    ],
)
async def test_an_invalid_traceparent_is_dropped_with_its_tracestate(
    http: aiohttp.ClientSession, echo_server: EchoServer, traceparent: str
) -> None:
    md = await _metadata(http, echo_server, {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"})
    assert "traceparent" not in md
    assert "tracestate" not in md


@pytest.mark.parametrize(
    ("code", "challenge"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 'Bearer realm="epoxi"'),
        (grpc.StatusCode.PERMISSION_DENIED, 'Bearer realm="epoxi", error="insufficient_scope"'),
    ],
)
async def test_auth_refusals_carry_the_bearer_challenge(
    http: aiohttp.ClientSession, code: grpc.StatusCode, challenge: str
) -> None:
    async with http.get(f"/v1/fail/{code.value[0]}", params={"name": "no"}) as resp:
        assert (resp.status, resp.headers["WWW-Authenticate"]) == (
            {16: 401, 7: 403}[code.value[0]],
            challenge,
        )
        assert (await resp.json())["code"] == code.value[0]
    async with http.get("/v1/fail/5") as resp:
        assert "WWW-Authenticate" not in resp.headers
