"""Finished spans to OTLP protobuf bytes, written directly, for the exporter's hot path.

The OTLP exporter's own encoder (``opentelemetry-exporter-otlp-proto-common``) builds a protobuf
object for every span, attribute and value, about 37 µs a span here: with a span per delivery
attempt that is more CPU than the SMTP transaction it describes, spent on the exporter's thread
while it holds the GIL. ``encode`` writes the same message (``ExportTraceServiceRequest``,
opentelemetry-proto's ``trace/v1``) field by field instead, and reuses what repeats between
spans: the resource and scope, attribute keys, and values such as routing keys and host names.
The result parses to a message equal to the maintained encoder's (the tests compare them), so
``FastOTLPSpanExporter`` sends exactly what the exporter would have sent; the exporter keeps
its channel, retries, headers, compression and every ``OTEL_EXPORTER_OTLP_*`` setting.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

log = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano (7) and end_time_unix_nano (8)
# Span.flags (16): whether the parent is remote.
_LOCAL_FLAGS = b"\x85\x01" + _FLAGS_HAS_IS_REMOTE.to_bytes(4, "little")
_REMOTE_FLAGS = b"\x85\x01" + (_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE).to_bytes(4, "little")
_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_KEYS_KEPT = 1024  # attribute keys remembered
_DISTINCT_KEPT = 256  # values remembered per key; a key with more is encoded each time
_NEW: Any = object()


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
    """Encoded ``KeyValue`` fields of a given field number, remembered while they repeat.

    A key is remembered per value until it has shown ``_DISTINCT_KEPT`` distinct values: past
    that (a message ID, say) its values are taken not to repeat and are encoded each time, so
    they never crowd out the values that do."""

    def __init__(self, tag: int) -> None:
        self._tag = tag
        # key -> (value's type, value) -> encoded; None once the key is past _DISTINCT_KEPT.
        self._known: dict[str, dict[tuple[type, Any], bytes] | None] = {}

    def encode(self, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        known = self._known
        parts = []
        # The SDK's BoundedAttributes iterates in Python; the dict it wraps does not.
        items = getattr(attributes, "_dict", attributes).items()
        for key, value in items:
            values = known.get(key, _NEW)
            if values is _NEW:
                if len(known) >= _KEYS_KEPT:
                    known.clear()
                values = known[key] = {}
            # The type is part of the key: True == 1 == 1.0, and each encodes differently.
            remembered: tuple[type, Any] | None = (value.__class__, value)
            encoded = None
            if values is not None:
                try:
                    encoded = values.get(remembered)
                except TypeError:  # unhashable (a list): encoded each time
                    remembered = None
            if encoded is None:
                try:
                    encoded = _key_value(self._tag, key, value)
                except TypeError:
                    log.exception("cannot encode the attribute %s: left out", key)
                    continue
                if values is not None and remembered is not None:
                    if len(values) >= _DISTINCT_KEPT:
                        known[key] = None
                    else:
                        values[remembered] = encoded
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
        self._names: dict[tuple[str, Any], bytes] = {}  # (name, kind) -> their fields

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Resource -> scope -> spans, as the maintained encoder groups them; a batch's spans
        # mostly share both, so each span is looked up only when they change.
        groups: dict[bytes, dict[bytes, list[bytes]]] = {}
        last: tuple[Any, Any] | None = None
        into: list[bytes] = []
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope
            if last is None or last[0] is not resource or last[1] is not scope:
                scopes = groups.setdefault(self._resource(resource), {})
                into = scopes.setdefault(self._scope(scope), [])
                last = (resource, scope)
            into.append(self._span(span))
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
        # trace_id (1) and span_id (2), 16 and 8 bytes, are the fixed opening of every span.
        head = (
            b"\x0a\x10"
            + context.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + context.span_id.to_bytes(8, "big")
        )
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            head += _field(0x1A, state.encode("utf-8"))
        if parent is not None:
            head += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
        named = self._names.get((span.name, span.kind))
        if named is None:
            # name (5) and kind (6): SDK INTERNAL=0.., OTLP SPAN_KIND_INTERNAL=1..
            named = _field(0x2A, span.name.encode("utf-8")) + b"\x30" + _varint(span.kind.value + 1)
            self._names[span.name, span.kind] = named
        parts = [
            head,
            named,
            _TIMES(0x39, span.start_time or 0, 0x41, span.end_time or 0),
            self._span_attributes.encode(span.attributes),
        ]
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        events = span.events
        for event in events:
            body = b"\x09" + _FIXED64(event.timestamp) + _field(0x12, event.name.encode("utf-8"))
            body += self._event_attributes.encode(event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, body))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        links = span.links
        for link in links:
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
        if status.description or status.status_code.value:
            body = b""
            if status.description:
                body += _field(0x12, status.description.encode("utf-8"))
            if status.status_code.value:
                body += b"\x18" + _varint(status.status_code.value)
            parts.append(_field(0x7A, body))
        else:
            parts.append(b"\x7a\x00")  # present even when empty, as the SDK's encoder sends it
        parts.append(_REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS)
        return _field(0x12, b"".join(parts))  # ScopeSpans.spans = 2


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


class _EncodedExport:
    """``TraceServiceStub`` for requests already serialized: its ``Export`` sends the bytes
    as they are, with the same method, response type and call options."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,  # the request is the encoder's bytes
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, with its request written by ``SpanEncoder`` and sent as
    written (not parsed into a message to be serialized again)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()
        # The exporter makes its stub from this class, now and whenever it reconnects.
        self._stub = _EncodedExport
        self._client = _EncodedExport(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return self._encoder.encode(data)
