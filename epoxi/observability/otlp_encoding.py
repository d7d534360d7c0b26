"""Finished spans to OTLP protobuf bytes, written directly, for the exporter's hot path.

The OTLP exporter's own encoder (``opentelemetry-exporter-otlp-proto-common``) builds a protobuf
object for every span, attribute and value, about 37 µs a span here: with a span per delivery
attempt that is more CPU than the SMTP transaction it describes, spent on the exporter's thread
while it holds the GIL. ``encode`` writes the same message (``ExportTraceServiceRequest``,
opentelemetry-proto's ``trace/v1``) field by field instead, and reuses what repeats between
spans: the resource and scope, attribute keys, and values such as routing keys and host names.
The result parses to a message equal to the maintained encoder's (the tests compare them), so
``FastOTLPSpanExporter`` hands the exporter exactly what it would have sent; the exporter keeps
its transport, retries, and every ``OTEL_EXPORTER_OTLP_*`` setting.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

log = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_CACHE_LIMIT = 4096  # distinct (key, value) attributes remembered; message IDs never repeat


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    if n < 0:
        n += 1 << 64  # int64 negatives: ten bytes, two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key_value(tag: int, key: str, value: Any) -> bytes:
    """A ``KeyValue`` as field ``tag``."""
    return _field(tag, _field(0x0A, key.encode("utf-8")) + _field(0x12, _any_value(value)))


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: ``tag`` is the whole first byte(s) already (field << 3 | 2)."""
    return _varint(tag) + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``'s payload (None: an empty one)."""
    if value is None:
        return b""
    if isinstance(value, bool):  # before int: a bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8"))
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(0x32, b"".join(_key_value(0x0A, str(k), v) for k, v in value.items()))
    raise TypeError(f"unsupported attribute value {value!r}")


class _Attributes:
    """Encoded ``KeyValue`` fields of a given field number, remembered while they repeat."""

    def __init__(self, tag: int) -> None:
        self._tag = tag
        self._known: dict[tuple[str, type, Any], bytes] = {}

    def encode(self, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        known = self._known
        parts = []
        # The SDK's BoundedAttributes iterates in Python; the dict it wraps does not.
        items = getattr(attributes, "_dict", attributes).items()
        for key, value in items:
            # The type is part of the key: True == 1 == 1.0, and each encodes differently.
            remembered = (key, value.__class__, value)
            try:
                encoded, cacheable = known.get(remembered), True
            except TypeError:  # unhashable (a list): encoded each time
                encoded, cacheable = None, False
            if encoded is None:
                try:
                    encoded = _key_value(self._tag, key, value)
                except TypeError:
                    log.exception("cannot encode the attribute %s: left out", key)
                    continue
                if cacheable:
                    if len(known) >= _CACHE_LIMIT:
                        known.clear()
                    known[remembered] = encoded
            parts.append(encoded)
        return b"".join(parts)


class SpanEncoder:
    """``encode(spans)``: the serialized ``ExportTraceServiceRequest`` for ``spans``."""

    def __init__(self) -> None:
        self._span_attributes = _Attributes(0x4A)  # Span.attributes = 9
        self._event_attributes = _Attributes(0x1A)  # Event.attributes = 3
        self._link_attributes = _Attributes(0x22)  # Link.attributes = 4
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[int, tuple[Any, bytes]] = {}
        self._names: dict[str, bytes] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Resource -> scope -> spans, as the maintained encoder groups them.
        groups: dict[bytes, dict[bytes, list[bytes]]] = {}
        for span in spans:
            scopes = groups.setdefault(self._resource(span.resource), {})
            scopes.setdefault(self._scope(span.instrumentation_scope), []).append(self._span(span))
        return b"".join(
            _field(  # ExportTraceServiceRequest.resource_spans = 1
                0x0A,
                resource
                + b"".join(
                    _field(0x12, scope + b"".join(encoded))  # ResourceSpans.scope_spans = 2
                    for scope, encoded in scopes.items()
                ),
            )
            for resource, scopes in groups.items()
        )

    def _resource(self, resource: Any) -> bytes:
        """``Resource`` (field 1) and ``schema_url`` (field 3) of a ``ResourceSpans``."""
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            encoded = _field(0x0A, _encode_resource(resource).SerializeToString())
            if resource.schema_url:
                encoded += _field(0x1A, resource.schema_url.encode("utf-8"))
            cached = self._resources[id(resource)] = (resource, encoded)
        return cached[1]

    def _scope(self, scope: Any) -> bytes:
        """``InstrumentationScope`` (field 1) and ``schema_url`` (field 3) of a ``ScopeSpans``."""
        cached = self._scopes.get(id(scope))
        if cached is None or cached[0] is not scope:
            encoded = _field(0x0A, _encode_instrumentation_scope(scope).SerializeToString())
            if scope is not None and scope.schema_url:
                encoded += _field(0x1A, scope.schema_url.encode("utf-8"))
            cached = self._scopes[id(scope)] = (scope, encoded)
        return cached[1]

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None
        parent = span.parent
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            parts.append(_field(0x1A, state.encode("utf-8")))
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        name = self._names.get(span.name)
        if name is None:
            name = self._names[span.name] = _field(0x2A, span.name.encode("utf-8"))
        parts.append(name)
        kind = span.kind.value + 1  # SDK INTERNAL=0.. ; OTLP SPAN_KIND_INTERNAL=1..
        parts.append(b"\x30" + _varint(kind))
        parts.append(b"\x39" + _FIXED64(span.start_time or 0))
        parts.append(b"\x41" + _FIXED64(span.end_time or 0))
        parts.append(self._span_attributes.encode(span.attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            body = b"\x09" + _FIXED64(event.timestamp) + _field(0x12, event.name.encode("utf-8"))
            body += self._event_attributes.encode(event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, body))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            body += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            body += self._link_attributes.encode(link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _flags(link.context).to_bytes(4, "little")
            parts.append(_field(0x6A, body))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        body = b""
        if status.description:
            body += _field(0x12, status.description.encode("utf-8"))
        if status.status_code.value:
            body += b"\x18" + _varint(status.status_code.value)
        parts.append(_field(0x7A, body))  # present even when empty, as the SDK's encoder sends it
        parts.append(b"\x85\x01" + _flags(parent).to_bytes(4, "little"))
        return _field(0x12, b"".join(parts))  # ScopeSpans.spans = 2


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, with its request written by ``SpanEncoder``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(self._encoder.encode(data))
