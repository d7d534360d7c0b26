"""The parts of an HTTP request the gateway uses, each refused with a ``GatewayError`` when malformed.

* The path and query must be UTF-8 once percent-decoded (a ``%ff`` is not a character).
* The body may be at most ``max_request_bytes`` (the gateway's setting; after any
  Content-Encoding is undone): a larger one is ``413`` with RESOURCE_EXHAUSTED, the code gRPC
  gives a message over its size limit. A body whose encoding or framing is broken is ``400``.
* ``Authorization`` and ``Grpc-Metadata-<key>`` headers become gRPC metadata, as grpc-gateway
  passes them; keys must be gRPC keys and values printable ASCII, and a ``-bin`` key's value is
  base64 (padded or not), decoded.
* ``Idempotency-Key`` becomes ``idempotency-key`` (printable ASCII, at most 255 characters) and
  ``X-Request-Id`` becomes ``x-request-id`` (the same rule; one is made up when it is absent,
  and every response carries it back).
* W3C Trace Context: a valid ``traceparent`` is passed on as ``traceparent``, with
  ``tracestate``; an invalid one is dropped with its ``tracestate``, as the recommendation says
  a receiver does (it then starts a new trace).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
import uuid

import grpc
from aiohttp import web

from epoxi.validation import format_size
from gateway.errors import GatewayError

_METADATA_PREFIX = "grpc-metadata-"
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")
# Headers passed on under their own (lower-case) name, and the longest value each may have.
_PASSED = {"idempotency-key": 255, "x-request-id": 255}
REQUEST_ID = "X-Request-Id"
# version "-" trace-id "-" parent-id "-" trace-flags, lower-case hex (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
# Metadata the gateway sets from headers of their own; Grpc-Metadata- may not set them too.
_OWN_HEADERS = {
    "idempotency-key": "Idempotency-Key",
    "x-request-id": REQUEST_ID,
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}


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


def request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id``, or a new random one; GatewayError when it cannot be metadata."""
    given = request.headers.getall(REQUEST_ID, [])
    if not given:
        return uuid.uuid4().hex
    if len(given) > 1:
        raise _invalid(f"header {REQUEST_ID} is given {len(given)} times; give it once")
    return _passed_value(REQUEST_ID, given[0])


def _passed_value(name: str, value: str) -> str:
    limit = _PASSED[name.lower()]
    if not value or not _METADATA_VALUE.match(value):
        raise _invalid(f"header {name}: the value must be 1 to {limit} printable ASCII characters")
    if len(value) > limit:
        raise _invalid(f"header {name}: the value is {len(value)} characters long; at most {limit}")
    return value


def trace_context(request: web.Request) -> list[tuple[str, str]]:
    """``traceparent`` and ``tracestate`` as metadata; nothing when traceparent is absent or invalid."""
    parents = request.headers.getall("traceparent", [])
    if len(parents) != 1 or not valid_traceparent(parents[0]):
        return []
    md = [("traceparent", parents[0])]
    # Several tracestate headers are one list (RFC 9110 field combination).
    state = ",".join(request.headers.getall("tracestate", []))
    if state and _METADATA_VALUE.match(state):
        md.append(("tracestate", state))
    return md


def valid_traceparent(value: str) -> bool:
    m = _TRACEPARENT.match(value)
    if m is None:
        return False
    version, trace_id, parent_id, _, rest = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return False
    # Version 00 has exactly four fields; a later version may append more after a "-".
    return not (version == "00" and rest)


def metadata(request: web.Request, request_id: str) -> list[tuple[str, str | bytes]]:
    """The gRPC metadata of the call: the headers above, and ``x-request-id``."""
    md: list[tuple[str, str | bytes]] = [("x-request-id", request_id), *trace_context(request)]
    keys = request.headers.getall("Idempotency-Key", [])
    if len(keys) > 1:
        raise _invalid(f"header Idempotency-Key is given {len(keys)} times; give it once")
    if keys:
        md.append(("idempotency-key", _passed_value("Idempotency-Key", keys[0])))
    for name, value in request.headers.items():
        key = name.lower()
        if key != "authorization":
            if not key.startswith(_METADATA_PREFIX) or len(key) == len(_METADATA_PREFIX):
                continue
            key = key.removeprefix(_METADATA_PREFIX)
            if key in _OWN_HEADERS:
                raise _invalid(f"header {name}: send {_OWN_HEADERS[key]} as the header of that name")
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
