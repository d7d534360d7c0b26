"""The one way this project reaches its registry: Consul's HTTP API through py-consul.

Configuration follows Consul's own conventions: ``CONSUL_HTTP_ADDR`` (``host:port`` or
``scheme://host:port``) and ``CONSUL_HTTP_TOKEN``.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from typing import Any

import aiohttp
import consul.aio
from consul import ConsulException, base

DEFAULT_ADDR = "127.0.0.1:8500"

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


def connect(addr: str | None = None, token: str | None = None) -> Consul:
    """A registry client for ``addr`` (default: ``$CONSUL_HTTP_ADDR``, then 127.0.0.1:8500)."""
    scheme, host, port = parse_addr(addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR)
    return Consul(host=host, port=port, scheme=scheme, token=token or os.environ.get("CONSUL_HTTP_TOKEN"))
