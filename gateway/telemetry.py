"""What the gateway shows of each HTTP request: a SERVER span, and its count and duration.

One aiohttp middleware (``HttpTelemetry.middleware``) around every handler:

- while tracing is on, a SERVER span ``{METHOD} {route}`` (``http.request.method``,
  ``http.route``, ``url.path``, ``url.scheme``, ``http.response.status_code``,
  ``network.peer.address``), the child of the caller's ``traceparent`` when it sent one valid
  header (``gateway.incoming.trace_context``), else a new trace. The handler runs inside it, so
  the upstream gRPC call's CLIENT span (``epoxi.observability.grpc_tracing``) is its child and
  its context is the ``traceparent`` the service receives. A 5xx marks the span an error;
- ``epoxi_gateway_http_requests_total{method, route, code}`` and
  ``epoxi_gateway_http_request_duration_seconds{method, route}`` (a histogram), on the gateway's
  own registry; nothing with metrics off.

``route`` is the matched route's template (``/v1/pipelines/{routing_key}``, as its
``google.api.http`` annotation writes it), which the dispatcher names with ``set_route``; else
the aiohttp resource the request matched (``/``, ``/static/{name}``); else ``unmatched`` (no
route: a 404), so a path never becomes a label. A method outside HTTP's own is ``_OTHER``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from epoxi.observability import tracing
from gateway import incoming

ROUTE: web.RequestKey[str] = web.RequestKey("epoxi_route", str)
UNMATCHED = "unmatched"
OTHER_METHOD = "_OTHER"
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The catch-all route of the dispatcher: not a route of its own.
_CATCH_ALL = "/{tail}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def set_route(request: web.Request, template: str) -> None:
    """Name the route ``request`` matched (a path template), for its span and its metrics."""
    request[ROUTE] = template


def route_of(request: web.Request) -> str:
    named = request.get(ROUTE)
    if isinstance(named, str) and named:
        return named
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    if canonical and not canonical.startswith(_CATCH_ALL):
        return canonical
    return ""


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        self.on = registry is not None
        if registry is None:
            return
        self._requests = Counter(
            "epoxi_gateway_http_requests_total",
            "HTTP requests the gateway answered, by method, route and status code.",
            ["method", "route", "code"],
            registry=registry,
        )
        self._seconds = Histogram(
            "epoxi_gateway_http_request_duration_seconds",
            "How long the gateway took to answer an HTTP request, by method and route.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        if not self.on:
            return
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._requests.labels(method, route, str(status)),
                self._seconds.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)


class HttpTelemetry:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        traced = tracing.enabled()
        if not traced and not self.metrics.on:
            return await handler(request)
        started = time.perf_counter()
        status = 500
        with self._span(request) if traced else contextlib.nullcontext() as span:
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                if span is not None:
                    _describe(span, request, status)
                self._count(request, status, started)

    def _span(self, request: web.Request) -> AbstractContextManager[trace.Span]:
        """A SERVER span for ``request``, the child of its ``traceparent`` header when it sent one."""
        attributes: dict[str, str | int] = {
            "http.request.method": _method(request.method),
            "url.path": request.path,
            "url.scheme": request.scheme,
        }
        if request.remote:
            attributes["network.peer.address"] = request.remote
        return tracing.tracer.start_as_current_span(
            _method(request.method),
            context=tracing.extract(dict(incoming.trace_context(request))),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )

    def _count(self, request: web.Request, status: int, started: float) -> None:
        self.metrics.request(
            _method(request.method), route_of(request) or UNMATCHED, status, time.perf_counter() - started
        )


def _describe(span: trace.Span, request: web.Request, status: int) -> None:
    """The matched route and the status, known once the request is answered."""
    route = route_of(request)
    if route:
        span.update_name(f"{_method(request.method)} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))


def _method(method: str) -> str:
    upper = method.upper()
    return upper if upper in METHODS else OTHER_METHOD
