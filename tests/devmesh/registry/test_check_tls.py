"""TLS gRPC health checks of the dev registry against real TLS and mTLS ``grpc.aio`` health servers.

A CA made with ``cryptography`` (``tests.epoxi.runtime.certs``) signs the servers' and the
registry's certificates. These tests are the dev registry's own (its TLS settings are not
something the contract can set on a real Consul), so ``registry_addr`` is one dev registry here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devmesh.registry.app import serve
from devmesh.registry.check_tls import CheckTLS
from devmesh.registry.checks import probe_grpc
from devmesh.registry.state import CheckSpec, RegistryConfig
from epoxi.registry.client import Consul
from epoxi.runtime.tls import TlsError, TlsFiles
from tests.devmesh.registry.conftest import DEV_CONFIG
from tests.epoxi.runtime.certs import Pki, issue, make_ca, make_pki, write_ca, write_cert
from tests.support import eventually

Server = Callable[..., Awaitable[str]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def health_server() -> AsyncIterator[Server]:
    """Start a health server (SERVING) with a certificate; returns its ``127.0.0.1:port``."""
    servers: list[grpc.aio.Server] = []

    async def start(cert: Path, key: Path, client_ca: Path | None = None) -> str:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        files = TlsFiles.read(cert, key, client_ca)
        credentials = files.server_credentials(require_client_auth=client_ca is not None)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


def agent_tls(pki: Pki, with_cert: bool = True) -> CheckTLS:
    config = RegistryConfig(
        enable_agent_tls_for_checks=True,
        tls_ca_file=str(pki.ca),
        tls_cert_file=str(pki.client_cert) if with_cert else "",
        tls_key_file=str(pki.client_key) if with_cert else "",
    )
    return CheckTLS.from_config(config)


def tls_spec(**fields: object) -> CheckSpec:
    return CheckSpec(grpc_use_tls=True, **fields)  # type: ignore[arg-type]


async def test_tls_check_verifies_with_the_agent_ca(pki: Pki, health_server: Server) -> None:
    target = await health_server(pki.cert, pki.key)
    assert await probe_grpc(target, 5, tls_spec(), agent_tls(pki)) == (
        "passing",
        f"gRPC check {target}: success",
    )
    # Without enable_agent_tls_for_checks the system's roots are used: our CA is unknown there.
    status, output = await probe_grpc(target, 5, tls_spec(), CheckTLS())
    assert status == "critical" and output.startswith("rpc error: code = Unavailable desc = "), output


async def test_plaintext_check_of_a_tls_server_fails(pki: Pki, health_server: Server) -> None:
    target = await health_server(pki.cert, pki.key)
    status, output = await probe_grpc(target, 5, CheckSpec(), agent_tls(pki))
    assert status == "critical" and output.startswith("rpc error: code = Unavailable"), output


async def test_mtls_server_gets_the_agent_certificate(pki: Pki, health_server: Server) -> None:
    target = await health_server(pki.cert, pki.key, client_ca=pki.ca)
    assert (await probe_grpc(target, 5, tls_spec(), agent_tls(pki)))[0] == "passing"
    # A registry without a certificate of its own is refused by the mTLS server.
    status, output = await probe_grpc(target, 5, tls_spec(), agent_tls(pki, with_cert=False))
    assert status == "critical" and output.startswith("rpc error: code = Unavailable"), output


async def test_tls_server_name_replaces_the_host(health_server: Server, tmp_path: Path) -> None:
    ca = make_ca("Named CA")
    cert, key = write_cert(issue(ca, "named", hosts=("health.epoxi.test",), ips=()), tmp_path, "named")
    target = await health_server(cert, key)
    config = RegistryConfig(
        enable_agent_tls_for_checks=True, tls_ca_file=str(write_ca(ca, tmp_path / "ca.pem"))
    )
    tls = CheckTLS.from_config(config)
    status, output = await probe_grpc(target, 5, tls_spec(), tls)  # 127.0.0.1 is not in the certificate
    assert status == "critical", output
    assert (await probe_grpc(target, 5, tls_spec(tls_server_name="health.epoxi.test"), tls))[0] == "passing"
    status, _ = await probe_grpc(target, 5, tls_spec(tls_server_name="other.epoxi.test"), tls)
    assert status == "critical"


async def test_tls_skip_verify_accepts_any_server_and_still_presents_the_certificate(
    pki: Pki, health_server: Server
) -> None:
    untrusted = await health_server(pki.other_cert, pki.other_key)
    tls = agent_tls(pki)
    assert (await probe_grpc(untrusted, 5, tls_spec(), tls))[0] == "critical"
    assert await probe_grpc(untrusted, 5, tls_spec(tls_skip_verify=True), tls) == (
        "passing",
        f"gRPC check {untrusted}: success",
    )
    # An mTLS server that trusts our CA still sees the registry's certificate.
    mtls = await health_server(pki.other_cert, pki.other_key, client_ca=pki.ca)
    assert (await probe_grpc(mtls, 5, tls_spec(tls_skip_verify=True), tls))[0] == "passing"
    status, _ = await probe_grpc(mtls, 5, tls_spec(tls_skip_verify=True), agent_tls(pki, with_cert=False))
    assert status == "critical"


async def test_skip_verify_of_a_closed_port_is_unavailable(pki: Pki) -> None:
    status, output = await probe_grpc("127.0.0.1:1", 5, tls_spec(tls_skip_verify=True), agent_tls(pki))
    assert status == "critical" and output.startswith("rpc error: code = Unavailable"), output


def test_a_bad_tls_file_is_named(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    config = RegistryConfig(enable_agent_tls_for_checks=True, tls_ca_file=str(empty))
    with pytest.raises(TlsError, match=f"tls.defaults.ca_file {empty}: the file is empty"):
        CheckTLS.from_config(config)
    # Without enable_agent_tls_for_checks the files are not used, as in Consul.
    assert CheckTLS.from_config(RegistryConfig(tls_ca_file=str(empty))) == CheckTLS()


# --- through the registry -----------------------------------------------------------------------


@pytest.fixture
async def registry_addr(pki: Pki) -> AsyncIterator[str]:
    config = RegistryConfig(
        **DEV_CONFIG,  # type: ignore[arg-type]
        enable_agent_tls_for_checks=True,
        tls_ca_file=str(pki.ca),
        tls_cert_file=str(pki.client_cert),
        tls_key_file=str(pki.client_key),
    )
    registry = await serve("127.0.0.1", 0, config)
    yield registry.address
    await registry.close()


async def test_registered_tls_check_of_an_mtls_service_passes(
    consul: Consul, pki: Pki, health_server: Server, prefix: str
) -> None:
    target = await health_server(pki.cert, pki.key, client_ca=pki.ca)
    check = {"GRPC": target, "GRPCUseTLS": True, "Interval": "1s", "TLSServerName": "localhost"}
    await consul.agent.service.register(prefix, check=check)

    async def passing() -> list[dict[str, Any]]:
        _, entries = await consul.health.service(prefix, passing=True)
        return list(entries)

    [entry] = await eventually(passing)
    [service_check] = [c for c in entry["Checks"] if c["ServiceID"] == prefix]
    assert service_check["Output"] == f"gRPC check {target}: success"
