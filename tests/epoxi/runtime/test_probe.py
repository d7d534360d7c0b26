"""The container health probe against real plaintext, TLS and mTLS health servers, as a process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epoxi.runtime.tls import TlsFiles
from tests.epoxi.runtime.certs import Pki, make_pki

Start = Callable[..., Awaitable[str]]
REPO = Path(__file__).resolve().parents[3]
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _credentials(pki: Pki, require_client_auth: bool) -> grpc.ServerCredentials:
    return TlsFiles.read(pki.cert, pki.key, pki.ca).server_credentials(require_client_auth)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Start]:
    servers: list[grpc.aio.Server] = []

    async def start(
        tls: str = "plaintext", status: health_pb2.HealthCheckResponse.ServingStatus.ValueType = SERVING
    ) -> str:
        s = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, s)
        if tls == "plaintext":
            port = s.add_insecure_port("127.0.0.1:0")
        else:
            port = s.add_secure_port("127.0.0.1:0", _credentials(pki, require_client_auth=tls == "mtls"))
        await s.start()
        await servicer.set("", status)
        servers.append(s)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        await s.stop(0)


async def run_probe(target: str, env: dict[str, str]) -> tuple[int, str]:
    clean = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}  # none of this process's EPOXI_*
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "epoxi.runtime.probe",
        target,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode().strip()


async def test_plaintext_serving_and_not_serving(server: Start) -> None:
    serving = await server()
    assert await run_probe(serving, {}) == (0, f"{serving}: SERVING")
    not_serving = await server(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await run_probe(not_serving, {}) == (1, f"{not_serving}: NOT_SERVING")


async def test_mtls_with_the_shared_environment(server: Start, pki: Pki) -> None:
    target = await server("mtls")
    assert await run_probe(target, pki.env()) == (0, f"{target}: SERVING")
    # Without a certificate the mTLS server refuses the probe.
    code, out = await run_probe(target, {"EPOXI_TLS_CA": str(pki.ca)})
    assert code == 1 and out.startswith(f"{target}: UNAVAILABLE"), out
    # Plaintext to a TLS server is not healthy either.
    code, out = await run_probe(target, {})
    assert code == 1 and "UNAVAILABLE" in out, out


async def test_unusable_settings_exit_2(server: Start, tmp_path: Path) -> None:
    target = await server()
    code, out = await run_probe(target, {"EPOXI_TLS_CA": str(tmp_path / "missing.pem")})
    assert code == 2 and "cannot read it" in out, out
