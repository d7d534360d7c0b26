"""The aiohttp application: one catch-all handler that matches, transcodes and calls over gRPC.

Every annotated method of every served service is a route (``gateway.routes``), and each
service's calls go to its own upstream. Besides them the gateway answers paths of its own:
``GET /openapi.json``, the OpenAPI document of those routes (``gateway.openapi``),
``GET /healthz``, whether the monitor answers gRPC health SERVING (``gateway.health``), and the
live status page, ``GET /`` with its ``/static/{name}`` (``gateway.status_page``).

Every answer of the gateway's own is a ``google.rpc.Status`` JSON body: 404 for no route, 405
(with ``Allow``) for another method, 400 for a request that cannot become the request message,
413 for a body over ``max_request_bytes``, 415 (with ``Accept``) for a raw body of a media type
the route does not take, 503 with no upstream. Every response carries ``X-Request-Id``: the
caller's, or one made up for the request (and passed to the service as ``x-request-id``). An
exception the gateway did not foresee is its own bug: it is logged and answered 500 INTERNAL,
never left to aiohttp. Requests that are not valid HTTP (a malformed request line, a header line
over 8 KiB) are answered by aiohttp's parser with a plain 400 before they reach the
application, as Go's net/http answers them for grpc-gateway.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from google.protobuf import descriptor, message

from epoxi.runtime.channels import RPC_TIMEOUT
from epoxi.runtime.lifecycle import Closable, Service
from epoxi.runtime.limits import ENVELOPE_BYTES
from epoxi.validation import MAX_EMAIL_BYTES
from gateway import incoming, openapi, status_page, telemetry
from gateway.errors import GatewayError, rpc_error_response, status_response
from gateway.health import HealthProbe
from gateway.routes import MethodNotAllowed, NoRoute, Route, RouteTable
from gateway.transcode import BadRequest, build_request, response_json
from gateway.upstream import NoUpstream, Upstream

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
# One email at the email limit as JSON (its bytes base64: 4 characters per 3 bytes) and its
# envelope, rounded up to whole MiB: 34 MiB for the 25 MiB default.
MAX_REQUEST_BYTES = math.ceil((4 * math.ceil(MAX_EMAIL_BYTES / 3) + ENVELOPE_BYTES) / _MIB) * _MIB
HEALTH_PATH = "/healthz"
OPENAPI_PATH = "/openapi.json"


@dataclass(frozen=True)
class Backend:
    """A gRPC service the gateway serves, and where its calls go."""

    service: descriptor.ServiceDescriptor
    upstream: Upstream


class Dispatcher:
    """Routes, upstreams and the gateway's own paths, behind one aiohttp handler."""

    def __init__(
        self,
        routes: RouteTable,
        upstreams: Mapping[str, Upstream],
        health: HealthProbe | None,
        document: bytes,
        rpc_timeout: float,
        max_request_bytes: int,
    ) -> None:
        self.routes = routes
        self.upstreams = upstreams  # by the full name of the service
        self.health = health
        self.document = document
        self.rpc_timeout = rpc_timeout
        self.max_request_bytes = max_request_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            request_id = incoming.request_id(request)
        except GatewayError as e:
            response: web.StreamResponse = e.response()
            request_id = uuid.uuid4().hex
        else:
            response = await self._guarded(request, request_id)
        response.headers[incoming.REQUEST_ID] = request_id
        return response

    async def _guarded(self, request: web.Request, request_id: str) -> web.StreamResponse:
        try:
            return await self._handle(request, request_id)
        except GatewayError as e:
            return e.response()
        except Exception:
            log.exception(
                "%s %s failed in the gateway (request %s)", request.method, request.rel_url, request_id
            )
            return status_response(grpc.StatusCode.INTERNAL, "internal gateway error")

    async def _handle(self, request: web.Request, request_id: str) -> web.StreamResponse:
        path = request.rel_url.raw_path
        incoming.check_path(path)
        if path in (HEALTH_PATH, OPENAPI_PATH):
            telemetry.set_route(request, path)
            _only_get(request.method, path)
            if path == OPENAPI_PATH:
                return web.Response(body=self.document, content_type="application/json")
            if self.health is None:
                return web.json_response({"status": "SERVING"})
            return await self.health.check()
        try:
            match = self.routes.match(request.method, path)
        except NoRoute:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path}") from None
        except MethodNotAllowed as e:
            raise _not_allowed(request.method, path, e.allowed) from None
        route = match.route
        telemetry.set_route(request, route.template.source)
        content_type = _check_media_type(request, route, path)
        body = await incoming.body(request, self.max_request_bytes) if route.body else b""
        try:
            rpc_request = build_request(match, incoming.query(request), body, content_type)
        except BadRequest as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        metadata = incoming.metadata(request, request_id)
        upstream = self.upstreams[route.method.containing_service.full_name]
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
            response = await call(rpc_request, timeout=self.rpc_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                upstream.unavailable()
            log.debug("%s %s → %s: %s", request.method, path, e.code().name, e.details())
            return rpc_error_response(e)
        return web.json_response(response_json(response, route.response_body))


def _only_get(method: str, path: str) -> None:
    if method.upper() not in ("GET", "HEAD"):
        raise _not_allowed(method, path, ["GET"])


def _not_allowed(method: str, path: str, allowed: Sequence[str]) -> GatewayError:
    shown = ", ".join(allowed)
    return GatewayError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not allowed on {path}; use {shown}",
        405,
        {"Allow": shown},
    )


