"""HTTP plumbing that behaves like Consul's ``agent/http.go``.

Routing follows Go's ``http.ServeMux``: a pattern ending in ``/`` matches every path under it,
other patterns match exactly, and the longest pattern wins. Each pattern declares its methods;
any other method gets ``405 method X not allowed`` with an ``Allow`` header, and ``OPTIONS``
gets the ``Allow`` header alone. Handler errors are written as plain text with their status.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devmesh.registry.codec import DecodeError, Struct, decode_body, render_json

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TEXT = "text/plain; charset=utf-8"


class HTTPError(Exception):
    """Consul's ``HTTPError``: a status code and the plain-text reason written as the body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def bad_request(reason: str) -> HTTPError:
    return HTTPError(400, reason)


async def read_body(request: web.Request, struct: Struct) -> dict[str, Any]:
    """The request's JSON body decoded as Go would decode ``struct``; 400 with Consul's text if not."""
    try:
        return decode_body(await request.read(), struct)
    except DecodeError as exc:
        raise bad_request(f"Request decode failed: {exc}") from None


def text_response(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(status=status, body=body.encode(), headers=headers)
    response.content_type = "text/plain"
    response.charset = "utf-8"
    return response


def json_response(value: object, headers: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=render_json(value), headers=headers, content_type="application/json"
    )


def meta_headers(index: int) -> dict[str, str]:
    """``setMeta``: the query index (never 0), a known leader and no lag on a single server."""
    return {
        "X-Consul-Index": str(index if index > 0 else 1),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }


def param(request: web.Request, name: str) -> str:
    """Go's ``url.Values.Get``: the first value, or ``""``."""
    return request.query.get(name, "")


def parse_bool(value: str) -> bool:
    """Go's ``strconv.ParseBool``; ValueError for anything else (``""`` included)."""
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def parse_bool_param(request: web.Request, name: str) -> bool:
    """``getBoolQueryParam``: absent is false, bare is true, otherwise ``strconv.ParseBool``."""
    if name not in request.query:
        return False
    value = request.query[name]
    return True if value == "" else parse_bool(value)


@dataclass(frozen=True)
class Route:
    pattern: str
    methods: tuple[str, ...]
    handler: Handler


class Router:
    """A ``ServeMux`` look-alike with per-pattern allowed methods."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self._exact: dict[str, Route] = {}
        self._prefixes: list[Route] = []
        # Set on every answer of a known endpoint, as ``wrap`` sets X-Consul-Default-ACL-Policy.
        self._headers = dict(headers or {})

    def add(self, pattern: str, methods: tuple[str, ...], handler: Handler) -> None:
        route = Route(pattern, methods, handler)
        if pattern.endswith("/"):
            self._prefixes.append(route)
            self._prefixes.sort(key=lambda r: len(r.pattern), reverse=True)
        else:
            self._exact[pattern] = route

    def match(self, path: str) -> Route | None:
        if path in self._exact:
            return self._exact[path]
        for route in self._prefixes:
            if path.startswith(route.pattern):
                return route
        return None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        route = self.match(request.path)
        if route is None:
            return _index(request.path)
        response = await self._handle(route, request)
        response.headers.update(self._headers)
        return response

    async def _handle(self, route: Route, request: web.Request) -> web.StreamResponse:
        allow = ",".join(("OPTIONS", *route.methods))
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": allow})
        if request.method not in route.methods:
            return text_response(405, f"method {request.method} not allowed", {"Allow": allow})
        try:
            return await route.handler(request)
        except HTTPError as exc:
            return text_response(exc.status, exc.reason or "An unexpected error occurred")
        except web.HTTPException:
            raise
        except Exception as exc:  # Consul answers any other handler error with 500 and its text
            log.exception("request %s %s failed", request.method, request.path)
            return text_response(500, str(exc))


def _index(path: str) -> web.Response:
    if path == "/":
        return text_response(200, "Consul Agent")
    if "/v1/" in path:
        return text_response(404, "Invalid URL path: not a recognized HTTP API endpoint\n")
    return text_response(
        404, "Invalid URL path: if attempting to use the HTTP API, ensure the path starts with '/v1/'\n"
    )
