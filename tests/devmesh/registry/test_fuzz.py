"""Hypothesis over the dev registry's register, KV and session endpoints, over real HTTP.

Bodies are of the endpoint's shape (Consul's field names, values mostly of the right type and
sometimes of any other), random JSON, deep nesting or raw bytes; query parameters are those the
endpoints read, with odd values, and random ones. Whatever comes in:

* no request reaches the registry's catch-all for unexpected errors, nor aiohttp's (nothing is
  logged at ERROR), and a 500 is only one Consul answers too (its texts, below);
* an error is plain text (``text/plain; charset=utf-8``), a JSON answer parses, an empty one has
  no Content-Type, as Go's net/http writes them;
* a normal registration and KV round trip work right after.

Dev registry only: the examples register arbitrary services and checks.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmesh.registry.agent import CHECK_DEFINITION, CHECK_UPDATE, SERVICE_DEFINITION
from devmesh.registry.app import serve
from devmesh.registry.codec import Kind, ListOf, MapOf, Struct
from devmesh.registry.sessions import SESSION
from devmesh.registry.state import RegistryConfig
from tests.devmesh.registry.conftest import DEV_CONFIG

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# The 500s Consul answers for these endpoints (errors its RPCs and parsers return unwrapped).
CONSUL_500S = (
    "strconv.ParseUint: parsing ",
    "raft apply failed: ",
    "apply failed: ",
    "Must provide Node",
    "Invalid Behavior setting ",
    "Session TTL '",
    "Invalid Session TTL ",
    "No path to datacenter",
    "Failed to create boolean expression evaluator",
    "Scripts are disabled on this agent",
    "CheckID ",
)
TEXT = "text/plain; charset=utf-8"


@pytest.fixture
async def registry_addr() -> AsyncIterator[str]:
    """The dev registry alone (this module's override of the suite's backends)."""
    registry = await serve("127.0.0.1", 0, RegistryConfig(**DEV_CONFIG))  # type: ignore[arg-type]
    try:
        yield registry.address
    finally:
        await registry.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- values -------------------------------------------------------------------------------------

odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "\x00", "é", "\ud800", "\u2028", "x" * 600, "consul-x", "a b", "0.0.0.0", "::"]
    ),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)
any_json = st.recursive(
    json_scalar,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(odd_text, kids, max_size=3),
    max_leaves=8,
)
duration = st.one_of(
    st.sampled_from(
        ["1s", "10s", "100ms", "0", "-1s", "1h", "soon", "1e3s", "9999999999999h", "", "2562047h"]
    ),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
)
# Fields whose values matter to the registry's logic get values from its vocabulary.
SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "Status": st.sampled_from(["passing", "warning", "critical", "", "fine", "PASSING"]),
    "GRPC": st.sampled_from(["127.0.0.1:1", "127.0.0.1:1/svc", "", "[::1]:1"]),
    "Behavior": st.sampled_from(["release", "delete", "", "keep"]),
    "Node": st.sampled_from(["epoxi-dev-node", "EPOXI-DEV-NODE", "", "other"]),
    "NodeChecks": st.lists(st.sampled_from(["serfHealth", "nope", ""]), max_size=2),
    "Checks": st.one_of(st.lists(st.sampled_from(["serfHealth", "nope", ""]), max_size=2), st.just(None)),
    "Address": st.sampled_from(["", "10.0.0.1", "::1", "0.0.0.0", "[::]", "host.example", "::ffff:1.2.3.4"]),
    "ScriptArgs": st.sampled_from([[], ["true"]]),
    "Kind": st.sampled_from(["", "connect-proxy", "weird"]),
}


def value(kind: Kind, name: str = "") -> st.SearchStrategy[Any]:
    """Mostly a value of ``kind``, sometimes any JSON at all."""
    right: st.SearchStrategy[Any]
    if name in SPECIAL:
        right = SPECIAL[name]
    elif isinstance(kind, Struct):
        right = struct_value(kind)
    elif isinstance(kind, ListOf):
        right = st.lists(st.one_of(value(kind.item), st.none()), max_size=3)
    elif isinstance(kind, MapOf):
        right = st.dictionaries(odd_text, st.one_of(value(kind.value), st.none()), max_size=3)
    elif kind == "duration":
        right = duration
    elif kind == "bool":
        right = st.booleans()
    elif kind in ("int", "uint"):
        right = st.one_of(st.integers(-3, 70_000), st.integers(), st.sampled_from([1.5, 1e3, 2**64]))
    elif kind == "str":
        right = odd_text
    else:
        right = any_json
    return st.one_of(right, right, right, any_json)


@st.composite
def struct_value(draw: st.DrawFn, struct: Struct) -> dict[str, Any]:
    fields = draw(st.lists(st.sampled_from(struct.fields), max_size=6, unique=True))
    out = {}
    for name, kind in fields:
        key = draw(st.sampled_from([name, name.lower(), name.upper()]))
        out[key] = draw(value(kind, name))
    return out


def bodies(struct: Struct, name_prefix: str) -> st.SearchStrategy[bytes]:
    shaped = struct_value(struct).map(
        lambda d: d if "Name" not in d else {**d, "Name": f"{name_prefix}{d['Name']}"}
    )
    return st.one_of(
        shaped.map(lambda d: json.dumps(d).encode()),
        shaped.map(lambda d: json.dumps(d).encode()),
        any_json.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 12_000).map(lambda n: b'{"Name": ' + b"[" * n + b"]" * n + b"}"),
        st.binary(max_size=40),
        st.sampled_from([b"", b"{", b"null", b'{"Name": "x",}', b'{"Name": "\\ud800"}', b"[" * 20_000]),
        st.sampled_from([b'{"Port": ' + b"9" * 5000 + b"}", b'{"LockDelay": 1e400}', b'{"TTL": 1e400}']),
    )


QUERY_VALUES = st.one_of(
    st.sampled_from(
        ["", "0", "1", "true", "false", "abc", "-1", "18446744073709551616", "1s", "10ms", "soon"]
    ),
    st.integers(0, 2**64 + 5).map(str),
    st.text(max_size=8),
)


def query(names: list[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(
        st.tuples(st.one_of(st.sampled_from(names), st.text(max_size=5)), st.one_of(QUERY_VALUES, st.none())),
        max_size=4,
    )
    return pairs.map(
        lambda ps: "&".join(
            urllib.parse.quote(k, safe="") + ("" if v is None else "=" + urllib.parse.quote(v, safe=""))
            for k, v in ps
        )
    )


key_segment = st.text(
    st.characters(blacklist_characters="./", blacklist_categories=["Cs"]), min_size=1, max_size=8
)


# --- running and judging one request -----------------------------------------------------------


class Registry:
    def __init__(
        self, http: aiohttp.ClientSession, address: str, prefix: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        self.http = http
        self.base = f"http://{address}"
        self.prefix = prefix
        self.caplog = caplog

    async def request(
        self, method: str, path: str, query: str = "", body: bytes = b""
    ) -> tuple[int, str | None, bytes]:
        url = yarl.URL(f"{self.base}{path}?{query}" if query else f"{self.base}{path}", encoded=True)
        async with self.http.request(method, url, data=body) as response:
            return response.status, response.headers.get("Content-Type"), await response.read()

    async def check(self, method: str, path: str, query: str = "", body: bytes = b"") -> None:
        self.caplog.clear()  # each request is judged by what it logs itself
        status, content_type, data = await self.request(method, path, query, body)
        seen = (method, path, query, body[:200], status, data[:300])
        text = data.decode("utf-8", "replace")
        if status == 500:
            assert text.startswith(CONSUL_500S), seen
        if not data:
            # Consul sets text/plain on every ?raw value, an empty one too (kvs_endpoint.go).
            raw_value = method == "GET" and status == 200 and "raw" in urllib.parse.parse_qs(query, True)
            assert content_type == ("text/plain" if raw_value else None), seen
        elif status >= 400:
            assert content_type == TEXT, seen
        elif content_type == "application/json":
            json.loads(data)
        else:
            assert (path.startswith("/v1/kv/") and "raw" in query, content_type) == (True, "text/plain"), seen
        errors = [r for r in self.caplog.records if r.levelno >= logging.ERROR]
        assert not errors, (seen, [r.getMessage() for r in errors])
        await self.still_serves()

    async def still_serves(self) -> None:
        name = f"{self.prefix}-probe"
        register = json.dumps({"Name": name, "Port": 1, "Check": {"TTL": "60s"}}).encode()
        assert (await self.request("PUT", "/v1/agent/service/register", body=register))[0] == 200
        status, _, data = await self.request("GET", f"/v1/agent/service/{name}")
        assert (status, json.loads(data)["Port"]) == (200, 1)
        assert (await self.request("PUT", f"/v1/kv/{self.prefix}/probe", body=b"v"))[:1] == (200,)
        assert await self.request("GET", f"/v1/kv/{self.prefix}/probe", "raw") == (200, "text/plain", b"v")


@pytest.fixture
def registry(
    client: aiohttp.ClientSession, registry_addr: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> Registry:
    caplog.set_level(logging.ERROR)
    return Registry(client, registry_addr, prefix, caplog)


# --- the endpoints ------------------------------------------------------------------------------

REGISTER_PARAMS = ["replace-existing-checks", "token", "dc"]


@FUZZ
@given(data=st.data())
async def test_register_endpoints_never_fail_unexpectedly(registry: Registry, data: st.DataObject) -> None:
    path, struct = data.draw(
        st.sampled_from(
            [
                ("/v1/agent/service/register", SERVICE_DEFINITION),
                ("/v1/agent/check/register", CHECK_DEFINITION),
                (f"/v1/agent/check/update/service:{registry.prefix}-probe", CHECK_UPDATE),
                (f"/v1/agent/check/update/{registry.prefix}", CHECK_UPDATE),
            ]
        )
    )
    body = data.draw(bodies(struct, registry.prefix))
    await registry.check("PUT", path, data.draw(query(REGISTER_PARAMS)), body)
    verb = data.draw(st.sampled_from(["pass", "warn", "fail"]))
    check_id = data.draw(st.sampled_from([f"service:{registry.prefix}-probe", registry.prefix, ""]))
    await registry.check("PUT", f"/v1/agent/check/{verb}/{check_id}", data.draw(query(["note"])))


KV_PARAMS = [
    "flags",
    "cas",
    "acquire",
    "release",
    "recurse",
    "keys",
    "separator",
    "raw",
    "index",
    "wait",
    "dc",
    "stale",
    "consistent",
]


@FUZZ
@given(data=st.data())
async def test_kv_never_fails_unexpectedly(registry: Registry, data: st.DataObject) -> None:
    segments = data.draw(st.lists(key_segment, max_size=3))
    key = "/".join([registry.prefix, *segments]) if data.draw(st.integers(0, 9)) else ""
    path = "/v1/kv/" + urllib.parse.quote(key, safe="/")
    method = data.draw(st.sampled_from(["GET", "PUT", "DELETE"]))
    params = data.draw(query(KV_PARAMS))
    if data.draw(st.booleans()):  # a real session, so that acquire and release can succeed
        status, _, created = await registry.request("PUT", "/v1/session/create", body=b'{"LockDelay": 0}')
        assert status == 200
        session = json.loads(created)["ID"]
        params += ("&" if params else "") + data.draw(st.sampled_from(["acquire", "release"])) + "=" + session
    body = data.draw(
        st.one_of(st.binary(max_size=64), st.just(b"x" * (512 * 1024 + 1)))
        if method == "PUT"
        else st.just(b"")
    )
    if "index" in params:
        params = "wait=1ms&" + params  # the first ?wait counts: a blocking GET returns at once
    await registry.check(method, path, params, body)


SESSION_PARAMS = ["dc", "index", "wait", "stale", "consistent", "token"]


@FUZZ
@given(data=st.data())
async def test_sessions_never_fail_unexpectedly(registry: Registry, data: st.DataObject) -> None:
    body = data.draw(bodies(SESSION, registry.prefix))
    await registry.check("PUT", "/v1/session/create", data.draw(query(SESSION_PARAMS)), body)
    session_id = data.draw(
        st.one_of(
            st.sampled_from(["", "x", "not-a-uuid"]),
            st.uuids().map(str),
            st.just(str(uuid.uuid4())),
            key_segment,
        )
    )
    quoted = urllib.parse.quote(session_id, safe="")
    method, path = data.draw(
        st.sampled_from(
            [
                ("PUT", f"/v1/session/destroy/{quoted}"),
                ("PUT", f"/v1/session/renew/{quoted}"),
                ("GET", f"/v1/session/info/{quoted}"),
                ("GET", "/v1/session/list"),
                ("GET", f"/v1/session/node/{quoted}"),
            ]
        )
    )
    params = data.draw(query(SESSION_PARAMS))
    if "index" in params:
        params = "wait=1ms&" + params
    await registry.check(method, path, params)
