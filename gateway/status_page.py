"""The operator's status page: ``GET /`` and its two assets under ``/static/``.

The page is plain HTML with one small script (``gateway/static``, shipped as package data)
that polls the gateway's own HTTP API and draws the mesh; nothing here calls a service. The
files are read once, when the routes are added, and served from memory: only the names in
``ASSETS`` exist, so no request path ever reaches the file system.

Every answer carries a Content-Security-Policy that allows scripts, styles and fetches from the
gateway alone (``'self'``), and ``Cache-Control: no-cache`` with an ETag, so a browser asks
again each time (a 304 when nothing changed) and never runs a page older than the gateway.
Other methods are 405 and unknown assets 404, each a ``google.rpc.Status`` with ``X-Request-Id``,
as every answer of the gateway's own.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from gateway import incoming
from gateway.errors import GatewayError

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
PAGE_FILE = "status.html"
# The served files and their media types; the page names the other two.
ASSETS = {
    PAGE_FILE: "text/html",
    "status.js": "text/javascript",
    "status.css": "text/css",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # data: only for the empty favicon
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def read(cls, name: str) -> Asset:
        body = (STATIC_DIR / name).read_bytes()
        return cls(body, ASSETS[name], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


class StatusPage:
    """The page and its assets, read from ``gateway/static`` once."""

    def __init__(self) -> None:
        self.assets = {name: Asset.read(name) for name in ASSETS}

    async def page(self, request: web.Request) -> web.StreamResponse:
        return _with_request_id(request, lambda: self._serve(request, self.assets[PAGE_FILE]))

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        # The page itself is served at / only.
        asset = self.assets.get(name) if name != PAGE_FILE else None
        return _with_request_id(request, lambda: self._serve(request, asset))

    def _serve(self, request: web.Request, asset: Asset | None) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.method} is not allowed on {request.rel_url.raw_path}; use GET",
                405,
                {"Allow": "GET"},
            )
        if asset is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for GET {request.rel_url.raw_path}")
        headers = {**_HEADERS, "ETag": asset.etag}
        if asset.etag in _etags(request.headers.get("If-None-Match", "")):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _with_request_id(request: web.Request, answer: Callable[[], web.Response]) -> web.Response:
    """``answer()``, or the GatewayError it raised as a response, with ``X-Request-Id`` set as
    the gateway's dispatcher sets it: the caller's, or a new one."""
    request_id = uuid.uuid4().hex
    try:
        request_id = incoming.request_id(request)
        response = answer()
    except GatewayError as e:
        response = e.response()
    response.headers[incoming.REQUEST_ID] = request_id
    return response


def add_routes(app: web.Application) -> StatusPage:
    """``/`` and ``/static/{name}``, ahead of the gateway's catch-all route."""
    page = StatusPage()
    app.router.add_route("*", PAGE_PATH, page.page)
    app.router.add_route("*", STATIC_PREFIX + "{name}", page.static)
    return page
