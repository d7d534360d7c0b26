"""The aiohttp application: one catch-all handler that matches, transcodes and calls over gRPC.

Every answer of the gateway's own is a ``google.rpc.Status`` JSON body: 404 for no route, 405
(with ``Allow``) for another method, 400 for a request that cannot become the request message,
413 for a body over ``max_request_bytes``, 503 with no upstream. An exception the gateway did
not foresee is its own bug: it is logged and answered 500 INTERNAL, never left to aiohttp.
Requests that are not valid HTTP (a malformed request line, a header line over 8 KiB) are
answered by aiohttp's parser with a plain 400 before they reach the application, as Go's
net/http answers them for grpc-gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from aiohttp import web
from google.protobuf import descriptor, message

from epoxi.runtime.channels import RPC_TIMEOUT
from epoxi.runtime.lifecycle import Service
from gateway import incoming
from gateway.errors import GatewayError, rpc_error_response, status_response
from gateway.routes import MethodNotAllowed, NoRoute, RouteTable
from gateway.transcode import BadRequest, build_request, response_json
from gateway.upstream import NoUpstream, Upstream

log = logging.getLogger(__name__)

# aiohttp's own default; admin requests are far smaller (see docs/operations.md).
MAX_REQUEST_BYTES = 1024 * 1024


def create_app(
    routes: RouteTable,
    upstream: Upstream,
    rpc_timeout: float = RPC_TIMEOUT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await _handle(request, routes, upstream, rpc_timeout, max_request_bytes)
        except GatewayError as e:
            return e.response()
        except Exception:
            log.exception("%s %s failed in the gateway", request.method, request.rel_url)
            return status_response(grpc.StatusCode.INTERNAL, "internal gateway error")

    app = web.Application(client_max_size=max_request_bytes)
    # [\s\S]: a path may hold a newline (%0A), which ".*" would leave to aiohttp's own 404.
    # [\s\S]: a path may hold a newline (%0A), which ".*" would leave to aiohttp's own 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    return app


async def _handle(
    request: web.Request,
    routes: RouteTable,
    upstream: Upstream,
    rpc_timeout: float,
    max_request_bytes: int,
) -> web.StreamResponse:
    path = request.rel_url.raw_path
    incoming.check_path(path)
    try:
        match = routes.match(request.method, path)
    except NoRoute:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path}") from None
    except MethodNotAllowed as e:
        allowed = ", ".join(e.allowed)
        raise GatewayError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{request.method} is not allowed on {path}; use {allowed}",
            405,
            {"Allow": allowed},
        ) from None
    route = match.route
    body = await incoming.body(request, max_request_bytes) if route.body else b""
    try:
        rpc_request = build_request(match, incoming.query(request), body)
    except BadRequest as e:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    metadata = incoming.metadata(request)
    try:
        channel = await upstream.channel()
    except NoUpstream as e:
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
    call = channel.unary_unary(
        route.rpc,
        request_serializer=_serialize,
        response_deserializer=route.response_class.FromString,
    )
    try:
        response = await call(rpc_request, timeout=rpc_timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            upstream.unavailable()
        log.debug("%s %s → %s: %s", request.method, path, e.code().name, e.details())
        return rpc_error_response(e)
    return web.json_response(response_json(response, route.response_body))


def _serialize(msg: message.Message) -> bytes:
    return msg.SerializeToString()


class HttpServer:
    """The gateway's aiohttp site, as the service lifecycle sees a server."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    async def serving(self) -> None:
        pass  # no health endpoint yet: listening is serving

    async def not_serving(self) -> None:
        pass

    async def stop(self, grace: float) -> None:
        await self.runner.cleanup()  # waits up to the runner's shutdown_timeout, which is the grace


class Gateway(Service):
    """A running gateway; ``address`` is ``host:port`` with the bound port."""

    upstream: Upstream


async def start_gateway(
    listen: str,
    services: Iterable[descriptor.ServiceDescriptor],
    upstream: Upstream,
    rpc_timeout: float = RPC_TIMEOUT,
    stop_grace: float = 5.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> Gateway:
    """Serve the annotated methods of ``services`` on ``listen`` (``host:0`` picks a free port).

    The gateway owns ``upstream`` and closes it. A request body over ``max_request_bytes`` is
    refused with 413.
    """
    gateway = Gateway("gateway", stop_grace)
    async with gateway.starting():
        gateway.upstream = gateway.closing(upstream)
        routes = RouteTable.from_services(services)
        runner = web.AppRunner(
            create_app(routes, upstream, rpc_timeout, max_request_bytes), shutdown_timeout=stop_grace
        )
        await runner.setup()
        server = HttpServer(runner)
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            await web.TCPSite(runner, host or None, int(port)).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        await gateway.attach(server, f"{shown}:{bound}")
    return gateway
