"""Hypothesis over the gateway's routes, over real HTTP: random methods, paths built from the
route templates (with odd segments and escapes) or from nothing, query parameters named after
the request's fields or not, bodies of the request's shape with values of every type, random
JSON, deep nesting and raw bytes, and ``Grpc-Metadata-`` headers.

Whatever comes in, the gateway answers below 500, every error is a ``google.rpc.Status`` whose
code maps to the HTTP status, and a normal request works right after. Two gateways: one in front
of the echo service (every kind of binding) and one with the real routes (monitor and router) in
front of a stub that answers every method with an empty response.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import yarl
from google.protobuf import descriptor, message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import status_page
from gateway.app import Backend, Gateway, start_gateway
from gateway.errors import HTTP_STATUS
from gateway.main import MEDIA_TYPES, SERVICES
from gateway.routes import Kind, Route, RouteTable
from gateway.upstream import StaticUpstream
from tests.gateway.support import echo_service

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# The gateway's own answers besides those of the gRPC code table.
OWN_STATUS = {
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
}
ODD_TEXT = ["", " ", "%", "%zz", "%ff", "%c3", "/", "..", ".", "{x}", ":verb", "é", "\u2028", "a" * 300, "\\"]


def _field_names(message_type: descriptor.Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    names: list[str] = []
    for field in message_type.fields:
        for name in {field.name, field.json_name}:
            names.append(prefix + name)
            if field.message_type is not None and depth < 2:
                names += _field_names(field.message_type, f"{prefix}{name}.", depth + 1)
    return names


class Target:
    """A gateway, its routes and the names their requests' fields go by."""

    def __init__(
        self, gateway: Gateway, services: list[descriptor.ServiceDescriptor], skip: set[str]
    ) -> None:
        self.url = f"http://{gateway.address}"
        self.routes = [r for r in RouteTable.from_services(services).routes if r.method.name not in skip]
        self.names = sorted({n for r in self.routes for n in _field_names(r.method.input_type)})


def _segment() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=12).map(lambda t: urllib.parse.quote(t, safe="")),
        st.sampled_from(ODD_TEXT).map(lambda t: urllib.parse.quote(t, safe="%")),
        st.sampled_from(["abc", "gmail.com_10_0_0_1", "123", "-1", "true", "99999999999999999999"]),
    )


@st.composite
def _path(draw: st.DrawFn, routes: list[Route]) -> str:
    if draw(st.integers(0, 9)) == 0:
        return "/" + "/".join(draw(st.lists(_segment(), max_size=5)))
    template = draw(st.sampled_from(routes)).template
    parts: list[str] = []
    for segment in template.segments:
        if segment.kind is Kind.LITERAL:
            parts.append(segment.text)
        elif segment.kind is Kind.STAR:
            parts.append(draw(_segment()))
        else:
            parts += draw(st.lists(_segment(), min_size=1, max_size=3))
    path = "/" + "/".join(parts)
    return f"{path}:{template.verb}" if template.verb else path


def _json(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=16),
        st.sampled_from(["NaN", "Infinity", "2024-01-02T03:04:05Z", "1.5s", "KIND_BOOK", "AAEC", "*"]),
    )
    return st.recursive(
        scalars,
        lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=5)),
        max_leaves=16,
    )


def _body(names: list[str]) -> st.SearchStrategy[bytes]:
    keys = st.one_of(st.sampled_from(names).map(lambda n: n.rsplit(".", 1)[-1]), st.text(max_size=8))
    shaped = st.dictionaries(keys, _json(keys), max_size=6)
    return st.one_of(
        st.just(b""),
        shaped.map(lambda d: json.dumps(d).encode()),
        _json(keys).map(lambda v: json.dumps(v).encode()),
        st.integers(1, 3000).map(lambda n: b'{"a": ' + b"[" * n + b"]" * n + b"}"),
        st.binary(max_size=40),
        st.sampled_from(
            [b"{", b"NaN", b'{"a": 1, "a": 2}', b'{"name": "\\ud800"}', b"[" * 10_000, b"1" * 5000]
        ),
    )


