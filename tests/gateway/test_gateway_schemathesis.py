"""schemathesis against the live gateway, from the OpenAPI document it serves, in front of a real
mesh (``tests.gateway.live``) with access control on (a tokens file; reading left open): no 5xx,
every response (status, content type, headers, body) as the document says, and input the
document calls invalid (a missing token included) refused with a 4xx google.rpc.Status.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import openapi
from gateway.app import HEALTH_PATH, OPENAPI_PATH
from gateway.main import MEDIA_TYPES, SERVICES
from gateway.routes import RouteTable
from tests.gateway.live import LiveMesh

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# The caller's token (every scope a caller of the gateway may need) and the services' own.
CALLER_TOKEN = secrets.token_urlsafe(24)
MESH_TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    data = Path(tmp_path_factory.mktemp("mesh"))
    tokens = data / "tokens"
    tokens.write_text(f"caller read,submit,admin {CALLER_TOKEN}\nmesh mesh {MESH_TOKEN}\n")
    tokens.chmod(0o600)
    env = {"EPOXI_TOKENS_FILE": str(tokens), "EPOXI_TOKEN": MESH_TOKEN, "EPOXI_OPEN_READ": "1"}
    with LiveMesh(data, env) as live:
        yield live


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    # One session, closed at the end: its pooled connections are never left to the collector.
    with requests.Session() as session:
        yield session


# The document the gateway serves, built as it builds it (test_the_served_document_is_this_one);
# loaded at collection, since schemathesis parametrizes tests then.
DOCUMENT = openapi.document(RouteTable.from_services(SERVICES, MEDIA_TYPES), HEALTH_PATH, OPENAPI_PATH)
schema = schemathesis.openapi.from_dict(DOCUMENT)
# POST /v1/emails:raw takes message/rfc822: bytes, sent as they are.
schemathesis.serializer.alias("message/rfc822", "application/octet-stream")


@schema.auth()
class Bearer:
    """The caller's token, on every case but those schemathesis sends without one on purpose."""

    def get(self, case: schemathesis.Case[Any], context: schemathesis.AuthContext) -> str:
        return CALLER_TOKEN

    def set(self, case: schemathesis.Case[Any], data: str, context: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {data}"


def test_the_served_document_is_this_one(mesh: LiveMesh) -> None:
    with urllib.request.urlopen(f"http://{mesh.gateway}{OPENAPI_PATH}") as resp:
        assert json.load(resp) == DOCUMENT


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_gateway_keeps_its_openapi_document(
    case: schemathesis.Case[Any], mesh: LiveMesh, http: requests.Session
) -> None:
    response = case.call_and_validate(base_url=f"http://{mesh.gateway}", session=http, checks=CHECKS)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"code", "message", "details"}, body
        assert body["code"] != 0 and body["message"], body
