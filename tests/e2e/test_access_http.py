"""Every route the gateway serves, against a mesh with access control on and reads closed: no
token and a wrong token are 401 with ``WWW-Authenticate: Bearer``, a token without the route's
scope is 403, and the scope the contract names (``epoxi.v1.scope``) gets past the door. The
routes come from the same annotations the gateway serves, so a new route is covered by itself."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devmesh.supervisor import Mesh
from epoxi.v1 import access_pb2
from gateway.main import SERVICES
from gateway.routes import Route, RouteTable

TOKENS = {scope: secrets.token_urlsafe(24) for scope in ("read", "submit", "admin", "mesh")}
SCOPE_NAMES = {
    access_pb2.SCOPE_READ: "read",
    access_pb2.SCOPE_SUBMIT: "submit",
    access_pb2.SCOPE_ADMIN: "admin",
    access_pb2.SCOPE_MESH: "mesh",
}
# A value for each path variable that the service would take, so only the door can refuse.
PATH_VALUES = {"routing_key": "example.org_127_0_0_2", "message_id": "0" * 32}

ROUTES = RouteTable.from_services(SERVICES).routes


def scope_of(route: Route) -> str:
    return SCOPE_NAMES[route.method.GetOptions().Extensions[access_pb2.scope]]


def url_path(route: Route) -> str:
    path = route.template.source
    for variable in route.template.variables:
        path = path.replace("{" + variable.field_path + "}", PATH_VALUES[variable.field_path])
    return path


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("access")
    tokens = data / "tokens"
    tokens.write_text("".join(f"{scope} {scope} {token}\n" for scope, token in TOKENS.items()))
    tokens.chmod(0o600)
    return data


@pytest.fixture
async def gateway(tokens_dir: Path, tmp_path: Path) -> AsyncIterator[str]:
    env = {"EPOXI_TOKENS_FILE": str(tokens_dir / "tokens"), "EPOXI_TOKEN": TOKENS["mesh"]}
    mesh = await Mesh(tmp_path, check_interval="200ms", env=env).start()
    try:
        yield f"http://{mesh.address('gateway')}"
    finally:
        await mesh.stop()


async def call(http: aiohttp.ClientSession, base: str, route: Route, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"headers": headers}
    if route.body == "*":
        kwargs["json"] = body
    elif route.body:
        headers["Content-Type"] = "message/rfc822"
        kwargs["data"] = b"Subject: x\r\n\r\nx\r\n"
    async with http.request(route.http_method, base + url_path(route), **kwargs) as resp:
        answer = await resp.json(content_type=None)
        if resp.status == 401:
            assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), resp.headers
        return resp.status, answer


def test_every_route_declares_a_scope() -> None:
    assert ROUTES
    for route in ROUTES:
        assert scope_of(route) in ("read", "submit", "admin"), route.template.source


async def test_every_route_refuses_a_missing_wrong_or_unscoped_token(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        for route in ROUTES:
            what = f"{route.http_method} {route.template.source}"
            needed = scope_of(route)
            status, answer = await call(http, gateway, route, None)
            assert (status, answer["code"]) == (401, 16), (what, answer)
            status, answer = await call(http, gateway, route, secrets.token_urlsafe(24))
            assert (status, answer["code"]) == (401, 16), (what, answer)
            other = next(s for s in ("read", "submit", "admin") if s != needed)
            status, answer = await call(http, gateway, route, TOKENS[other])
            assert (status, answer["code"]) == (403, 7), (what, answer)
            assert needed in answer["message"], (what, answer)
            status, answer = await call(http, gateway, route, TOKENS[needed])
            assert status not in (401, 403), (what, answer)
