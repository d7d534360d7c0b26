"""Request bodies as Consul's Go decoders read them: syntax errors, nesting, numbers, strings,
``null`` elements, and the size limits (only KV's, by Content-Length; none elsewhere).

Consul answers a body its decoder refuses with ``400 Request decode failed: <Go's error>`` on
every JSON endpoint (``agent/agent_endpoint.go``, ``agent/session_endpoint.go``); the errors are
those of ``encoding/json``'s scanner (``scanner.go``, at most 10000 levels) and decoder.
"""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yarl

from epoxi.registry.client import Consul
from tests.devmesh.registry.support import call

pytestmark = pytest.mark.consul

DECODE = "Request decode failed: "
JSON_ENDPOINTS = [
    "/v1/agent/service/register",
    "/v1/agent/check/register",
    "/v1/agent/check/update/none",
    "/v1/session/create",
]


def _deep(depth: int) -> bytes:
    return b'{"Name": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b" \n\t", "EOF"),
        (b'{"Name": "x"', "unexpected EOF"),
        (b'{"Name": "x",}', "invalid character '}' looking for beginning of object key string"),
        (b'{"Name" "x"}', "invalid character '\"' after object key"),
        (b'{"Name": "x" "y"}', "invalid character '\"' after object key:value pair"),
        (b'{"Tags": [1 2]}', "invalid character '2' after array element"),
        (b'{"Name": "a\x01"}', "invalid character '\\x01' in string literal"),
        (b'{"Name": "a\\q"}', "invalid character 'q' in string escape code"),
        (b'{"Name": "\\u12x4"}', "invalid character 'x' in \\u hexadecimal character escape"),
        (b'{"Port": -}', "invalid character '}' in numeric literal"),
        (b'{"Port": 1.}', "invalid character '}' after decimal point in numeric literal"),
        (b'{"Port": 1e+}', "invalid character '}' in exponent of numeric literal"),
        (b'{"Name": tru}', "invalid character '}' in literal true (expecting 'e')"),
        (b"\xc3\xa9", "invalid character '\u00c3' looking for beginning of value"),
        (b"\x7f", "invalid character '\\x7f' looking for beginning of value"),
        (b"'x'", "invalid character '\\'' looking for beginning of value"),
        (_deep(10_001), "invalid character '[' exceeded max depth"),
        (b"[" * 200_000, "invalid character '[' exceeded max depth"),
    ],
)
async def test_syntax_errors_are_go_scanner_errors(
    http: aiohttp.ClientSession, path: str, body: bytes, error: str
) -> None:
    assert await call(http, "PUT", path, data=body) == (400, DECODE + error)


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_nesting_within_the_limit_is_decoded(http: aiohttp.ClientSession, path: str) -> None:
    """5000 levels scan; the decoder then finds an array where a string goes."""
    field = "Status" if path.startswith("/v1/agent/check/update") else "Name"
    body = b'{"' + field.encode() + b'": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, text = await call(http, "PUT", path, data=body)
    assert status == 400
    assert text.startswith(DECODE + "json: cannot unmarshal array into Go ")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"Name": "x", "Port": 1.5}', "number 1.5"),
        (b'{"Name": "x", "Port": 1e3}', "number 1e3"),
        (b'{"Name": "x", "Port": 1.0}', "number 1.0"),
        (b'{"Name": "x", "Port": 9223372036854775808}', "number 9223372036854775808"),
        (b'{"Name": "x", "Port": ' + b"9" * 5000 + b"}", "number " + "9" * 5000),
        (b'{"Name": "x", "Port": "80"}', "string"),
    ],
)
async def test_integer_fields_take_integer_literals_in_range(
    http: aiohttp.ClientSession, body: bytes, error: str
) -> None:
    assert await call(http, "PUT", "/v1/agent/service/register", data=body) == (
        400,
        f"{DECODE}json: cannot unmarshal {error} into Go struct field ServiceDefinition.Port of type int",
    )


async def test_trailing_data_after_the_value_is_ignored(
    http: aiohttp.ClientSession, consul: Consul, prefix: str
) -> None:
    body = json.dumps({"Name": prefix}).encode() + b" and then } garbage"
    assert await call(http, "PUT", "/v1/agent/service/register", data=body) == (200, "")
    assert prefix in await consul.agent.services()


async def test_strings_decode_as_go_does(http: aiohttp.ClientSession, prefix: str) -> None:
    """Invalid UTF-8 and unpaired surrogate escapes become U+FFFD (one per byte), pairs decode."""
    body = (
        b'{"Name": "'
        + prefix.encode()
        + b'", "Tags": ["a\xff\xfeb", "\\ud800", "\\udc00\\ud83d", "\\ud83d\\ude00"]}'
    )
    assert await call(http, "PUT", "/v1/agent/service/register", data=body) == (200, "")
    async with http.get(f"/v1/agent/service/{prefix}") as response:
        assert response.status == 200
        service = await response.json()
    assert service["Tags"] == ["a\ufffd\ufffdb", "\ufffd", "\ufffd\ufffd", "\U0001f600"]
    async with http.get(f"/v1/health/service/{prefix}") as response:
        assert response.status == 200  # every stored string renders