def _query(names: list[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(
        st.tuples(
            st.one_of(st.sampled_from(names), st.text(max_size=6)),
            st.one_of(_segment(), st.text(max_size=8).map(urllib.parse.quote_plus)),
        ),
        max_size=5,
    ).map(lambda ps: "&".join(f"{urllib.parse.quote(k, safe='')}={v}" for k, v in ps))
    return st.one_of(pairs, st.sampled_from(["", "%ff", "a=%zz", "&&", "=", "a=1;b=2", "+=+"]))


def _headers() -> st.SearchStrategy[dict[str, str]]:
    keys = st.one_of(
        st.sampled_from(["who", "trace-bin", "x.y_z", "Grpc-Timeout", "a%b", "-bin"]),
        st.text("abc-_.%:", min_size=1, max_size=6),
    )
    values = st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éü日"), max_size=12
    )
    return st.dictionaries(keys.map(lambda k: "Grpc-Metadata-" + k), values, max_size=2)


async def _request(
    http: aiohttp.ClientSession, method: str, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str, bytes]:
    async with http.request(method, yarl.URL(url, encoded=True), data=body, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.read()


async def _check(
    http: aiohttp.ClientSession, target: Target, request: tuple[str, str, str, bytes, dict[str, str]]
) -> None:
    method, path, query, body, headers = request
    url = f"{target.url}{path}?{query}" if query else f"{target.url}{path}"
    status, content_type, data = await _request(http, method, url, body, headers)
    assert status < 500, (status, data)
    # The status page and its assets (gateway.status_page) are HTML, CSS and JS; their errors are JSON.
    if not (status < 400 and _on_status_page(path)):
        assert content_type == "application/json", (status, data)
        doc = json.loads(data)
    if status >= 400:
        assert set(doc) == {"code", "message", "details"}, doc
        code = next(c for c in grpc.StatusCode if c.value[0] == doc["code"])
        assert OWN_STATUS.get(status) is code or HTTP_STATUS.get(code) == status, (status, doc)
        assert isinstance(doc["message"], str) and doc["message"]
    probe = target.routes[0]
    assert probe.http_method == "GET" and not probe.template.variables, probe
    good = await _request(http, "GET", f"{target.url}{probe.template.source}", b"", {})
    assert good[0] == 200, good


def _on_status_page(path: str) -> bool:
    decoded = urllib.parse.unquote(path)
    return decoded == status_page.PAGE_PATH or decoded.startswith(status_page.STATIC_PREFIX)


def _requests(target: Target) -> st.SearchStrategy[tuple[str, str, str, bytes, dict[str, str]]]:
    return st.tuples(
        st.sampled_from(METHODS),
        _path(target.routes),
        _query(target.names),
        _body(target.names),
        _headers(),
    )


# --- the echo service ---------------------------------------------------------------------------

ECHO_SKIP = {"Fail"}  # its code picks the upstream's error: 5xx on purpose


@pytest.fixture
async def echo_target(echo_gateway: Gateway) -> Target:
    target = Target(echo_gateway, [echo_service()], ECHO_SKIP)
    # GetTags first: a GET without variables, the normal request after each example.
    target.routes.sort(key=lambda r: r.method.name != "GetTags")
    return target


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@FUZZ
@given(data=st.data())
async def test_echo_routes_never_answer_500(
    client: aiohttp.ClientSession, echo_target: Target, data: st.DataObject
) -> None:
    await _check(client, echo_target, data.draw(_requests(echo_target)))


# --- the mesh's routes ---------------------------------------------------------------------------


def _stub_handler(service: descriptor.ServiceDescriptor) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)

        def answer(request: Any, context: Any, response_class: Any = response_class) -> Any:
            return response_class()

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            answer,
            request_deserializer=request_class.FromString,
            response_serializer=lambda r: r.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


@pytest.fixture
async def monitor_target() -> AsyncIterator[Target]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_stub_handler(s) for s in SERVICES])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backends = [Backend(s, StaticUpstream(f"127.0.0.1:{port}")) for s in SERVICES]
    gateway = await start_gateway("127.0.0.1:0", backends, media_types=MEDIA_TYPES)
    try:
        target = Target(gateway, SERVICES, set())
        target.routes.sort(key=lambda r: r.template.source != "/v1/pipelines")
        yield target
    finally:
        await gateway.close()
        await server.stop(None)


@FUZZ
@given(data=st.data())
async def test_monitor_routes_never_answer_500(
    client: aiohttp.ClientSession, monitor_target: Target, data: st.DataObject
) -> None:
    await _check(client, monitor_target, data.draw(_requests(monitor_target)))
