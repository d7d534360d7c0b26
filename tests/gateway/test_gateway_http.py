"""HTTP requests to the gateway in front of a real grpc.aio server (the echo service)."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest

from gateway.app import Backend, start_gateway
from gateway.upstream import StaticUpstream
from tests.gateway.support import echo_service


async def _json(resp: aiohttp.ClientResponse) -> Any:
    assert resp.content_type == "application/json"
    return await resp.json()


async def test_get_with_path_binding_prints_zero_values(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/things/abc") as resp:
        assert resp.status == 200
        body = await _json(resp)
    assert body["method"] == "GetThing"
    assert body["count"] == 0
    assert body["request"]["name"] == "abc"
    assert body["request"]["pageSize"] == 0
    assert body["request"]["verbose"] is False
    assert body["request"]["tags"] == []


async def test_literal_route_wins_over_variable(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/things/special") as resp:
        assert (await _json(resp))["method"] == "GetSpecial"


async def test_query_parameters_reach_the_service(http: aiohttp.ClientSession) -> None:
    params = [
        ("tags", "a"),
        ("tags", "b"),
        ("pageSize", "5"),
        ("kind", "KIND_BOOK"),
        ("shelf.displayName", "Top"),
    ]
    async with http.get("/v1/shelves/s%201/things", params=params) as resp:
        assert resp.status == 200
        request = (await _json(resp))["request"]
    assert request["shelf"] == {"id": "s 1", "displayName": "Top"}
    assert request["tags"] == ["a", "b"]
    assert request["pageSize"] == 5
    assert request["kind"] == "KIND_BOOK"


@pytest.mark.parametrize(
    ("method", "path", "body", "rpc", "expect"),
    [
        ("POST", "/v1/things", {"name": "n", "thing": {"size": 3}}, "CreateThing", {"name": "n"}),
        ("PATCH", "/v1/things/abc", {"size": 2}, "UpdateThing", {"thing": {"name": "things/abc", "size": 2}}),
        ("PUT", "/v1/things/abc", {"size": 1}, "ReplaceThing", {"name": "abc", "thing": {"size": 1}}),
        ("DELETE", "/v1/things/abc", None, "DeleteThing", {"name": "abc"}),
        ("POST", "/v1/things/abc:archive", {}, "ArchiveThing", {"name": "abc"}),
        ("GET", "/v1/files/a/b/c.txt", None, "GetFile", {"path": "a/b/c.txt"}),
        ("GET", "/v1/items/abc", None, "GetThing", {"name": "abc"}),
    ],
)
async def test_methods_and_bodies(
    http: aiohttp.ClientSession, method: str, path: str, body: Any, rpc: str, expect: dict[str, Any]
) -> None:
    async with http.request(method, path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await _json(resp)
    assert answer["method"] == rpc
    for key, value in expect.items():
        got = answer["request"][key]
        assert (got | value == got) if isinstance(value, dict) else got == value


async def test_response_body_selects_one_field(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/tags", params={"tags": "x"}) as resp:
        body = await _json(resp)
    assert body["tags"] == ["x"]
    assert "method" not in body


async def test_headers_are_forwarded_as_metadata(http: aiohttp.ClientSession, echo_server: Any) -> None:
    headers = {"Authorization": "Bearer t", "Grpc-Metadata-Tenant": "acme", "X-Other": "no"}
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 200
    md = dict(echo_server.servicer.metadata)
    assert md["authorization"] == "Bearer t"
    assert md["tenant"] == "acme"
    assert "x-other" not in md


@pytest.mark.parametrize(
    ("code", "http_status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.CANCELLED, 499),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
async def test_grpc_errors_become_status_json(
    http: aiohttp.ClientSession, code: grpc.StatusCode, http_status: int
) -> None:
    async with http.get(f"/v1/fail/{code.value[0]}", params={"name": f"failed with {code.name}"}) as resp:
        assert resp.status == http_status
        body = await _json(resp)
    assert body == {"code": code.value[0], "message": f"failed with {code.name}", "details": []}


async def test_rich_status_details_are_passed_on(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/fail/9", params={"name": "not yet", "verbose": "true"}) as resp:
        assert resp.status == 400
        body = await _json(resp)
    assert body["code"] == 9
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ECHO_FAILED",
            "domain": "epoxi.test",
            "metadata": {},
        }
    ]


async def test_unknown_path_is_404_status(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nowhere") as resp:
        assert resp.status == 404
        body = await _json(resp)
    assert body["code"] == 5
    assert "/v1/nowhere" in body["message"]


async def test_wrong_method_is_405_unimplemented(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things/abc") as resp:
        assert resp.status == 405
        body = await _json(resp)
    assert body["code"] == 12
    assert "GET" in body["message"]


async def test_bad_json_body_is_400(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things", data=b"{nope", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await _json(resp)
    assert body["code"] == 3
    assert "not valid JSON" in body["message"]


async def test_bad_query_value_is_400(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/things/abc", params={"pageSize": "lots"}) as resp:
        assert resp.status == 400
        body = await _json(resp)
    assert body["code"] == 3
    assert "pageSize" in body["message"]


async def test_unreachable_service_is_503() -> None:
    gateway = await start_gateway(
        "127.0.0.1:0", [Backend(echo_service(), StaticUpstream("127.0.0.1:1"))], rpc_timeout=5
    )
    try:
        async with (
            aiohttp.ClientSession(base_url=f"http://{gateway.address}") as http,
            http.get("/v1/things/abc") as resp,
        ):
            assert resp.status == 503
            body = await _json(resp)
    finally:
        await gateway.close()
    assert body["code"] == 14
