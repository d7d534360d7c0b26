"""Spans for gRPC calls, client and server, with the W3C context carried in metadata.

Our own interceptors rather than ``opentelemetry-instrumentation-grpc``'s: those (0.66b) write
the retired ``net.peer.*`` attributes and no ``server.address`` on client spans, and trace every
health check and reflection call, which Consul's gRPC checks make every few seconds. These follow
the current RPC conventions (``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``, ``server.address``/``server.port``, ``network.peer.*``) and leave
``grpc.health.v1`` and reflection untraced. They are installed only while tracing is on
(``epoxi.observability.tracing``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from epoxi.observability import tracing

_UNTRACED = ("/grpc.health.v1.", "/grpc.reflection.")
_CONTEXT_KEYS = ("traceparent", "tracestate")
# Codes that are the server's fault (OpenTelemetry's RPC conventions); a client's span marks
# every code but OK.
_SERVER_ERRORS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def _traced(method: str) -> bool:
    return not method.startswith(_UNTRACED)


def rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _split_host_port(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None
    return host.strip("[]"), int(port)


def _peer_attributes(peer: str) -> dict[str, str | int]:
    """``network.peer.*`` from a gRPC peer string such as ``ipv4:127.0.0.1:5555``."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, port = _split_host_port(address)
    attributes: dict[str, str | int] = {"network.peer.address": host, "network.type": kind}
    if port is not None:
        attributes["network.peer.port"] = port
    return attributes


def _end(
    span: trace.Span, code: grpc.StatusCode, details: str | None, errors: Iterable[grpc.StatusCode]
) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in errors:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": ")))


class ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """A SERVER span per unary call, the child of the caller's ``traceparent`` when it sent one."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not _traced(method) or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        metadata: Mapping[str, Any] = dict(details.invocation_metadata or ())
        parent = tracing.extract({k: v for k, v in metadata.items() if isinstance(v, str)})
        attributes = rpc_attributes(method)

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with tracing.span(
                method.lstrip("/"),
                SpanKind.SERVER,
                {**attributes, **_peer_attributes(context.peer() or "")},
                parent,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await inner(request, context)
                except BaseException as e:
                    code = context.code()
                    if not isinstance(code, grpc.StatusCode):
                        code = grpc.StatusCode.UNKNOWN
                        span.record_exception(e)
                    _end(span, code, context.details(), _SERVER_ERRORS)
                    raise
                code = context.code()
                _end(
                    span,
                    code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK,
                    None,
                    _SERVER_ERRORS,
                )
                return response

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ClientTracing(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """A CLIENT span per unary call to ``target``, its context sent as ``traceparent`` metadata."""

    def __init__(self, target: str) -> None:
        host, port = _split_host_port(target.removeprefix("dns:///").removeprefix("ipv4:"))
        self._server: dict[str, str | int] = {"server.address": host}
        if port is not None:
            self._server["server.port"] = port

    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        if not _traced(method):
            return await continuation(client_call_details, request)
        with tracing.span(
            method.lstrip("/"),
            SpanKind.CLIENT,
            {**rpc_attributes(method), **self._server},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            # Our span's context replaces any the caller passed on (the gateway forwards its
            # caller's traceparent when tracing is off).
            metadata = [(k, v) for k, v in client_call_details.metadata or () if k not in _CONTEXT_KEYS]
            metadata.extend(tracing.inject({}).items())
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                grpc.aio.Metadata(*metadata),
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            call = await continuation(details, request)
            try:
                await call
            except grpc.aio.AioRpcError as e:
                _end(span, e.code(), e.details(), set(grpc.StatusCode) - {grpc.StatusCode.OK})
                raise
            _end(span, grpc.StatusCode.OK, None, ())
            return call


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [ServerTracing()] if tracing.enabled() else []


def client_interceptors(target: str) -> list[grpc.aio.ClientInterceptor]:
    return [ClientTracing(target)] if tracing.enabled() else []
