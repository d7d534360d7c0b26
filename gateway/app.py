"""The aiohttp application: one catch-all handler that matches, transcodes and calls over gRPC."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from aiohttp import web
from google.protobuf import descriptor, message

from epoxi.runtime.channels import RPC_TIMEOUT
from epoxi.runtime.lifecycle import Service
from gateway.errors import GatewayError, rpc_error_response, status_response
from gateway.routes import MethodNotAllowed, NoRoute, RouteTable
from gateway.transcode import BadRequest, build_request, response_json
from gateway.upstream import NoUpstream, Upstream

log = logging.getLogger(__name__)

# Headers passed on as gRPC metadata, as grpc-gateway does: Authorization, and Grpc-Metadata-<key>.
_METADATA_PREFIX = "grpc-metadata-"


def create_app(routes: RouteTable, upstream: Upstream, rpc_timeout: float = RPC_TIMEOUT) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await _handle(request, routes, upstream, rpc_timeout)
        except GatewayError as e:
            return status_response(e.code, e.message, e.http)
        except Exception:
            log.exception("%s %s failed in the gateway", request.method, request.rel_url)
            return status_response(grpc.StatusCode.INTERNAL, "internal gateway error")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _handle(
    request: web.Request,
    routes: RouteTable,
    upstream: Upstream,
    rpc_timeout: float,
) -> web.StreamResponse:
    path = request.rel_url.raw_path
    try:
        match = routes.match(request.method, path)
    except NoRoute:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path}") from None
    except MethodNotAllowed as e:
        allowed = ", ".join(e.allowed)
        raise GatewayError(
            grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not allowed on {path}; use {allowed}", 405
        ) from None
    try:
        rpc_request = build_request(match, request.rel_url.query.items(), await request.read())
    except BadRequest as e:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    try:
        channel = await upstream.channel()
    except NoUpstream as e:
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
    route = match.route
    call = channel.unary_unary(
        route.rpc,
        request_serializer=_serialize,
        response_deserializer=route.response_class.FromString,
    )
    try:
        response = await call(rpc_request, timeout=rpc_timeout, metadata=_metadata(request))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            upstream.unavailable()
        log.debug("%s %s → %s: %s", request.method, path, e.code().name, e.details())
        return rpc_error_response(e)
    return web.json_response(response_json(response, route.response_body))


def _serialize(msg: message.Message) -> bytes:
    return msg.SerializeToString()


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    md = []
    for name, value in request.headers.items():
        key = name.lower()
        if key == "authorization":
            md.append((key, value))
        elif key.startswith(_METADATA_PREFIX) and len(key) > len(_METADATA_PREFIX):
            md.append((key.removeprefix(_METADATA_PREFIX), value))
    return md


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
) -> Gateway:
    """Serve the annotated methods of ``services`` on ``listen`` (``host:0`` picks a free port).

    The gateway owns ``upstream`` and closes it.
    """
    gateway = Gateway("gateway", stop_grace)
    async with gateway.starting():
        gateway.upstream = gateway.closing(upstream)
        routes = RouteTable.from_services(services)
        runner = web.AppRunner(create_app(routes, upstream, rpc_timeout), shutdown_timeout=stop_grace)
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
