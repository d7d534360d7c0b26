"""ACL enforcement: Consul's answers for a missing, unknown and sufficient token on every endpoint we use.

Runs against a dev registry with ``acl.enabled``, ``default_policy = "deny"`` and an initial
management token, and against a real Consul when ``CONSUL_HTTP_ADDR`` and its management token
(``CONSUL_HTTP_TOKEN`` or ``CONSUL_HTTP_TOKEN_FILE``) are set and that agent enforces ACLs with
default deny (otherwise that backend is skipped). ``http`` sends no token (the anonymous token);
``consul`` is a client with the management token.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from consul import ACLPermissionDenied, Check

from devmesh.registry.app import serve
from devmesh.registry.state import RegistryConfig, Secret
from epoxi.registry.client import Consul, connect, token_from_env
from tests.devmesh.registry.conftest import DEV_CONFIG
from tests.devmesh.registry.support import call

pytestmark = pytest.mark.consul

ACL_BACKENDS = ["dev", *(["consul"] if os.environ.get("CONSUL_HTTP_ADDR") and token_from_env() else [])]
ANONYMOUS_HINT = ". The anonymous token is used implicitly when a request does not specify a token."
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class ACLRegistry:
    addr: str
    management: str
    node: str


def anonymous_denied(permission: str, name: str) -> str:
    return f"Permission denied: anonymous token lacks permission '{permission}' on \"{name}\"{ANONYMOUS_HINT}"


async def _node_name(addr: str, token: str) -> tuple[str, dict[str, Any]]:
    client = connect(addr, token=token)
    try:
        me: dict[str, Any] = await client.agent.self()
    finally:
        await client.close()
    return me["Config"]["NodeName"], me["DebugConfig"]


@pytest.fixture(params=ACL_BACKENDS)
async def acl_registry(request: pytest.FixtureRequest) -> AsyncIterator[ACLRegistry]:
    if request.param == "consul":
        addr, token = os.environ["CONSUL_HTTP_ADDR"], token_from_env()
        assert token is not None
        node, debug = await _node_name(addr, token)
        if not debug.get("ACLsEnabled") or debug["ACLResolverSettings"]["ACLDefaultPolicy"] != "deny":
            pytest.skip("the Consul at CONSUL_HTTP_ADDR does not enforce ACLs with default_policy deny")
        yield ACLRegistry(addr, token, node)
        return
    token = str(uuid.uuid4())
    config = RegistryConfig(
        **DEV_CONFIG,  # type: ignore[arg-type]
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management_token=Secret(token),
    )
    registry = await serve("127.0.0.1", 0, config)
    try:
        yield ACLRegistry(registry.address, token, config.node_name)
    finally:
        await registry.close()


@pytest.fixture
def registry_addr(acl_registry: ACLRegistry) -> str:
    return acl_registry.addr


@pytest.fixture
async def consul(acl_registry: ACLRegistry) -> AsyncIterator[Consul]:
    client = connect(acl_registry.addr, token=acl_registry.management)
    yield client
    await client.close()


@pytest.fixture
async def http(registry_addr: str) -> AsyncIterator[aiohttp.ClientSession]:
    """Requests without a token, whatever the environment holds."""
    scheme = "" if "://" in registry_addr else "http://"
    async with aiohttp.ClientSession(base_url=f"{scheme}{registry_addr}") as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- tokens -------------------------------------------------------------------------------------


async def test_agent_self_shows_acls_enabled(consul: Consul) -> None:
    me = await consul.agent.self()
    assert me["DebugConfig"]["ACLsEnabled"] is True
    assert me["Member"]["Tags"]["acls"] == "1"


async def test_missing_token_is_the_anonymous_token(
    http: aiohttp.ClientSession, acl_registry: ACLRegistry
) -> None:
    async with http.get("/v1/agent/self") as response:
        assert response.status == 403
        assert response.headers["Content-Type"] == TEXT
        assert response.headers["X-Consul-Default-ACL-Policy"] == "deny"
        assert await response.text() == anonymous_denied("agent:read", acl_registry.node)


@pytest.mark.parametrize("how", ["header", "bearer", "query"])
async def test_unknown_token_is_acl_not_found(http: aiohttp.ClientSession, how: str) -> None:
    unknown = str(uuid.uuid4())
    kwargs: dict[str, Any] = {
        "header": {"headers": {"X-Consul-Token": unknown}},
        "bearer": {"headers": bearer(unknown)},
        "query": {"params": {"token": unknown}},
    }[how]
    for path in ("/v1/agent/self", "/v1/agent/services", "/v1/catalog/services", "/v1/kv/x"):
        async with http.get(path, **kwargs) as response:
            assert (response.status, await response.text()) == (403, "ACL not found"), path
            assert response.headers["Content-Type"] == TEXT


@pytest.mark.parametrize("how", ["header", "bearer", "query"])
async def test_every_way_of_sending_the_token(
    http: aiohttp.ClientSession, acl_registry: ACLRegistry, how: str
) -> None:
    token = acl_registry.management
    kwargs: dict[str, Any] = {
        "header": {"headers": {"X-Consul-Token": token}},
        "bearer": {"headers": {"Authorization": f"bearer   {token}  extra"}},
        "query": {"params": {"token": token}},
    }[how]
    async with http.get("/v1/agent/self", **kwargs) as response:
        assert response.status == 200


async def test_query_token_wins_over_headers(http: aiohttp.ClientSession, acl_registry: ACLRegistry) -> None:
    good, bad = acl_registry.management, str(uuid.uuid4())
    assert (await call(http, "GET", "/v1/agent/self", params={"token": good}, headers=bearer(bad)))[0] == 200
    assert await call(
        http, "GET", "/v1/agent/self", params={"token": bad}, headers={"X-Consul-Token": good}
    ) == (403, "ACL not found")
    # X-Consul-Token before Authorization; a scheme other than Bearer is no token at all.
    headers = {"X-Consul-Token": good, **bearer(bad)}
    assert (await call(http, "GET", "/v1/agent/self", headers=headers))[0] == 200
    basic = {"Authorization": f"Basic {good}"}
    assert await call(http, "GET", "/v1/agent/self", headers=basic) == (
        403,
        anonymous_denied("agent:read", acl_registry.node),
    )


async def test_status_needs_no_token(http: aiohttp.ClientSession) -> None:
    assert (await call(http, "GET", "/v1/status/leader"))[0] == 200
    assert (await call(http, "GET", "/v1/status/peers"))[0] == 200


# --- agent --------------------------------------------------------------------------------------


async def test_service_registration_needs_service_write(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    body = {"Name": prefix, "Check": {"TTL": "30s"}}
    assert await call(http, "PUT", "/v1/agent/service/register", json=body) == (
        403,
        anonymous_denied("service:write", prefix),
    )
    # Request errors the HTTP layer finds come before the token is looked at.
    assert await call(http, "PUT", "/v1/agent/service/register", json={"Port": 1}) == (
        400,
        "Missing service name",
    )
    assert await consul.agent.service.register(prefix, check=Check.ttl("30s")) is True
    assert prefix not in await call_json(http, "/v1/agent/services")

    assert await call(http, "PUT", f"/v1/agent/service/deregister/{prefix}") == (
        403,
        anonymous_denied("service:write", prefix),
    )
    # An unknown service is 404 before any permission is asked for.
    assert (await call(http, "PUT", f"/v1/agent/service/deregister/{prefix}-none"))[0] == 404
    assert await call(http, "GET", f"/v1/agent/service/{prefix}") == (
        403,
        anonymous_denied("service:read", prefix),
    )
    assert await call(http, "PUT", f"/v1/agent/service/maintenance/{prefix}", params={"enable": "true"}) == (
        403,
        anonymous_denied("service:write", prefix),
    )
    assert await consul.agent.service.deregister(prefix) is True


async def test_check_updates_need_write_on_the_service_or_node(
    consul: Consul, http: aiohttp.ClientSession, acl_registry: ACLRegistry, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    check_id = f"service:{prefix}"
    for verb in ("pass", "warn", "fail"):
        assert await call(http, "PUT", f"/v1/agent/check/{verb}/{check_id}") == (
            403,
            anonymous_denied("service:write", prefix),
        )
    assert await call(http, "PUT", f"/v1/agent/check/update/{check_id}", json={"Status": "passing"}) == (
        403,
        anonymous_denied("service:write", prefix),
    )
    assert await call(http, "PUT", f"/v1/agent/check/deregister/{check_id}") == (
        403,
        anonymous_denied("service:write", prefix),
    )
    assert (await call(http, "PUT", f"/v1/agent/check/pass/{prefix}-none"))[0] == 404
    assert await call(http, "PUT", "/v1/agent/check/register", json={"Name": prefix, "TTL": "30s"}) == (
        403,
        anonymous_denied("node:write", acl_registry.node),
    )
    assert await consul.agent.check.ttl_pass(check_id) is True


async def test_agent_lists_are_filtered_not_refused(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))

    assert prefix in await consul.agent.services()
    async with http.get("/v1/agent/services") as response:
        assert (response.status, await response.json()) == (200, {})
        assert "X-Consul-Results-Filtered-By-ACLs" not in response.headers  # no token named
    async with http.get("/v1/agent/services", headers={"X-Consul-Token": "anonymous"}) as response:
        assert (response.status, await response.json()) == (200, {})
        assert response.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert await call_json(http, "/v1/agent/checks") == {}


# --- catalog and health -------------------------------------------------------------------------


async def test_catalog_and_health_filter_what_the_token_cannot_read(
    consul: Consul, http: aiohttp.ClientSession, acl_registry: ACLRegistry, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    _, services = await consul.catalog.services()
    assert prefix in services

    assert await call_json(http, "/v1/catalog/services") == {}
    assert await call_json(http, f"/v1/catalog/service/{prefix}") == []
    assert await call_json(http, "/v1/catalog/nodes") == []
    assert await call_json(http, f"/v1/catalog/node/{acl_registry.node}") is None
    assert await call_json(http, f"/v1/health/service/{prefix}") == []
    assert await call_json(http, f"/v1/health/checks/{prefix}") == []
    assert await call_json(http, "/v1/health/state/any") == []
    assert await call_json(http, f"/v1/health/node/{acl_registry.node}") == []

    async with http.get("/v1/catalog/services", params={"token": "anonymous"}) as response:
        assert response.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    _, entries = await consul.health.service(prefix)
    assert [e["Service"]["ID"] for e in entries] == [prefix]


async def test_blocking_query_with_a_bad_token_fails_at_once(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    await consul.agent.service.register(prefix, check=Check.ttl("30s"))
    index, _ = await consul.health.service(prefix)
    params = {"index": index, "wait": "10m", "token": str(uuid.uuid4())}
    # Without the token check first this would wait up to ten minutes for a change.
    async with asyncio.timeout(60):
        assert await call(http, "GET", f"/v1/health/service/{prefix}", params=params) == (
            403,
            "ACL not found",
        )
        for path in ("/v1/catalog/services", f"/v1/kv/{prefix}/k", "/v1/session/list"):
            assert await call(http, "GET", path, params=params) == (403, "ACL not found"), path


# --- KV -----------------------------------------------------------------------------------------


async def test_kv_needs_key_permissions(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    key = f"{prefix}/k"
    assert await call(http, "PUT", f"/v1/kv/{key}", data=b"v") == (403, anonymous_denied("key:write", key))
    assert await consul.kv.put(key, "v") is True

    assert await call(http, "GET", f"/v1/kv/{key}") == (403, anonymous_denied("key:read", key))
    assert await call(http, "GET", f"/v1/kv/{prefix}/missing") == (
        403,
        anonymous_denied("key:read", f"{prefix}/missing"),
    )
    assert await call(http, "PUT", f"/v1/kv/{key}", params={"cas": "0"}, data=b"w") == (
        403,
        anonymous_denied("key:write", key),
    )
    assert await call(http, "DELETE", f"/v1/kv/{key}") == (403, anonymous_denied("key:write", key))
    assert await call(http, "DELETE", f"/v1/kv/{prefix}", params={"recurse": ""}) == (
        403,
        anonymous_denied("key:write", prefix),
    )
    # Listings are filtered: nothing readable under the prefix is "not found".
    assert (await call(http, "GET", f"/v1/kv/{prefix}", params={"recurse": ""}))[0] == 404
    assert (await call(http, "GET", f"/v1/kv/{prefix}", params={"keys": ""}))[0] == 404
    _, entry = await consul.kv.get(key)
    assert entry["Value"] == b"v"
    assert await consul.kv.delete(prefix, recurse=True) is True


# --- sessions -----------------------------------------------------------------------------------


async def test_sessions_need_session_permissions(
    consul: Consul, http: aiohttp.ClientSession, acl_registry: ACLRegistry, prefix: str
) -> None:
    assert await call(http, "PUT", "/v1/session/create", json={"Name": prefix}) == (
        403,
        anonymous_denied("session:write", acl_registry.node),
    )
    session = await consul.session.create(name=prefix)
    assert await call(http, "PUT", f"/v1/session/renew/{session}") == (
        403,
        anonymous_denied("session:write", acl_registry.node),
    )
    assert await call(http, "PUT", f"/v1/session/destroy/{session}") == (
        403,
        anonymous_denied("session:write", acl_registry.node),
    )
    assert await call_json(http, "/v1/session/list") == []
    assert await call_json(http, f"/v1/session/info/{session}") == []
    _, found = await consul.session.info(session)
    assert found["Name"] == prefix
    managed = {"X-Consul-Token": acl_registry.management}
    assert await create_session_with(http, {"Name": f"{prefix}-2"}, managed)


async def create_session_with(
    http: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> str:
    async with http.put("/v1/session/create", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        session_id: str = (await response.json())["ID"]
    return session_id


async def call_json(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


# --- the client ---------------------------------------------------------------------------------


async def test_client_reads_the_token_file(
    acl_registry: ACLRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(acl_registry.management + "\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "not-this-one")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    client = connect(acl_registry.addr)
    try:
        # agent.self is one of the calls py-consul sends without its token; ours carries it.
        assert (await client.agent.self())["DebugConfig"]["ACLsEnabled"] is True
        assert await client.agent.service.register(prefix) is True
        assert await client.agent.service.deregister(prefix) is True
    finally:
        await client.close()


async def test_client_with_a_wrong_token_cannot_register(acl_registry: ACLRegistry, prefix: str) -> None:
    client = connect(acl_registry.addr, token=secrets.token_hex(16))
    try:
        with pytest.raises(ACLPermissionDenied, match="ACL not found"):
            await client.agent.service.register(prefix)
        with pytest.raises(ACLPermissionDenied, match="ACL not found"):
            await client.health.service(prefix)
    finally:
        await client.close()


async def test_unreadable_token_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    with pytest.raises(ValueError, match=f"CONSUL_HTTP_TOKEN_FILE={missing}: cannot read it"):
        token_from_env({"CONSUL_HTTP_TOKEN_FILE": str(missing)})
    assert token_from_env({"CONSUL_HTTP_TOKEN": "t"}) == "t"
    assert token_from_env({}) is None


# --- tokens from service and node identities ------------------------------------------------------


async def make_token(http: aiohttp.ClientSession, management: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.put("/v1/acl/token", json=body, headers={"X-Consul-Token": management}) as response:
        assert response.status == 200, await response.text()
        token: dict[str, Any] = await response.json()
    return token


async def test_service_identity_token_writes_its_service_and_reads_the_rest(
    consul: Consul, http: aiohttp.ClientSession, acl_registry: ACLRegistry, prefix: str
) -> None:
    token = await make_token(
        http, acl_registry.management, {"Description": prefix, "ServiceIdentities": [{"ServiceName": prefix}]}
    )
    assert token["Description"] == prefix
    assert token["ServiceIdentities"] == [{"ServiceName": prefix}]
    assert "Policies" not in token
    for field in ("AccessorID", "SecretID", "Local", "CreateTime", "Hash", "CreateIndex", "ModifyIndex"):
        assert field in token
    accessor, mine = token["AccessorID"], {"X-Consul-Token": token["SecretID"]}
    await consul.agent.service.register(f"{prefix}-other", check=Check.ttl("30s"))

    body = {"Name": prefix, "Check": {"TTL": "30s"}}
    assert await call(http, "PUT", "/v1/agent/service/register", json=body, headers=mine) == (200, "")
    assert await call(http, "PUT", f"/v1/agent/check/pass/service:{prefix}", headers=mine) == (200, "")
    denied = f"Permission denied: token with AccessorID '{accessor}' lacks permission"
    assert await call(
        http, "PUT", "/v1/agent/service/register", json={"Name": f"{prefix}-other"}, headers=mine
    ) == (403, f"{denied} 'service:write' on \"{prefix}-other\"")
    assert await call(http, "GET", "/v1/agent/self", headers=mine) == (
        403,
        f"{denied} 'agent:read' on \"{acl_registry.node}\"",
    )
    assert await call(http, "GET", f"/v1/kv/{prefix}/k", headers=mine) == (
        403,
        f"{denied} 'key:read' on \"{prefix}/k\"",
    )
    # service_prefix "" and node_prefix "" read: discovery sees every service.
    async with http.get(f"/v1/health/service/{prefix}-other", headers=mine) as response:
        assert [e["Service"]["ID"] for e in await response.json()] == [f"{prefix}-other"]
        assert "X-Consul-Results-Filtered-By-ACLs" not in response.headers
    # ...but not the sessions, which service identities do not grant.
    assert (await call(http, "PUT", "/v1/session/create", json={}, headers=mine))[0] == 403
    assert await call(http, "PUT", f"/v1/agent/service/deregister/{prefix}", headers=mine) == (200, "")


async def test_node_identity_token_writes_its_node(
    http: aiohttp.ClientSession, acl_registry: ACLRegistry, consul: Consul, prefix: str
) -> None:
    dc = (await consul.agent.self())["Config"]["Datacenter"]
    node = acl_registry.node
    token = await make_token(
        http, acl_registry.management, {"NodeIdentities": [{"NodeName": node, "Datacenter": dc}]}
    )
    mine = {"X-Consul-Token": token["SecretID"]}
    body = {"Name": prefix, "TTL": "30s"}
    assert await call(http, "PUT", "/v1/agent/check/register", json=body, headers=mine) == (200, "")
    assert await call(http, "PUT", f"/v1/agent/check/deregister/{prefix}", headers=mine) == (200, "")


async def test_making_tokens_needs_acl_write(http: aiohttp.ClientSession, acl_registry: ACLRegistry) -> None:
    body = {"ServiceIdentities": [{"ServiceName": "web"}]}
    assert await call(http, "PUT", "/v1/acl/token", json=body) == (
        403,
        f"Permission denied: anonymous token lacks permission 'acl:write'{ANONYMOUS_HINT}",
    )
    unknown = {"X-Consul-Token": str(uuid.uuid4())}
    assert await call(http, "PUT", "/v1/acl/token", json=body, headers=unknown) == (403, "ACL not found")
    assert (await call(http, "PUT", "/v1/acl/token", data=b"{", headers=unknown))[0] == 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"ServiceIdentities": [{"ServiceName": "Web!"}]},
            "Service identity \"Web!\" has an invalid name. Only lowercase alphanumeric characters, '-' and '_' are allowed",
        ),
        (
            {"NodeIdentities": [{"NodeName": "n1"}]},
            "Node identity is missing the datacenter field on this token",
        ),
        ({"SecretID": "not-a-uuid"}, "Invalid Token: SecretID - not a valid UUID"),
        (
            {"AccessorID": "00000000-0000-0000-0000-000000000002"},
            'Invalid Token: AccessorID - UUIDs with the prefix "00000000-0000-0000-0000-0000000000" are reserved',
        ),
        (
            {"Policies": [{"Name": "epoxi-test-no-such-policy"}]},
            'No such ACL policy with name "epoxi-test-no-such-policy"',
        ),
    ],
)
async def test_bad_tokens_are_refused(
    http: aiohttp.ClientSession, acl_registry: ACLRegistry, body: dict[str, Any], reason: str
) -> None:
    managed = {"X-Consul-Token": acl_registry.management}
    assert await call(http, "PUT", "/v1/acl/token", json=body, headers=managed) == (500, reason)


async def test_a_chosen_secret_is_the_token(http: aiohttp.ClientSession, acl_registry: ACLRegistry) -> None:
    secret = str(uuid.uuid4())
    token = await make_token(
        http, acl_registry.management, {"SecretID": secret, "ServiceIdentities": [{"ServiceName": "web"}]}
    )
    assert token["SecretID"] == secret
    managed = {"X-Consul-Token": acl_registry.management}
    assert await call(http, "PUT", "/v1/acl/token", json={"SecretID": secret}, headers=managed) == (
        500,
        "Invalid Token: SecretID is already in use",
    )


async def test_acl_endpoints_need_acls_enabled() -> None:
    registry = await serve("127.0.0.1", 0, RegistryConfig(**DEV_CONFIG))  # type: ignore[arg-type]
    try:
        async with aiohttp.ClientSession(base_url=f"http://{registry.address}") as http:
            assert await call(http, "PUT", "/v1/acl/token", json={}) == (401, "ACL support disabled")
    finally:
        await registry.close()
