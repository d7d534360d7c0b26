"""The mesh with mutual TLS on every gRPC hop and bearer tokens on every service, end to end:
every service its own process, configured by one environment (EPOXI_TLS_*, EPOXI_TOKENS_FILE,
EPOXI_TOKEN_FILE), the development registry probing the services over mTLS, and a real sink.

Mail routed through the router (client -> router -> node, with the router's mesh token) reaches
the sink; the monitor starts a pipeline on a node (monitor -> node); a client without a
certificate, or without a token, is refused by the router, the monitor and the nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devmesh.registry.state import TLS_FOR_CHECKS_ENV
from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi.envelope import new_email
from epoxi.registry import client, services
from epoxi.runtime.channels import channel
from epoxi.runtime.security import Secret, Security, SecurityConfig, load_security
from epoxi.v1 import (
    email_pb2,
    monitor_pb2,
    monitor_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.epoxi.runtime.certs import Pki, make_pki, new_token, tokens_file
from tests.epoxi.runtime.test_tls import GRPCURL
from tests.support import batch_without_waiting, eventually

MESH, SUBMIT, OPS = new_token(), new_token(), new_token()


@dataclass
class SecureMesh:
    mesh: Mesh
    pki: Pki

    def client(self, token: str | None = None, cert: Path | None = None, key: Path | None = None) -> Security:
        """A client with the client-only certificate of the mesh's CA (or ``cert`` and ``key``)."""
        config = SecurityConfig(
            tls_ca=str(self.pki.ca),
            tls_cert=str(cert or self.pki.client_cert),
            tls_key=str(key or self.pki.client_key),
            token=Secret(token) if token else None,
        )
        return load_security(config)


