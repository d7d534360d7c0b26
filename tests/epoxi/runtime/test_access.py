"""Bearer tokens on every method, from the contract's ``epoxi.v1.scope`` options: real grpc.aio
servers built by ``epoxi.runtime.server`` with a tokens file, called over real channels.

Behind the interceptor each method answers its empty response (a handler built from the
descriptor), so what is tested is who gets through, for every method the contract has, and a
method added later is covered without a change here.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epoxi import settings
from epoxi.runtime.access import method_scope
from epoxi.runtime.channels import channel
from epoxi.runtime.lifecycle import Service
from epoxi.runtime.security import (
    Secret,
    Security,
    SecurityConfig,
    SecurityError,
    load_security,
    security_from_environment,
)
from epoxi.runtime.server import GrpcServer, Register, start_grpc_server
from epoxi.runtime.tokens import TokensError, parse_tokens, scope_name
from epoxi.v1 import access_pb2, monitor_pb2, node_pb2, router_pb2
from tests.epoxi.runtime.certs import new_token, tokens_file

SERVICES: list[ServiceDescriptor] = [
    monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"],
    node_pb2.DESCRIPTOR.services_by_name["NodeService"],
    router_pb2.DESCRIPTOR.services_by_name["RouterService"],
]
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]
ALL_SCOPES = [access_pb2.SCOPE_READ, access_pb2.SCOPE_SUBMIT, access_pb2.SCOPE_ADMIN, access_pb2.SCOPE_MESH]

# One token per scope, and one that holds every scope.
TOKENS = {scope_name(s): new_token() for s in ALL_SCOPES}
ALL = new_token()


def path(m: MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"


def declared(m: MethodDescriptor) -> int:
    return method_scope(path(m))


def answering(service: ServiceDescriptor) -> Register:
    """Each method of ``service`` answers its empty response."""
    handlers = {}
    for m in service.methods:
        request = message_factory.GetMessageClass(m.input_type)
        response = message_factory.GetMessageClass(m.output_type)

        async def answer(req: Any, context: Any, response: Any = response) -> Any:
            return response()

        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            answer, request.FromString, response.SerializeToString
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    return (lambda s: s.add_generic_rpc_handlers((generic,)), service.full_name)


async def serve(security: Security) -> GrpcServer:
    server = await start_grpc_server("127.0.0.1:0", [answering(s) for s in SERVICES], security=security)
    await server.serving()
    return server


@pytest.fixture
def tokens_path(tmp_path: Path) -> Path:
    return tokens_file(
        tmp_path / "tokens",
        {**{f"only-{n}": (n, t) for n, t in TOKENS.items()}, "everything": (",".join(TOKENS), ALL)},
    )


@pytest.fixture
async def server(tokens_path: Path) -> AsyncIterator[str]:
    s = await serve(load_security(SecurityConfig(tokens_file=str(tokens_path))))
    yield f"127.0.0.1:{s.port}"
    await s.stop(0)


@pytest.fixture
async def open_read_server(tokens_path: Path) -> AsyncIterator[str]:
    s = await serve(load_security(SecurityConfig(tokens_file=str(tokens_path), open_read=True)))
    yield f"127.0.0.1:{s.port}"
    await s.stop(0)


async def call(
    address: str,
    m: MethodDescriptor,
    metadata: Sequence[tuple[str, str]] = (),
    security: Security | None = None,
) -> tuple[grpc.StatusCode, str]:
    request = message_factory.GetMessageClass(m.input_type)
    response = message_factory.GetMessageClass(m.output_type)
    async with channel(address, security=security or Security()) as ch:
        rpc = ch.unary_unary(path(m), request.SerializeToString, response.FromString)
        try:
            await rpc(request(), metadata=tuple(metadata), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_every_method_of_every_service_declares_its_scope() -> None:
    """A method without a scope would be open to anyone: the contract names one for each."""
    for m in METHODS:
        assert declared(m) in ALL_SCOPES, f"{path(m)} declares no epoxi.v1.scope"
    assert {declared(m) for m in SERVICES[1].methods} == {access_pb2.SCOPE_MESH}
    assert {declared(m) for m in SERVICES[0].methods} == {access_pb2.SCOPE_READ, access_pb2.SCOPE_ADMIN}
    assert method_scope("/grpc.health.v1.Health/Check") == access_pb2.SCOPE_UNSPECIFIED
    assert method_scope("/epoxi.v1.NodeService/NoSuchMethod") == access_pb2.SCOPE_UNSPECIFIED


@pytest.mark.parametrize("m", METHODS, ids=path)
async def test_a_method_lets_in_only_a_token_holding_its_scope(server: str, m: MethodDescriptor) -> None:
    needs = scope_name(declared(m))
    code, details = await call(server, m)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert (
        details
        == f"{path(m)} needs a bearer token with scope {needs!r} (metadata authorization: Bearer <token>)"
    )

    for malformed in ["Bearer", "Bearer ", f"Basic {TOKENS[needs]}", TOKENS[needs]]:
        code, details = await call(server, m, [("authorization", malformed)])
        assert code == grpc.StatusCode.UNAUTHENTICATED, malformed
        assert details.startswith("the authorization metadata is not 'Bearer <token>'"), details

    for wrong in [new_token(), TOKENS[needs][:-1], TOKENS[needs] + "x", ALL.upper()]:
        code, details = await call(server, m, bearer(wrong))
        assert (code, details) == (
            grpc.StatusCode.UNAUTHENTICATED,
            f"the bearer token is not valid for {path(m)}",
        )

    for name, token in TOKENS.items():
        code, details = await call(server, m, bearer(token))
        if name == needs:
            assert code == grpc.StatusCode.OK, details
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details == f"{path(m)} needs scope {needs!r}; token 'only-{name}' has {name}"

    assert (await call(server, m, bearer(ALL)))[0] == grpc.StatusCode.OK
    # The scheme is case-insensitive (RFC 6750 / RFC 9110), and surrounding spaces do not matter.
    assert (await call(server, m, [("authorization", f"bearer  {TOKENS[needs]} ")]))[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("m", METHODS, ids=path)
async def test_open_reads_leave_only_read_methods_open(open_read_server: str, m: MethodDescriptor) -> None:
    code, _ = await call(open_read_server, m)
    if declared(m) == access_pb2.SCOPE_READ:
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert (await call(open_read_server, m, bearer(ALL)))[0] == grpc.StatusCode.OK


async def test_health_and_reflection_stay_open(server: str) -> None:
    async with channel(server) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [s.name async for r in stream for s in r.list_services_response.service]
    assert {"epoxi.v1.NodeService", "epoxi.v1.MonitorService", "grpc.health.v1.Health"} <= set(names)


async def test_an_unknown_method_is_unimplemented_not_refused(server: str) -> None:
    async with channel(server) as ch:
        rpc = ch.unary_unary("/epoxi.v1.NodeService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_channel_sends_this_process_token_on_every_call(server: str) -> None:
    enqueue = node_pb2.DESCRIPTOR.services_by_name["NodeService"].methods_by_name["EnqueueBatch"]
    mesh = Security(token=Secret(TOKENS["mesh"]))
    assert (await call(server, enqueue, security=mesh))[0] == grpc.StatusCode.OK
    admin = Security(token=Secret(TOKENS["admin"]))
    assert (await call(server, enqueue, security=admin))[0] == grpc.StatusCode.PERMISSION_DENIED
    # A call that carries its own authorization (a gateway passing on its caller's) keeps it.
    assert (await call(server, enqueue, bearer(TOKENS["mesh"]), security=admin))[0] == grpc.StatusCode.OK
    code, _ = await call(server, enqueue, bearer(TOKENS["admin"]), security=mesh)
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_without_a_tokens_file_every_method_is_open_and_a_warning_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service("open")
    async with service.starting():
        service.listen("127.0.0.1:0")
        await service.serve([answering(s) for s in SERVICES])
    try:
        for m in METHODS:
            assert (await call(service.address, m))[0] == grpc.StatusCode.OK, path(m)
    finally:
        await service.close()
    assert "open: access control is off: no tokens file (EPOXI_TOKENS_FILE)" in caplog.text


# --- the tokens file --------------------------------------------------------------------------


def test_the_tokens_file_names_each_token_and_its_scopes() -> None:
    a, b = new_token(), new_token()
    tokens = parse_tokens(f"# comment\n\nrouter mesh {a}\n  ops   READ,admin   {b}  \n")
    assert tokens.names == ["router", "ops"]
    router, ops = tokens.find(a), tokens.find(b)
    assert router is not None and router.name == "router" and router.scopes == {access_pb2.SCOPE_MESH}
    assert ops is not None and ops.scopes == {access_pb2.SCOPE_READ, access_pb2.SCOPE_ADMIN}
    assert tokens.find(a + "x") is None and tokens.find("") is None
    assert "Secret('<hidden>')" in repr(SecurityConfig(token=Secret(a))) and a not in repr(
        SecurityConfig(token=Secret(a))
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "t has no tokens: every protected method would refuse every caller"),
        ("# only a comment\n", "t has no tokens"),
        ("ops admin\n", "t, line 1: expected NAME SCOPES TOKEN, found 2 fields"),
        ("ops admin abcdefghijklmnopqrst extra\n", "t, line 1: expected NAME SCOPES TOKEN, found 4 fields"),
        (
            "ops adm abcdefghijklmnopqrst\n",
            "t, line 1: 'adm' is not a scope (the scopes: read, submit, admin, mesh)",
        ),
        ("ops admin short\n", "t, line 1: the token of 'ops' must be at least 16 visible ASCII characters"),
        ("ops admin abcdefghijklmnopqrsé\n", "the token of 'ops' must be at least 16 visible ASCII"),
        ("o/ps admin abcdefghijklmnopqrst\n", "t, line 1: 'o/ps' is not a token name"),
        (
            "a admin abcdefghijklmnopqrst\n\na read bcdefghijklmnopqrstu\n",
            "t, line 3: the name 'a' is already used on line 1",
        ),
        (
            "a admin abcdefghijklmnopqrst\nb read abcdefghijklmnopqrst\n",
            "t, line 2: 'b' has the same token as 'a'",
        ),
    ],
)
def test_a_malformed_tokens_file_is_refused_with_where_and_why(text: str, message: str) -> None:
    with pytest.raises(TokensError) as err:
        parse_tokens(text, "t")
    assert message in str(err.value)
    assert "abcdefghijklmnopqrst" not in str(err.value)  # a token is never shown


def test_a_service_with_a_tokens_file_it_cannot_use_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match=r"tokens file \(EPOXI_TOKENS_FILE\) .*/missing: cannot read it"):
        load_security(SecurityConfig(tokens_file=str(tmp_path / "missing")))
    bad = tmp_path / "bad"
    bad.write_text("ops everything abcdefghijklmnopqrst\n")
    with pytest.raises(SecurityError, match=r"line 1: 'everything' is not a scope"):
        load_security(SecurityConfig(tokens_file=str(bad)))


def test_this_process_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    token = new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    assert load_security(SecurityConfig(token_file=str(token_file))).token == Secret(token)
    assert load_security(SecurityConfig(token=Secret(token))).token == Secret(token)
    with pytest.raises(SecurityError, match="give EPOXI_TOKEN_FILE or EPOXI_TOKEN, not both"):
        load_security(SecurityConfig(token_file=str(token_file), token=Secret(token)))
    with pytest.raises(SecurityError, match=r"token file .*/nope: cannot read it"):
        load_security(SecurityConfig(token_file=str(tmp_path / "nope")))
    token_file.write_text("short\n")
    with pytest.raises(SecurityError, match="a token is at least 16 visible ASCII characters"):
        load_security(SecurityConfig(token_file=str(token_file)))


def test_tools_without_settings_of_their_own_read_the_shared_environment(tmp_path: Path) -> None:
    token = new_token()
    security = security_from_environment({"EPOXI_TOKEN": token, "EPOXI_OPEN_READ": "1"})
    assert (security.token, security.open_read, security.tls, security.tokens) == (
        Secret(token),
        True,
        None,
        None,
    )
    assert security_from_environment({}) == Security()
    with pytest.raises(
        SecurityError, match=r"EPOXI_TLS_CLIENT_AUTH='sometimes': 'sometimes' is not one of none, require"
    ):
        security_from_environment({"EPOXI_TLS_CLIENT_AUTH": "sometimes"})
    with pytest.raises(SecurityError, match=r"TLS CA \(EPOXI_TLS_CA\) .*/nope.pem: cannot read it"):
        security_from_environment({"EPOXI_TLS_CA": str(tmp_path / "nope.pem")})


def test_the_token_value_has_no_flag_only_the_file_paths_do() -> None:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, SecurityConfig)
    assert "--token-file" in parser.format_help() and "--tokens-file" in parser.format_help()
    assert "EPOXI_TOKEN: the bearer token this process sends" in parser.format_help()  # in the epilog
    with pytest.raises(SystemExit):
        parser.parse_args(["--token", new_token()])
    token = new_token()
    config = settings.from_args(SecurityConfig, parser.parse_args([]), environ={"EPOXI_TOKEN": token})
    assert config.token == Secret(token)
