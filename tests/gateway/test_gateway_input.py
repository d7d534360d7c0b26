"""Client input the gateway refuses itself: each gets a 4xx with a ``google.rpc.Status`` body
(never a 500), and the gateway keeps serving. Real HTTP to a real gateway and echo server."""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from epoxi import settings
from gateway.app import MAX_REQUEST_BYTES, Backend, start_gateway
from gateway.body import MAX_DEPTH
from gateway.main import GatewayConfig
from gateway.upstream import StaticUpstream
from tests.gateway.support import EchoServer, echo_service

SMALL_LIMIT = 1024


@pytest.fixture
async def small(echo_server: EchoServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A gateway that accepts bodies up to ``SMALL_LIMIT`` bytes."""
    gateway = await start_gateway(
        "127.0.0.1:0",
        [Backend(echo_service(), StaticUpstream(echo_server.address))],
        max_request_bytes=SMALL_LIMIT,
    )
    try:
        async with aiohttp.ClientSession(base_url=f"http://{gateway.address}") as session:
            yield session
    finally:
        await gateway.close()


async def _status(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    assert set(body) == {"code", "message", "details"}
    return body


async def _post(http: aiohttp.ClientSession, data: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.post("/v1/things", data=data, **kwargs) as resp:
        return resp.status, await resp.json()


async def _still_serves(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things", json={"name": "ok"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["request"]["name"] == "ok"


def _json_of_size(size: int) -> bytes:
    prefix, suffix = b'{"name": "', b'"}'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


# --- size ---------------------------------------------------------------------------------------


async def test_a_body_over_the_default_limit_is_413_resource_exhausted(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things", data=io.BytesIO(_json_of_size(MAX_REQUEST_BYTES + 1))) as resp:
        assert resp.status == 413
        body = await _status(resp)
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert body["message"] == (
        f"the request body of {MAX_REQUEST_BYTES + 1} bytes is larger than the gateway accepts: "
        "34 MiB (max_request_bytes)"
    )
    await _still_serves(http)


async def test_a_body_at_the_limit_is_accepted(small: aiohttp.ClientSession) -> None:
    status, body = await _post(small, _json_of_size(SMALL_LIMIT))
    assert status == 200
    assert len(body["request"]["name"]) == SMALL_LIMIT - len(b'{"name": ""}')


async def test_a_chunked_body_over_the_limit_is_413(small: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        data = _json_of_size(SMALL_LIMIT * 4)
        for start in range(0, len(data), 256):
            yield data[start : start + 256]

    status, body = await _post(small, chunks())  # no Content-Length: the limit applies while reading
    assert (status, body["code"]) == (413, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert body["message"] == "the request body is larger than the gateway accepts: 1 KiB (max_request_bytes)"
    await _still_serves(small)


async def test_the_limit_applies_to_a_decompressed_body(small: aiohttp.ClientSession) -> None:
    packed = gzip.compress(_json_of_size(SMALL_LIMIT * 100))
    assert len(packed) < SMALL_LIMIT
    status, body = await _post(small, packed, headers={"Content-Encoding": "gzip"})
    assert (status, body["code"]) == (413, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


async def test_a_broken_content_encoding_is_400(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things", data=b"not gzip", headers={"Content-Encoding": "gzip"}) as resp:
        assert (resp.status, resp.headers["Connection"]) == (400, "close")
        body = await _status(resp)
    assert body["code"] == 3
    assert "Content-Encoding" in body["message"]
    await _still_serves(http)


def test_the_limit_is_one_setting_with_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.parse(GatewayConfig, []).max_request_bytes == MAX_REQUEST_BYTES == 34 * 1024 * 1024
    assert settings.parse(GatewayConfig, ["--max-request-bytes", "2MiB"]).max_request_bytes == 2 * 1024 * 1024
    monkeypatch.setenv("EPOXI_GATEWAY_MAX_REQUEST_BYTES", "64KiB")
    assert settings.parse(GatewayConfig, []).max_request_bytes == 64 * 1024


# --- JSON ---------------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    """``{"tags": [[...]]}``: ``depth`` levels of arrays and objects in all."""
    return b'{"tags": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 100_000])
async def test_json_nested_past_the_limit_is_400(http: aiohttp.ClientSession, depth: int) -> None:
    status, body = await _post(http, _nested(depth))
    assert (status, body["code"]) == (400, 3)
    assert body["message"] == "request body nests deeper than 100 levels"
    await _still_serves(http)


async def test_json_at_the_depth_limit_is_judged_by_the_message(http: aiohttp.ClientSession) -> None:
    status, body = await _post(http, _nested(MAX_DEPTH))
    assert (status, body["code"]) == (400, 3)
    assert body["message"].startswith("request body does not fit epoxi.gatewaytest.v1.EchoRequest")


async def test_brackets_inside_strings_do_not_count_as_nesting(http: aiohttp.ClientSession) -> None:
    name = "[{" * 1000 + '\\"' + "]}" * 1000
    status, body = await _post(http, b'{"name": "' + name.encode() + b'"}')
    assert status == 200
    assert body["request"]["name"] == name.replace('\\"', '"')


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{nope", "request body is not valid JSON: Expecting property name enclosed in double quotes"),
        (b'{"name": "\xff"}', "request body is not valid JSON: not UTF-8 (invalid start byte at byte 10)"),
        (b'{"name": "a", "name": "b"}', "request body repeats the key 'name'"),
        (b'{"labels": {"k": "a", "k": "b"}}', "request body repeats the key 'k'"),
        (b"NaN", 'request body is not valid JSON: NaN is not a JSON value (quote it: "NaN")'),
        (b'{"ratio": -Infinity}', 'is not a JSON value (quote it: "-Infinity")'),
        (b"[1]", "request body must be a JSON object (epoxi.gatewaytest.v1.EchoRequest), not an array"),
        (b'"x"', "request body must be a JSON object (epoxi.gatewaytest.v1.EchoRequest), not a string"),
        (b"null", "request body must be a JSON object (epoxi.gatewaytest.v1.EchoRequest), not null"),
        (b'{"pageSize": ' + b"9" * 5000 + b"}", "Failed to parse pageSize field"),
        (b'{"ratio": ' + b"9" * 5000 + b"}", "Failed to parse ratio field"),
        (b'{"thing": 7}', "Failed to parse thing field"),
        (b'{"since": "yesterday"}', "Failed to parse since field"),
        (b'{"name": "\\ud800"}', "Unpaired surrogate"),
    ],
)
async def test_malformed_json_is_400_with_the_reason(
    http: aiohttp.ClientSession, data: bytes, message: str
) -> None:
    status, body = await _post(http, data)
    assert (status, body["code"]) == (400, 3)
    assert message in body["message"]


async def test_a_field_body_that_is_not_an_object_is_400(http: aiohttp.ClientSession) -> None:
    async with http.patch("/v1/things/abc", data=b"[1, 2]") as resp:
        assert resp.status == 400
        body = await _status(resp)
    assert (
        body["message"]
        == "request body must be a JSON object (thing: epoxi.gatewaytest.v1.Thing), not an array"
    )


async def test_a_route_without_body_ignores_even_a_large_one(small: aiohttp.ClientSession) -> None:
    async with small.delete("/v1/things/abc", data=b"{" * (SMALL_LIMIT * 8)) as resp:
        assert resp.status == 200


# --- path, query, headers, methods --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/v1/things/%ff", "the path /v1/things/%FF is not UTF-8 once percent-decoded"),
        ("/v1/things/a?tags=%c3", "the query string is not UTF-8 once percent-decoded"),
        ("/v1/things/a?%ff=1", "the query string is not UTF-8 once percent-decoded"),
    ],
)
async def test_percent_escapes_that_are_not_utf8_are_400(
    http: aiohttp.ClientSession, url: str, message: str
) -> None:
    async with http.get(url) as resp:
        assert resp.status == 400
        body = await _status(resp)
    assert (body["code"], body["message"]) == (3, message)


@pytest.mark.parametrize("url", ["/%0A", "/v1/things/a%0Ab/c", "/v1/files/%0A"])
async def test_a_newline_in_the_path_reaches_the_gateway(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url) as resp:
        status = resp.status
        body = await (_status(resp) if status != 200 else resp.json())
    if url.startswith("/v1/files/"):
        assert (status, body["request"]["path"]) == (200, "\n")
    else:
        assert (status, body["code"]) == (404, 5)


async def test_query_values_are_decoded_and_repeated(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/things/a?tags=caf%C3%A9&tags=a+b&tags=&pageSize=3") as resp:
        assert resp.status == 200
        request = (await resp.json())["request"]
    assert (request["tags"], request["pageSize"]) == (["café", "a b", ""], 3)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"Grpc-Metadata-Who": "jörg"},
            "header Grpc-Metadata-Who: a gRPC metadata value must be printable ASCII",
        ),
        (
            {"Authorization": "Bearer é"},
            "header Authorization: a gRPC metadata value must be printable ASCII",
        ),
        (
            {"Grpc-Metadata-a%b": "1"},
            "header Grpc-Metadata-a%b: 'a%b' is not a gRPC metadata key (0-9, a-z, '-', '_', '.')",
        ),
        (
            {"Grpc-Metadata-Blob-Bin": "!!"},
            "header Grpc-Metadata-Blob-Bin: the value of a -bin key must be base64",
        ),
        (
            {"Grpc-Metadata--bin": "AA"},
            "header Grpc-Metadata--bin: '-bin' is not a gRPC metadata key (0-9, a-z, '-', '_', '.')",
        ),
    ],
)
async def test_headers_that_cannot_be_grpc_metadata_are_400(
    http: aiohttp.ClientSession, headers: dict[str, str], message: str
) -> None:
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 400
        body = await _status(resp)
    assert (body["code"], body["message"]) == (3, message)
    await _still_serves(http)


async def test_binary_metadata_is_base64_decoded(
    http: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    headers = {"Grpc-Metadata-Blob-Bin": "AAEC/w", "Grpc-Metadata-Padded-Bin": "aGk="}
    async with http.get("/v1/things/abc", headers=headers) as resp:
        assert resp.status == 200
    metadata = dict(echo_server.servicer.metadata)
    assert (metadata["blob-bin"], metadata["padded-bin"]) == (b"\x00\x01\x02\xff", b"hi")


async def test_405_names_the_allowed_methods(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/things/abc") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "DELETE, GET, PATCH, PUT"
        body = await _status(resp)
    assert body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


# --- the gateway's own bugs ---------------------------------------------------------------------


class BrokenUpstream:
    async def channel(self) -> grpc.aio.Channel:
        raise RuntimeError("a bug in the upstream choice")

    def unavailable(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_an_unexpected_error_is_500_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    gateway = await start_gateway("127.0.0.1:0", [Backend(echo_service(), BrokenUpstream())])
    try:
        async with (
            aiohttp.ClientSession(base_url=f"http://{gateway.address}") as http,
            http.get("/v1/things/abc") as resp,
        ):
            assert resp.status == 500
            body = await _status(resp)
    finally:
        await gateway.close()
    assert (body["code"], body["message"]) == (grpc.StatusCode.INTERNAL.value[0], "internal gateway error")
    failures = [r for r in caplog.records if r.name == "gateway.app" and r.levelno == logging.ERROR]
    assert [r.exc_info[1] for r in failures if r.exc_info] and "a bug in the upstream choice" in caplog.text