@pytest.fixture
async def secure(tmp_path: Path, sink: Sink) -> AsyncIterator[SecureMesh]:
    pki = make_pki(tmp_path / "pki")
    tokens = tokens_file(
        tmp_path / "tokens",
        {"mesh": ("mesh", MESH), "app": ("submit", SUBMIT), "ops": ("read,admin", OPS)},
    )
    own = tmp_path / "mesh-token"
    own.write_text(MESH + "\n")
    own.chmod(0o600)
    env = {
        **pki.env(client_auth="require"),
        "EPOXI_TOKENS_FILE": str(tokens),
        "EPOXI_TOKEN_FILE": str(own),
        # The registry probes with the same files, as a Consul agent with enable_agent_tls_for_checks.
        TLS_FOR_CHECKS_ENV: "true",
    }
    nodes = [NodeSpec("node1", ["127.0.0.2"]), NodeSpec("node2", ["127.0.0.3"])]
    m = await Mesh(data_dir=tmp_path / "mesh", nodes=nodes, route=f"*={sink.address}", env=env).start()
    try:
        assert m.consul is not None
        await batch_without_waiting(m.consul)
        yield SecureMesh(m, pki)
    finally:
        await m.stop()


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def test_mail_routed_over_mutual_tls_with_tokens_reaches_the_sink(
    secure: SecureMesh, sink: Sink
) -> None:
    consul = client.connect(secure.mesh.consul)

    async def grpc_checks_passing() -> list[dict[str, Any]] | None:
        checks = [c for c in (await consul.agent.checks()).values() if c.get("Type") == "grpc"]
        return checks if len(checks) == 4 and all(c["Status"] == "passing" for c in checks) else None

    try:
        # node1, node2, the router and the monitor, each probed by the registry over mTLS.
        checks = await eventually(grpc_checks_passing)
    finally:
        await consul.close()
    assert {c["ServiceName"] for c in checks} == {services.NODE_SERVICE, "epoxi-router", "epoxi-monitor"}

    email = new_email(
        "a@sender.test",
        to=["x@example.com"],
        subject="over mTLS",
        text="hi",
        delivery=email_pb2.Delivery(ip="127.0.0.2"),
    )
    async with channel(secure.mesh.address("router"), security=secure.client(SUBMIT)) as ch:
        reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=[email]), timeout=30
        )
    [batch] = reply.batches
    assert batch.ok, reply  # the router reached the node with its mesh token over mTLS
    [received] = await sink.wait_for(1)
    assert received.rcpt_tos == ["x@example.com"]

    # epoxi send, with the settings as flags and its token from the environment.
    pki = secure.pki
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cli", "send", "--router", secure.mesh.address("router"), "--to", "y@example.com"),
        *("--ip", "127.0.0.2", "--tls-ca", str(pki.ca)),
        *("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)),
        env={**os.environ, "EPOXI_TOKEN": SUBMIT},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    assert json.loads(out)["successfulBatches"] == 1
    [_, sent] = await sink.wait_for(2)
    assert sent.rcpt_tos == ["y@example.com"]

    # The monitor reaches the nodes too: an admin starts a pipeline through it.
    async with channel(secure.mesh.address("monitor"), security=secure.client(OPS)) as ch:
        started = await monitor_pb2_grpc.MonitorServiceStub(ch).StartPipelineOptimal(
            monitor_pb2.StartPipelineOptimalRequest(domain="example.net", source_ip="127.0.0.3"), timeout=30
        )
    assert started.node.id == "node2"

    # grpcurl, as an operator would.
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *("-cacert", str(pki.ca), "-cert", str(pki.client_cert), "-key", str(pki.client_key)),
        *("-H", f"authorization: Bearer {OPS}"),
        secure.mesh.address("monitor"),
        "epoxi.v1.MonitorService/GetClusterStats",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    assert {n["id"] for n in json.loads(out)["nodes"]} == {"node1", "node2"}

    # The gateway dials the monitor over mTLS and passes the HTTP caller's token on.
    url = f"http://{secure.mesh.address('gateway').removeprefix('http://')}/admin/pipelines"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {OPS}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert {n["id"] for n in (await resp.json())["nodes"]} == {"node1", "node2"}
        async with http.get(url) as resp:
            assert resp.status == 401, await resp.text()
        async with http.get(url, headers={"Authorization": f"Bearer {SUBMIT}"}) as resp:
            assert resp.status == 403, await resp.text()


Call = Callable[[grpc.aio.Channel], Awaitable[Any]]


def protected_calls() -> dict[str, Call]:
    email = new_email("a@sender.test", to=["x@example.com"], subject="s", text="t")
    return {
        "router": lambda ch: router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=[email]), timeout=10
        ),
        "monitor": lambda ch: monitor_pb2_grpc.MonitorServiceStub(ch).StopPipelineByRoutingKey(
            monitor_pb2.StopPipelineByRoutingKeyRequest(routing_key="example.com@127.0.0.2"), timeout=10
        ),
        "node1": lambda ch: node_pb2_grpc.NodeServiceStub(ch).EnqueueBatch(
            node_pb2.EnqueueBatchRequest(routing_key="example.com@127.0.0.2", emails=[email]), timeout=10
        ),
    }


async def test_a_client_without_a_certificate_or_a_token_is_refused_everywhere(secure: SecureMesh) -> None:
    pki = secure.pki
    no_certificate = load_security(SecurityConfig(tls_ca=str(pki.ca)))
    impostor = secure.client(MESH, cert=pki.other_cert, key=pki.other_key)
    calls = protected_calls()
    for name in calls:
        address = secure.mesh.address(name)
        for refused in (no_certificate, impostor, Security()):  # no certificate, another CA's, plaintext
            async with channel(address, security=refused) as ch:
                code, _ = await code_of(
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                )
            assert code == grpc.StatusCode.UNAVAILABLE, name
        async with channel(address, security=secure.client()) as ch:  # the right certificate: health is open
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name

        wrong_scope = OPS if name == "router" else SUBMIT
        for token, expected in [
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (new_token(), grpc.StatusCode.UNAUTHENTICATED),
            (wrong_scope, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            async with channel(address, security=secure.client(token)) as ch:
                code, details = await code_of(calls[name](ch))
            assert code == expected, (name, details)
