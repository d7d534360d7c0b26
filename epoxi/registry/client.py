"""The one way this project reaches its registry: Consul's HTTP API through py-consul.

Configuration follows Consul's own conventions: ``CONSUL_HTTP_ADDR`` (``host:port`` or
``scheme://host:port``), and the ACL token from ``CONSUL_HTTP_TOKEN_FILE`` (the file's content,
trimmed; it wins when both are set, as in Consul's ``api`` package) or ``CONSUL_HTTP_TOKEN``.

The token goes on every request as ``X-Consul-Token``: py-consul adds it to most calls, and the
transport here adds it to the few that py-consul sends bare (``agent.self``, ``agent.service``,
``agent.members``, ``status.*``), so every call path carries it. A registry that refuses the token
answers 403, which py-consul raises as ``ACLPermissionDenied`` (one of ``RegistryError``) with
Consul's text (``ACL not found``, ``Permission denied: ...``).

``connect(..., metrics=RegistryMetrics(registry))`` counts the calls that fail, by operation,
and the staleness of blocking-query answers (``epoxi.registry.metrics``) on the service's own
Prometheus registry; without it (the default) the client records nothing.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import consul.aio
from consul import ConsulException, base

from epoxi.registry.metrics import RegistryMetrics, is_blocking, operation

DEFAULT_ADDR = "127.0.0.1:8500"
TOKEN_HEADER = "X-Consul-Token"

# What a registry call raises when the registry is down, slow, or refuses the call.
RegistryError = (ConsulException, aiohttp.ClientError, OSError, TimeoutError)


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp transport, built without the connector arguments aiohttp deprecated."""

    def __init__(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> None:
        base.HTTPClient.__init__(self, host, port, scheme, verify, cert)
        ssl_arg: ssl.SSLContext | bool = False
        if scheme == "https":
            ssl_arg = ssl.create_default_context()
            if isinstance(verify, str):
                ssl_arg.load_verify_locations(verify)
            elif not verify:
                ssl_arg.check_hostname = False
                ssl_arg.verify_mode = ssl.CERT_NONE
            if cert:
                ssl_arg.load_cert_chain(*cert) if isinstance(cert, tuple) else ssl_arg.load_cert_chain(cert)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg))
        self.token: str | None = None
        self.metrics: RegistryMetrics | None = None

    async def _request(
        self, callback: Any, method: str, uri: str, headers: dict[str, str] | None, **kwargs: Any
    ) -> Any:
        if self.token and not (headers and TOKEN_HEADER in headers):
            headers = {**(headers or {}), TOKEN_HEADER: self.token}
        metrics = self.metrics
        if metrics is None:
            return await super()._request(callback, method, uri, headers, **kwargs)
        if is_blocking(method, uri):
            answered = callback

            def callback(response: base.Response) -> Any:
                metrics.blocking_answer(response.headers)
                return answered(response)

        try:
            return await super()._request(callback, method, uri, headers, **kwargs)
        except RegistryError:
            metrics.error(operation(method, uri))
            raise


class Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> Any:
        return _HTTPClient(host, port, scheme, verify=verify, cert=cert)


def parse_addr(addr: str) -> tuple[str, str, int]:
    """Split a ``CONSUL_HTTP_ADDR``-style address into (scheme, host, port)."""
    parsed = urllib.parse.urlsplit(addr if "//" in addr else "//" + addr)
    if not parsed.hostname:
        raise ValueError(
            f"registry address {addr!r} does not match <host>:<port> or <scheme>://<host>:<port>"
        )
    return parsed.scheme or "http", parsed.hostname, parsed.port or 8500


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The ACL token ``CONSUL_HTTP_TOKEN_FILE`` or ``CONSUL_HTTP_TOKEN`` gives, if any; a token
    file that cannot be read is a ValueError naming it."""
    env = os.environ if environ is None else environ
    path = env.get("CONSUL_HTTP_TOKEN_FILE")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"CONSUL_HTTP_TOKEN_FILE={path}: cannot read it: {exc.strerror}") from None
        if token:
            return token
    return env.get("CONSUL_HTTP_TOKEN") or None


def connect(
    addr: str | None = None, token: str | None = None, metrics: RegistryMetrics | None = None
) -> Consul:
    """A registry client for ``addr`` (default: ``$CONSUL_HTTP_ADDR``, then 127.0.0.1:8500) that
    sends ``token`` (default: ``token_from_env()``) on every call, and records its failures on
    ``metrics`` when given."""
    scheme, host, port = parse_addr(addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR)
    chosen = token or token_from_env()
    consul = Consul(host=host, port=port, scheme=scheme, token=chosen)
    # py-consul's constructor lets $CONSUL_HTTP_TOKEN override an explicit token; ours decides.
    consul.token = chosen
    consul.http.token = chosen
    consul.http.metrics = metrics if metrics is not None and metrics.on else None
    return consul
