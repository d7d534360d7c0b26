"""The parts of an HTTP request the gateway uses, each refused with a ``GatewayError`` when malformed.

* The path and query must be UTF-8 once percent-decoded (a ``%ff`` is not a character).
* The body may be at most ``max_request_bytes`` (the gateway's setting; after any
  Content-Encoding is undone): a larger one is ``413`` with RESOURCE_EXHAUSTED, the code gRPC
  gives a message over its size limit. A body whose encoding or framing is broken is ``400``.
* ``Authorization`` and ``Grpc-Metadata-<key>`` headers become gRPC metadata, as grpc-gateway
  passes them; keys must be gRPC keys and values printable ASCII, and a ``-bin`` key's value is
  base64 (padded or not), decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

import grpc
from aiohttp import web

from epoxi.validation import format_size
from gateway.errors import GatewayError

_METADATA_PREFIX = "grpc-metadata-"
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")


def check_path(raw_path: str) -> None:
    try:
        urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise _invalid(f"the path {raw_path} is not UTF-8 once percent-decoded") from None


def query(request: web.Request) -> list[tuple[str, str]]:
    """The query parameters in order, repeated ones repeated."""
    try:
        return urllib.parse.parse_qsl(
            request.rel_url.raw_query_string, keep_blank_values=True, errors="strict"
        )
    except UnicodeDecodeError:
        raise _invalid("the query string is not UTF-8 once percent-decoded") from None


async def body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body; the application's ``client_max_size`` must be ``max_bytes``."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes, f"of {declared} bytes ")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes, "") from None
    except web.RequestPayloadError:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request body cannot be read: its Content-Encoding or chunked framing is broken",
            close=True,
        ) from None


def metadata(request: web.Request) -> list[tuple[str, str | bytes]]:
    md: list[tuple[str, str | bytes]] = []
    for name, value in request.headers.items():
        key = name.lower()
        if key != "authorization":
            if not key.startswith(_METADATA_PREFIX) or len(key) == len(_METADATA_PREFIX):
                continue
            key = key.removeprefix(_METADATA_PREFIX)
        # Bare "-bin" is binary to grpcio but not to gRPC core, which then refuses the bytes.
        if not _METADATA_KEY.match(key) or key == "-bin":
            raise _invalid(f"header {name}: {key!r} is not a gRPC metadata key (0-9, a-z, '-', '_', '.')")
        if key.endswith("-bin"):
            md.append((key, _base64(name, value)))
        elif _METADATA_VALUE.match(value):
            md.append((key, value))
        else:
            raise _invalid(f"header {name}: a gRPC metadata value must be printable ASCII")
    return md


def _base64(name: str, value: str) -> bytes:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"header {name}: the value of a -bin key must be base64") from None


def _invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _too_large(max_bytes: int, size: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body {size}is larger than the gateway accepts: {format_size(max_bytes)} "
        "(max_request_bytes)",
        413,
    )