async def test_null_elements_are_zero_values(http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"Name": prefix, "Tags": [None, "a"], "Meta": {"k": None}, "TaggedAddresses": {"lan": None}}
    assert await call(http, "PUT", "/v1/agent/service/register", json=body) == (200, "")
    async with http.get(f"/v1/agent/service/{prefix}") as response:
        service = await response.json()
    assert (service["Tags"], service["Meta"]) == (["", "a"], {"k": ""})
    assert "lan" in service["TaggedAddresses"]
    async with http.get(f"/v1/health/service/{prefix}", params={"tag": "a"}) as response:
        assert response.status == 200
        assert len(await response.json()) == 1


async def test_a_duration_that_overflows_is_invalid(http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"Name": prefix, "TTL": "9999999999999h"}
    assert await call(http, "PUT", "/v1/agent/check/register", json=body) == (
        400,
        DECODE + 'time: invalid duration "9999999999999h"',
    )


async def test_session_lock_delay_out_of_float64_range_is_refused(http: aiohttp.ClientSession) -> None:
    status, text = await call(http, "PUT", "/v1/session/create", data=b'{"LockDelay": 1e400}')
    assert status == 400
    assert text.startswith(DECODE + "json: cannot unmarshal number 1e400 into Go ")


async def test_a_session_ttl_that_overflows_is_invalid(http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"Name": prefix, "TTL": "9999999999999h"}
    assert await call(http, "PUT", "/v1/session/create", json=body) == (
        500,
        "Session TTL '9999999999999h' invalid: time: invalid duration \"9999999999999h\"",
    )


# --- sizes ------------------------------------------------------------------------------------

KV_LIMIT = 512 * 1024  # kv_max_value_size's default (raft.SuggestedMaxDataSize)


async def test_a_large_service_registration_is_read_whole(
    http: aiohttp.ClientSession, consul: Consul, prefix: str
) -> None:
    """Consul puts no limit on other bodies: 3 MiB of JSON (mostly spaces) registers."""
    body = json.dumps({"Name": prefix}).encode()
    padded = body[:-1] + b" " * (3 * 1024 * 1024) + b"}"
    assert await call(http, "PUT", "/v1/agent/service/register", data=io.BytesIO(padded)) == (200, "")
    assert prefix in await consul.agent.services()


async def test_a_kv_value_over_the_limit_is_413(http: aiohttp.ClientSession, prefix: str) -> None:
    size = KV_LIMIT + 1
    assert await call(http, "PUT", f"/v1/kv/{prefix}/big", data=io.BytesIO(b"x" * size)) == (
        413,
        f"Request body({size} bytes) too large, max size: {KV_LIMIT} bytes. "
        "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
    )
    assert await call(http, "PUT", f"/v1/kv/{prefix}/big", data=io.BytesIO(b"x" * KV_LIMIT)) == (
        200,
        "true\n",
    )


async def test_a_chunked_kv_value_is_not_measured(http: aiohttp.ClientSession, prefix: str) -> None:
    """The limit reads Content-Length, which a chunked request has none of (Go: -1)."""
    size = 3 * 512 * 1024

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (512 * 1024)

    assert await call(http, "PUT", f"/v1/kv/{prefix}/chunked", data=chunks()) == (200, "true\n")
    async with http.get(f"/v1/kv/{prefix}/chunked", params={"raw": ""}) as response:
        assert len(await response.read()) == size


async def test_long_keys_fit_in_the_request_line(http: aiohttp.ClientSession, prefix: str) -> None:
    """Go reads request lines up to 1 MiB (http.DefaultMaxHeaderBytes), not 8 KiB."""
    key = f"{prefix}/" + "k" * 20_000
    assert await call(http, "PUT", f"/v1/kv/{key}", data=b"v") == (200, "true\n")
    assert await call(http, "GET", f"/v1/kv/{key}", params={"raw": ""}) == (200, "v")


async def test_keys_may_hold_any_character(http: aiohttp.ClientSession, prefix: str) -> None:
    key = f"{prefix}/a\nb\tc?d#e%f é"
    path = yarl.URL("/v1/kv/" + urllib.parse.quote(key, safe="/"), encoded=True)
    async with http.put(path, data=b"v") as response:
        assert (response.status, await response.text()) == (200, "true\n")
    async with http.get(path) as response:
        assert response.status == 200
        assert [e["Key"] for e in await response.json()] == [key]
