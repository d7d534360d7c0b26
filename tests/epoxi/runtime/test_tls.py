"""TLS and mutual TLS on gRPC: real grpc.aio servers from ``epoxi.runtime`` with certificates a
test CA made (tests/epoxi/runtime/certs.py), dialled by ``epoxi.runtime.channels``; files that
cannot be used stop a service at start-up; grpcurl works against a TLS service with a token."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epoxi.runtime.channels import channel
from epoxi.runtime.lifecycle import Service
from epoxi.runtime.security import Secret, Security, SecurityConfig, SecurityError, load_security
from tests.epoxi.runtime.certs import (
    Pki,
    issue,
    make_ca,
    make_pki,
    new_token,
    tokens_file,
    write_ca,
    write_cert,
)
from tests.epoxi.runtime.test_access import SERVICES, answering

GRPCURL = Path(".venv/bin/grpcurl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def start(config: SecurityConfig) -> Service:
    service = Service("tls-test", grace=0)
    async with service.starting():
        service.listen("127.0.0.1:0", security=load_security(config))
        await service.serve([answering(s) for s in SERVICES])
    return service


@pytest.fixture
async def plain() -> AsyncIterator[str]:
    async with await start(SecurityConfig()) as s:
        yield s.address


@pytest.fixture
async def tls(pki: Pki) -> AsyncIterator[str]:
    async with await start(pki.security()) as s:
        yield s.address


@pytest.fixture
async def mtls(pki: Pki) -> AsyncIterator[str]:
    async with await start(pki.security(client_auth="require")) as s:
        yield s.address


async def health(address: str, config: SecurityConfig) -> grpc.StatusCode:
    async with channel(address, security=load_security(config)) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


async def test_plaintext_stays_plaintext(plain: str, pki: Pki) -> None:
    assert await health(plain, SecurityConfig()) == OK
    assert await health(plain, SecurityConfig(tls_ca=str(pki.ca))) == REFUSED  # no TLS there


async def test_tls_lets_in_clients_that_trust_its_ca(tls: str, pki: Pki) -> None:
    assert await health(tls, SecurityConfig(tls_ca=str(pki.ca))) == OK
    assert await health(tls, pki.security()) == OK  # a certificate it does not ask for does no harm
    assert await health(tls, SecurityConfig()) == REFUSED  # plaintext
    assert await health(tls, SecurityConfig(tls_ca=str(pki.other_ca))) == REFUSED  # another CA


async def test_mutual_tls_refuses_a_client_without_a_certificate_its_ca_signed(mtls: str, pki: Pki) -> None:
    assert await health(mtls, pki.security()) == OK  # the services' own certificate
    client = SecurityConfig(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    assert await health(mtls, client) == OK  # a client-only certificate of the same CA
    assert await health(mtls, SecurityConfig(tls_ca=str(pki.ca))) == REFUSED  # no certificate
    impostor = SecurityConfig(tls_ca=str(pki.ca), tls_cert=str(pki.other_cert), tls_key=str(pki.other_key))
    assert await health(mtls, impostor) == REFUSED  # a certificate another CA signed
    assert await health(mtls, pki.security(tls_ca=str(pki.other_ca))) == REFUSED  # trusts another CA
    assert await health(mtls, SecurityConfig()) == REFUSED  # plaintext


async def test_a_server_name_overrides_the_host_dialled(pki: Pki, tmp_path: Path) -> None:
    ca = make_ca("named CA")
    cert, key = write_cert(issue(ca, "router", hosts=("router.epoxi.test",), ips=()), tmp_path, "named")
    ca_file = write_ca(ca, tmp_path / "named-ca.pem")
    server = SecurityConfig(tls_cert=str(cert), tls_key=str(key))
    async with await start(server) as s:
        assert (
            await health(s.address, SecurityConfig(tls_ca=str(ca_file))) == REFUSED
        )  # 127.0.0.1 is not in it
        named = SecurityConfig(tls_ca=str(ca_file), tls_server_name="router.epoxi.test")
        assert await health(s.address, named) == OK
    assert load_security(named).check_fields() == {}  # a client only: no server check to describe
    named_server = load_security(
        SecurityConfig(tls_cert=str(cert), tls_key=str(key), tls_server_name="router.epoxi.test")
    )
    assert named_server.check_fields() == {"GRPCUseTLS": True, "TLSServerName": "router.epoxi.test"}


def test_registry_checks_of_a_tls_server_use_tls(pki: Pki) -> None:
    registration = {"name": "epoxi-router", "check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}}
    assert Security().with_tls_check(registration) is registration
    client_only = load_security(SecurityConfig(tls_ca=str(pki.ca)))
    assert client_only.with_tls_check(registration) is registration
    assert load_security(pki.security()).with_tls_check(registration) == {
        "name": "epoxi-router",
        "check": {"GRPC": "127.0.0.1:1", "Interval": "1s", "GRPCUseTLS": True},
    }
    assert registration == {"name": "epoxi-router", "check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}}


# --- files that cannot be used ------------------------------------------------------------------


def _config(pki: Pki, tmp_path: Path, case: str) -> SecurityConfig:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    missing = str(tmp_path / "missing.pem")
    cases = {
        "missing cert": pki.security(tls_cert=missing),
        "missing key": pki.security(tls_key=missing),
        "missing ca": pki.security(tls_ca=missing),
        "cert without key": SecurityConfig(tls_cert=str(pki.cert)),
        "key without cert": SecurityConfig(tls_key=str(pki.key)),
        "mismatched key": pki.security(tls_key=str(pki.client_key)),
        "garbage cert": pki.security(tls_cert=str(garbage)),
        "garbage ca": pki.security(tls_ca=str(garbage)),
        "empty key": pki.security(tls_key=str(empty)),
        "encrypted key": pki.security(tls_key=str(pki.encrypted_key)),
        "require without ca": SecurityConfig(
            tls_cert=str(pki.cert), tls_key=str(pki.key), tls_client_auth="require"
        ),
        "require without cert": SecurityConfig(tls_ca=str(pki.ca), tls_client_auth="require"),
    }
    return cases[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing cert", r"TLS certificate \(EPOXI_TLS_CERT\) .*/missing.pem: cannot read it: No such file"),
        ("missing key", r"TLS key \(EPOXI_TLS_KEY\) .*/missing.pem: cannot read it: No such file"),
        ("missing ca", r"TLS CA \(EPOXI_TLS_CA\) .*/missing.pem: cannot read it: No such file"),
        ("cert without key", r"TLS certificate \(EPOXI_TLS_CERT\) given without TLS key \(EPOXI_TLS_KEY\)"),
        ("key without cert", r"TLS key \(EPOXI_TLS_KEY\) given without TLS certificate \(EPOXI_TLS_CERT\)"),
        ("mismatched key", r"service.pem with key .*/client-key.pem: the key does not match the certificate"),
        ("garbage cert", r"TLS certificate \(EPOXI_TLS_CERT\) .*/garbage.pem with key .*: "),
        ("garbage ca", r"TLS CA \(EPOXI_TLS_CA\) .*/garbage.pem: no PEM certificate in it"),
        ("empty key", r"TLS key \(EPOXI_TLS_KEY\) .*/empty.pem: the file is empty"),
        ("encrypted key", r"service-key-encrypted.pem: the key is encrypted; give an unencrypted PEM key"),
        ("require without ca", r"EPOXI_TLS_CLIENT_AUTH=require needs EPOXI_TLS_CA"),
        ("require without cert", r"EPOXI_TLS_CLIENT_AUTH=require needs the server's own certificate"),
    ],
)
def test_a_file_that_cannot_be_used_stops_the_service_naming_it(
    pki: Pki, tmp_path: Path, case: str, message: str
) -> None:
    with pytest.raises(SecurityError, match=message):
        load_security(_config(pki, tmp_path, case))


async def test_a_service_main_with_a_bad_certificate_exits_with_the_reason(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "EPOXI_TLS_CERT": str(tmp_path / "nope.pem"),
        "EPOXI_TLS_KEY": str(tmp_path / "k.pem"),
    }
    proc = await asyncio.create_subprocess_exec(
        ".venv/bin/python",
        "-m",
        "services.monitor",
        "--listen",
        "127.0.0.1:0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out, err)
    assert b"listening on" not in out
    assert (
        f"monitor: cannot start: TLS certificate (EPOXI_TLS_CERT) {tmp_path}/nope.pem: cannot read it".encode()
        in err
    )
    assert b"Traceback" not in err


# --- grpcurl ------------------------------------------------------------------------------------


async def grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_grpcurl_reaches_a_mutual_tls_service_with_a_token(pki: Pki, tmp_path: Path) -> None:
    token = new_token()
    tokens = tokens_file(tmp_path / "tokens", {"router": ("mesh", token)})
    async with await start(pki.security(client_auth="require", tokens_file=str(tokens))) as s:
        tls = ["-cacert", str(pki.ca), "-cert", str(pki.client_cert), "-key", str(pki.client_key)]
        code, out = await grpcurl(*tls, s.address, "list")  # reflection is open
        assert code == 0, out
        assert "epoxi.v1.NodeService" in out
        code, out = await grpcurl(
            *tls, "-H", f"authorization: Bearer {token}", s.address, "epoxi.v1.NodeService/ListPipelines"
        )
        assert code == 0, out
        assert json.loads(out) == {}
        code, out = await grpcurl(*tls, s.address, "epoxi.v1.NodeService/ListPipelines")
        assert code != 0
        assert "Code: Unauthenticated" in out and "needs a bearer token with scope 'mesh'" in out
        # No client certificate, or plaintext: no connection.
        for refused in (["-cacert", str(pki.ca)], ["-plaintext"]):
            code, out = await grpcurl("-connect-timeout", "1", *refused, s.address, "list")
            assert code != 0 and "Failed to dial target host" in out, out


def test_a_loaded_security_never_shows_its_key_or_token(pki: Pki) -> None:
    token = new_token()
    shown = repr(load_security(pki.security(token=Secret(token))))
    assert "PRIVATE KEY" not in shown and token not in shown
    assert "BEGIN CERTIFICATE" in shown  # certificates are public
