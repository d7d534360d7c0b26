"""The mesh with registry ACLs on: the dev registry enforces tokens (default deny, an initial
management token from a file), every service reads its token from ``CONSUL_HTTP_TOKEN_FILE``,
and mail still routes and delivers; a service with a wrong token cannot register and says why."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devmesh.registry import acl
from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import TLS_FOR_CHECKS_ENV, RegistryConfig, read_secret
from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec, spawn
from epoxi.registry import services
from epoxi.runtime.channels import channel
from epoxi.runtime.security import load_security
from epoxi.v1 import router_pb2, router_pb2_grpc
from tests.epoxi.runtime.certs import make_pki
from tests.support import batch_without_waiting, eventually, valid_email


def acl_env(token_file: Path) -> dict[str, str]:
    """One environment for the whole mesh: the registry enforces ACLs with this management
    token, and every service presents it."""
    return {**acl.environment(token_file), "CONSUL_HTTP_TOKEN_FILE": str(token_file)}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "consul-management-token"
    path.write_text(f"{uuid.uuid4()}\n")
    path.chmod(0o600)
    return path


async def registry_get(addr: str, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"X-Consul-Token": token} if token else {}
    async with aiohttp.ClientSession() as http, http.get(f"http://{addr}{path}", headers=headers) as resp:
        return (
            resp.status,
            await resp.json() if resp.content_type == "application/json" else await resp.text(),
        )


@pytest.fixture
async def mesh(
    tmp_path: Path, sink: Sink, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    # Mesh waits for the nodes through the registry from this process, which needs the token too.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    m = Mesh(
        data_dir=tmp_path,
        nodes=[NodeSpec("node1", ["127.0.0.2"])],
        route=f"*={sink.address}",
        env=acl_env(token_file),
    )
    await m.start()
    try:
        assert m.consul is not None
        await batch_without_waiting(m.consul)
        yield m
    finally:
        await m.stop()


async def test_mail_routes_and_delivers_with_acls_on(mesh: Mesh, sink: Sink, token_file: Path) -> None:
    assert mesh.consul is not None
    token = read_secret(str(token_file))
    status, me = await registry_get(mesh.consul, "/v1/agent/self", token)
    assert status == 200 and me["DebugConfig"]["ACLsEnabled"] is True

    async with channel(mesh.address("router")) as ch:
        email = valid_email(to=["ann@gmail.com"], delivery={"ip": "127.0.0.2"})
        reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=[email]), timeout=30
        )
    assert (reply.successful_batches, reply.failed_batches) == (1, 0), reply
    [received] = await sink.wait_for(1)
    assert received.rcpt_tos == ["ann@gmail.com"] and received.peer == "127.0.0.2"

    # The services registered with their token; without one the registry shows nothing.
    status, entries = await registry_get(mesh.consul, f"/v1/health/service/{services.NODE_SERVICE}", token)
    assert (status, [e["Service"]["ID"] for e in entries]) == (200, ["node1"])
    assert await registry_get(mesh.consul, f"/v1/health/service/{services.NODE_SERVICE}") == (200, [])


async def test_mtls_mesh_with_acls_like_docker_compose(
    tmp_path: Path, sink: Sink, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-compose.yml's setup on this machine: mutual TLS on every gRPC hop, the registry's
    TLS gRPC checks presenting its certificate, and ACLs. The nodes only turn passing (and the
    mesh only starts) when the registry's mTLS probes of them succeed."""
    pki = make_pki(tmp_path / "pki")
    env = {**acl_env(token_file), **pki.env("require"), TLS_FOR_CHECKS_ENV: "true"}
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    mesh = Mesh(
        data_dir=tmp_path / "mesh",
        nodes=[NodeSpec("node1", ["127.0.0.2"])],
        route=f"*={sink.address}",
        env=env,
    )
    await mesh.start()
    try:
        assert mesh.consul is not None
        await batch_without_waiting(mesh.consul)
        security = load_security(pki.security())
        async with channel(mesh.address("router"), security=security) as ch:
            email = valid_email(to=["bob@gmail.com"], delivery={"ip": "127.0.0.2"})
            reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
                router_pb2.RouteEmailsRequest(emails=[email]), timeout=30
            )
        assert (reply.successful_batches, reply.failed_batches) == (1, 0), reply
        [received] = await sink.wait_for(1)
        assert received.rcpt_tos == ["bob@gmail.com"]
        consul = mesh.consul
        assert consul is not None

        async def probed() -> dict[str, str] | None:
            """node1's check once the registry's own gRPC probe has run (mail is delivered in
            milliseconds now, often before the first probe)."""
            status, entries = await registry_get(
                consul, f"/v1/health/service/{services.NODE_SERVICE}?passing=1", read_secret(str(token_file))
            )
            assert status == 200
            [check] = [c for e in entries for c in e["Checks"] if c["ServiceID"] == "node1"]
            return check if check["Output"] else None

        check = await eventually(probed)
        assert check["Output"].startswith("gRPC check ") and check["Output"].endswith(": success"), check
    finally:
        await mesh.stop()


@pytest.fixture
async def acl_registry(token_file: Path) -> AsyncIterator[RunningRegistry]:
    config = RegistryConfig(
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management_token=read_secret(str(token_file)),
    )
    registry = await serve("127.0.0.1", 0, config)
    yield registry
    await registry.close()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("wrong", "ACL not found"),
        ("missing", "Permission denied: anonymous token lacks permission 'service:write'"),
    ],
)
async def test_a_node_with_a_wrong_token_cannot_register(
    acl_registry: RunningRegistry, token_file: Path, tmp_path: Path, how: str, expected: str
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text(f"{uuid.uuid4()}\n")
    # Whatever this process's environment holds, the node gets the wrong token or none.
    env = {"CONSUL_HTTP_TOKEN_FILE": str(wrong) if how == "wrong" else "", "CONSUL_HTTP_TOKEN": ""}
    args = ["services.node", "--id", "n1", "--listen", "127.0.0.1:0", "--egress-ip", "127.0.0.2"]
    args += ["--spool", str(tmp_path / "spool.db"), "--consul", acl_registry.address]
    args += ["--route", "*=127.0.0.1:1", "--check-interval", "0.2s"]
    node = await spawn("n1", args, env=env)
    try:
        # The node says why it cannot register, with the registry's own words.
        await eventually(lambda: _said(node.lines, f"registry sync failed, retrying in 0.2s: {expected}"))
        management = read_secret(str(token_file))
        status, found = await registry_get(acl_registry.address, "/v1/agent/services", management)
        assert (status, found) == (200, {})
    finally:
        await node.stop()


async def _said(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)
