"""Status codes and plain-text bodies of the errors Consul returns."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest
from consul import Check

from epoxi.registry.client import Consul

pytestmark = pytest.mark.consul


async def call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async with http.request(method, path, **kwargs) as response:
        return response.status, await response.text()


async def test_unknown_path_is_404(http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", "/v1/no/such/endpoint") == (
        404,
        "Invalid URL path: not a recognized HTTP API endpoint\n",
    )


async def test_wrong_method_is_405_with_allow(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/agent/service/register") as response:
        assert (response.status, await response.text()) == (405, "method GET not allowed")
        assert response.headers["Allow"] == "OPTIONS,PUT"
    async with http.delete("/v1/agent/services") as response:
        assert (response.status, await response.text()) == (405, "method DELETE not allowed")
        assert response.headers["Allow"] == "OPTIONS,GET"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "Request decode failed: EOF"),
        (b'{"Name": "x", "Bogus": 1}', 'Request decode failed: json: unknown field "Bogus"'),
        (
            b'{"Name": "x", "Check": {"TTL": "1s", "Colour": "red"}}',
            'Request decode failed: json: unknown field "Colour"',
        ),
        (b'{"Name": "x", "Check": {"TTL": "soon"}}', 'Request decode failed: time: invalid duration "soon"'),
        (b'{"Port": 80}', "Missing service name"),
        (b'{"Name": "x", "Address": "0.0.0.0"}', "Invalid service address"),
        (b'{"Name": "x", "Weights": {"Passing": 0}}', "Invalid Weights: Passing must be greater than 0"),
        (b'{"Name": "x", "Checks": [{}]}', "Invalid check: TTL must be > 0 for TTL checks"),
        (
            b'{"Name": "x", "Check": {"GRPC": "127.0.0.1:1"}}',
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ),
        (
            b'{"Name": "x", "Check": {"TTL": "1s", "Interval": "1s"}}',
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            b'{"Name": "x", "Check": {"TTL": "1s", "Status": "fine"}}',
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
    ],
)
async def test_register_validation(http: aiohttp.ClientSession, body: bytes, reason: str) -> None:
    assert await call(http, "PUT", "/v1/agent/service/register", data=body) == (400, reason)


async def test_unknown_service_and_check_ids(http: aiohttp.ClientSession, prefix: str) -> None:
    assert await call(http, "PUT", f"/v1/agent/service/deregister/{prefix}") == (
        404,
        f'Unknown service ID "{prefix}". Ensure that the service ID is passed, not the service name.',
    )
    for verb in ("pass", "warn", "fail"):
        assert await call(http, "PUT", f"/v1/agent/check/{verb}/{prefix}") == (
            404,
            f'Unknown check ID "{prefix}". Ensure that the check ID is passed, not the check name.',
        )
    assert await call(http, "GET", f"/v1/agent/service/{prefix}") == (404, f"unknown service ID: {prefix}")


async def test_check_update_errors(http: aiohttp.ClientSession, consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))

    assert await call(http, "PUT", f"/v1/agent/check/update/service:{prefix}", json={"Status": "fine"}) == (
        400,
        "Invalid check status: 'fine'",
    )
    assert await call(http, "PUT", f"/v1/agent/check/update/service:{prefix}", json={"Sttus": "passing"}) == (
        400,
        'Request decode failed: json: unknown field "Sttus"',
    )


async def test_only_ttl_checks_take_updates(http: aiohttp.ClientSession, consul: Consul, prefix: str) -> None:
    await consul.agent.service.register(prefix, check=Check.grpc("127.0.0.1:1", "30s"))

    assert await call(http, "PUT", f"/v1/agent/check/pass/service:{prefix}") == (
        500,
        f'CheckID "service:{prefix}" does not have associated TTL',
    )


async def test_blocking_parameters(http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", "/v1/health/service/x", params={"wait": "soon"}) == (
        400,
        "Invalid wait time",
    )
    assert await call(http, "GET", "/v1/catalog/services", params={"index": "-1"}) == (400, "Invalid index")


async def test_kv_errors(http: aiohttp.ClientSession, prefix: str) -> None:
    assert await call(http, "GET", "/v1/kv/") == (400, "Missing key name")
    assert await call(http, "PUT", f"/v1/kv/{prefix}/k", params={"cas": "0", "acquire": "x"}) == (
        400,
        "Conflicting flags: acquire=x&cas=0\n",
    )
    unknown = str(uuid.uuid4())
    assert await call(http, "PUT", f"/v1/kv/{prefix}/k", params={"acquire": unknown}) == (
        500,
        f'raft apply failed: invalid session "{unknown}"',
    )


async def test_session_errors(http: aiohttp.ClientSession, consul: Consul) -> None:
    minimum = (await consul.agent.self())["DebugConfig"]["SessionTTLMin"]
    unknown = str(uuid.uuid4())

    assert await call(http, "PUT", f"/v1/session/renew/{unknown}") == (
        404,
        f"Session id '{unknown}' not found",
    )
    assert await call(http, "PUT", "/v1/session/create", json={"TTL": "86401s"}) == (
        500,
        f"Invalid Session TTL '86401000000000', must be between [{minimum}=24h0m0s]",
    )
    assert await call(http, "PUT", "/v1/session/create", json={"Behavior": "keep"}) == (
        500,
        "Invalid Behavior setting 'keep'",
    )