def _check_media_type(request: web.Request, route: Route, path: str) -> str:
    """The Content-Type of a raw (``google.api.HttpBody``) body, refused with 415 when the route
    does not take it; "" for other routes."""
    if route.http_body is None:
        return ""
    given = request.headers.get("Content-Type", "")
    if not route.accepts or request.content_type in route.accepts:
        return given
    accepted = ", ".join(route.accepts)
    what = f"Content-Type {given}" if given else "no Content-Type"
    raise GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{route.http_method} {path} takes a body of type {accepted}; the request has {what}",
        415,
        {"Accept": accepted},
    )


def _serialize(msg: message.Message) -> bytes:
    return msg.SerializeToString()


class HttpServer:
    """The gateway's aiohttp site, as the service lifecycle sees a server."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    async def serving(self) -> None:
        pass  # listening is serving; /healthz says whether the monitor is there

    async def not_serving(self) -> None:
        pass

    async def stop(self, grace: float) -> None:
        await self.runner.cleanup()  # waits up to the runner's shutdown_timeout, which is the grace


class Gateway(Service):
    """A running gateway; ``address`` is ``host:port`` with the bound port."""

    backends: list[Backend]
    document: bytes


async def start_gateway(
    listen: str,
    backends: Iterable[Backend],
    rpc_timeout: float = RPC_TIMEOUT,
    stop_grace: float = 5.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    health: Backend | None = None,
    media_types: Mapping[str, Sequence[str]] | None = None,
    resources: Sequence[Closable] = (),
    middlewares: Sequence[Middleware] = (),
) -> Gateway:
    """Serve the annotated methods of each backend's service on ``listen`` (``host:0`` picks a
    free port), calling that backend's upstream.

    ``/healthz`` answers whether ``health``'s upstream serves its service (gRPC health); without
    it, always 200. ``media_types`` maps a ``google.api.HttpBody`` request field (full name,
    ``package.Request.field``) to the media types its route takes; other such fields take any.
    The gateway owns the upstreams and ``resources`` and closes them. A request body over
    ``max_request_bytes`` is refused with 413.
    """
    gateway = Gateway("gateway", stop_grace)
    async with gateway.starting():
        for resource in resources:
            gateway.closing(resource)
        gateway.backends = list(backends)
        for backend in gateway.backends:
            gateway.closing(backend.upstream)
        routes = RouteTable.from_services((b.service for b in gateway.backends), media_types or {})
        gateway.document = json.dumps(openapi.document(routes, HEALTH_PATH, OPENAPI_PATH)).encode()
        probe = None
        if health is not None:
            probe = HealthProbe(health.upstream, health.service.full_name, rpc_timeout)
        dispatcher = Dispatcher(
            routes,
            {b.service.full_name: b.upstream for b in gateway.backends},
            probe,
            gateway.document,
            rpc_timeout,
            max_request_bytes,
        )
        app = web.Application(client_max_size=max_request_bytes, middlewares=list(middlewares))
        status_page.add_routes(app)  # GET / and /static/{name}: the operator's status page
        # [\s\S]: a path may hold a newline (%0A), which ".*" would leave to aiohttp's own 404.
        app.router.add_route("*", r"/{tail:[\s\S]*}", dispatcher.handle)
        runner = web.AppRunner(app, shutdown_timeout=stop_grace)
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
