"""Bearer tokens on gRPC: the server interceptor that lets a call in only with a token holding the
method's scope, and the client interceptors that send this process's token.

The scope a method needs is its ``epoxi.v1.scope`` option (protos/epoxi/v1/access.proto), read
from the descriptor pool once per method. Methods without one (health, reflection) are open, and
so are ``SCOPE_READ`` methods when the operator opens reads. A call without a well-formed
``authorization: Bearer <token>``, or with a token the server does not know, is UNAUTHENTICATED;
a known token without the scope is PERMISSION_DENIED, naming the scope and the token.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor

from epoxi.runtime.tokens import Tokens, scope_name
from epoxi.v1 import access_pb2

AUTHORIZATION = "authorization"
_BEARER = "bearer"
OPEN = access_pb2.SCOPE_UNSPECIFIED

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def method_scope(method: str, pool: descriptor_pool.DescriptorPool | None = None) -> int:
    """The scope ``method`` (``/package.Service/Method``) declares; ``OPEN`` for none, or for a
    method the pool does not know."""
    found = _method(method, pool)
    return OPEN if found is None else _declared_scope(found)


def _method(method: str, pool: descriptor_pool.DescriptorPool | None) -> MethodDescriptor | None:
    service, _, name = method.lstrip("/").rpartition("/")
    if not service or not name:
        return None
    try:
        found: MethodDescriptor = (pool or descriptor_pool.Default()).FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return found


def _declared_scope(method: MethodDescriptor) -> int:
    options = method.GetOptions()
    return int(options.Extensions[access_pb2.scope]) if options.HasExtension(access_pb2.scope) else OPEN


@dataclass(frozen=True)
class _Rule:
    """What a method needs: its scope (``OPEN``: nothing), and how a refusal is answered."""

    scope: int
    label: str  # "/epoxi.v1.NodeService/EnqueueBatch"
    request_streaming: bool
    response_streaming: bool


class AccessControl(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Lets a call in only with a bearer token that holds the called method's scope."""

    def __init__(
        self,
        tokens: Tokens,
        open_read: bool = False,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.tokens = tokens
        self.open_read = open_read
        self._pool = pool
        # Only methods the pool knows: a caller cannot grow it with made-up names.
        self._rules: dict[str, _Rule] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        rule = self._rules.get(method) or self._rule(method)
        if rule.scope == OPEN:
            return await continuation(handler_call_details)
        refusal = self._refusal(rule, handler_call_details.invocation_metadata)
        if refusal is None:
            return await continuation(handler_call_details)
        return _refuse(rule, *refusal)

    def _rule(self, method: str) -> _Rule:
        found = _method(method, self._pool)
        if found is None:
            return _Rule(OPEN, method, False, False)  # grpc answers UNIMPLEMENTED
        scope = _declared_scope(found)
        if scope == access_pb2.SCOPE_READ and self.open_read:
            scope = OPEN
        rule = self._rules[method] = _Rule(scope, method, found.client_streaming, found.server_streaming)
        return rule

    def _refusal(
        self, rule: _Rule, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        needs = scope_name(rule.scope)
        value = next((v for k, v in metadata or () if k == AUTHORIZATION), None)
        if value is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"{rule.label} needs a bearer token with scope {needs!r} "
                "(metadata authorization: Bearer <token>)",
            )
        scheme, _, presented = str(value).strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != _BEARER or not presented:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"the authorization metadata is not 'Bearer <token>'; {rule.label} needs a bearer "
                f"token with scope {needs!r}",
            )
        token = self.tokens.find(presented)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, f"the bearer token is not valid for {rule.label}"
        if not token.allows(rule.scope):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rule.label} needs scope {needs!r}; token {token.name!r} has {token.scope_names}",
            )
        return None


def _refuse(rule: _Rule, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the method's kind that aborts the call with ``code`` before reading it."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    if rule.request_streaming and rule.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if rule.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if rule.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# --- client side ----------------------------------------------------------------------------------


class _SendsToken:
    """Adds ``authorization: Bearer <token>`` to a call, unless the call carries its own (a
    gateway passing on its caller's)."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if AUTHORIZATION in metadata:
            return details
        metadata.add(AUTHORIZATION, self._value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_SendsToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _UnaryStream(_SendsToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _StreamUnary(_SendsToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: AsyncIterable[Any]
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


class _StreamStream(_SendsToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: AsyncIterable[Any]
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


def sending_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` on every kind of call."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
