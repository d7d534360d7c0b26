"""google.api.HttpBody bodies: the raw bytes and the Content-Type reach the service as they came,
and a media type the route does not take is 415 naming what it takes."""

from __future__ import annotations

import base64

import aiohttp
import grpc

from tests.gateway.support import EchoServer

CSV = b"a,b\r\n1,\xff\x00\r\n"  # any bytes: not JSON, not even UTF-8


async def test_the_raw_body_and_its_content_type_become_the_http_body(
    http: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    headers = {"Content-Type": "text/csv; charset=latin-1"}
    async with http.post("/v1/uploads/f1", data=CSV, headers=headers, params={"tags": "x"}) as resp:
        assert resp.status == 200, await resp.text()
        request = await resp.json()  # response_body: "request"
    assert request["name"] == "f1"
    assert request["tags"] == ["x"]  # the fields the body does not bind come from the query
    assert request["raw"]["contentType"] == "text/csv; charset=latin-1"
    assert base64.b64decode(request["raw"]["data"]) == CSV


async def test_media_types_match_without_case_or_parameters(http: aiohttp.ClientSession) -> None:
    for content_type in ["TEXT/CSV", "application/x-ndjson;q=1"]:
        async with http.post("/v1/uploads/f1", data=b"{}", headers={"Content-Type": content_type}) as resp:
            assert resp.status == 200, (content_type, await resp.text())


async def test_another_media_type_is_415_with_accept(http: aiohttp.ClientSession) -> None:
    for headers in ({"Content-Type": "application/json"}, {}):
        async with http.post(
            "/v1/uploads/f1", data=b"{}", headers=headers, skip_auto_headers=["Content-Type"]
        ) as resp:
            assert resp.status == 415
            assert resp.headers["Accept"] == "text/csv, application/x-ndjson"
            body = await resp.json()
        assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert body["message"].startswith(
            "POST /v1/uploads/f1 takes a body of type text/csv, application/x-ndjson"
        )
        assert body["details"] == []
        assert body["message"].endswith(
            "the request has Content-Type application/json" if headers else "the request has no Content-Type"
        )


async def test_an_http_body_without_declared_media_types_takes_any(http: aiohttp.ClientSession) -> None:
    async with http.put("/v1/uploads/f2", data=b"\x00\x01", headers={"Content-Type": "image/png"}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["request"]["blob"] == {"contentType": "image/png", "data": "AAE=", "extensions": []}
    async with http.put("/v1/uploads/f2", data=b"", skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 200
        answer = await resp.json()
    # No body and no Content-Type: an empty HttpBody.
    assert answer["request"]["blob"] == {"contentType": "", "data": "", "extensions": []}
