"""Spans for the delivery hot path, built without the SDK's per-span machinery.

A node records one span per delivery attempt. The SDK's ``Tracer.start_span`` costs about 30 µs
a span here: it validates every attribute through ``BoundedAttributes`` (a lock and a type walk
per value), asks the sampler, builds its ``Span`` under a lock, and ``use_span`` wraps it in two
generator context managers. Against about 0.19 ms of node CPU for the whole message, that was
most of what tracing cost.

``HotSpans`` makes the same spans for about a fifth of that: the sampler is asked once per
stored ``traceparent`` (a batch's messages share one, and every sampler the SDK ships decides
from the parent and the trace ID alone; an unsampled one's attempts share one non-recording span,
so each costs a context attached and detached, and nothing more), attributes go into a plain
dict (the callers set strings, ints and bools; anything else is dropped as the SDK would), the
span is made current without ``use_span``'s generators, and the span is itself an SDK
``ReadableSpan``, handed to the span processors like any other when it ends (to the batch
processor ``tracing.configure`` installs, when it names it). So the batch processor, the
exporter and every ``OTEL_*`` setting treat it exactly as an SDK span.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util import types

_UNSET = Status(StatusCode.UNSET)
_DECISIONS_KEPT = 1024  # stored traceparents remembered; a batch's messages share one
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RECORDING = frozenset((Decision.RECORD_ONLY, Decision.RECORD_AND_SAMPLE))
_PLAIN_TYPES = (str, bool, int, float)
_PLAIN = frozenset(_PLAIN_TYPES)


def _clean(value: Any) -> Any:
    """``value`` as an attribute value, or None when OpenTelemetry allows no such value."""
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if all(isinstance(v, _PLAIN_TYPES) for v in value):
            return tuple(value)
    return None


class HotSpan(trace.Span, ReadableSpan):
    """A recording span that is its own ``ReadableSpan`` for the processors when it ends (the
    SDK's ``Span`` is both as well), so ending it copies nothing."""

    def __init__(
        self,
        processor: SpanProcessor,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        resource: Resource,
        scope: InstrumentationScope,
    ) -> None:
        # ReadableSpan's fields, by the names its properties read.
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_info = None
        self._instrumentation_scope = scope
        self._parent = parent
        self._start_time = time.time_ns()
        self._end_time: int | None = None
        self._attributes = attributes
        self._own = attributes  # the same dict, typed as the one this span writes
        self._span_context = context
        # Most spans get no event or link: no list is made for them until one comes.
        self._events: Sequence[Event] = ()
        self._links: Sequence[Link] = ()
        self._resource = resource
        self._status = _UNSET
        self._processor = processor

    def get_span_context(self) -> SpanContext:
        return self._span_context

    # Nothing is dropped from a hot span (ReadableSpan's own checks walk the ABCs per span).
    @property
    def dropped_attributes(self) -> int:
        return 0

    @property
    def dropped_events(self) -> int:
        return 0

    @property
    def dropped_links(self) -> int:
        return 0

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is not None:
            return
        if value.__class__ not in _PLAIN:  # the callers' own values are plain: checked once
            value = _clean(value)
            if value is None:
                return
        self._own[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is not None:
            return
        own = self._own
        for key, value in attributes.items():
            if value.__class__ not in _PLAIN:
                value = _clean(value)
                if value is None:
                    continue
            own[key] = value

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events = (*self._events, Event(name, attributes, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is None:
            self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event(
            "exception",
            {
                "exception.type": type(exception).__qualname__,
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": str(escaped),  # a string, as the SDK records it
                **(attributes or {}),
            },
            timestamp,
        )

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is None:
            self._end_time = end_time or time.time_ns()
            self._processor.on_end(self)


class _Current:
    """``span`` current while the block runs (in ``context``, when it was made already) and
    ended after it: ``trace.use_span`` without its two generator context managers. An exception
    sets the span's status (``marks``) and adds it as an event (``records``), as the SDK's
    ``start_as_current_span`` flags of those names do."""

    __slots__ = ("_context", "_marks", "_records", "_span", "_token")

    def __init__(
        self,
        span: trace.Span,
        context: otel_context.Context | None = None,
        marks: bool = True,
        records: bool = False,
    ) -> None:
        self._span = span
        self._context = context
        self._marks = marks
        self._records = records

    def __enter__(self) -> trace.Span:
        context = self._context if self._context is not None else trace.set_span_in_context(self._span)
        self._token = otel_context.attach(context)
        return self._span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if isinstance(error, Exception):
            if self._records:
                self._span.record_exception(error)
            if self._marks:
                self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        otel_context.detach(self._token)
        self._span.end()


class _Decision(NamedTuple):
    """The sampler's word on the children of a stored ``traceparent``."""

    parent: SpanContext | None
    sampled: bool
    trace_state: Any
    # Unsampled, nothing of the trace is recorded, so its attempts all run as one non-recording
    # span, made once, in a context of their own (a lane's holds nothing else).
    unsampled: trace.NonRecordingSpan | None = None
    unsampled_context: otel_context.Context | None = None


class HotSpans:
    """Hot-path spans on ``provider``'s resource, sampler, ID generator and processors."""

    def __init__(
        self, provider: TracerProvider, scope_name: str, processor: SpanProcessor | None = None
    ) -> None:
        """``processor``: where the spans go when they start and end; by default every
        processor of ``provider``, as the SDK's spans do (``tracing.configure`` names its one
        batch processor, sparing each span the provider's loop over its processors)."""
        self.resource = provider.resource
        self.scope = provider.get_tracer(scope_name)._instrumentation_scope  # type: ignore[attr-defined]
        self._processor = processor or provider._active_span_processor
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self._propagator = TraceContextTextMapPropagator()
        # Stored traceparent -> the decision on its children (a call site's name and kind do not
        # change, and a plain dict spares hashing the SpanKind enum on every attempt).
        self._decisions: dict[str, _Decision] = {}

    def child_of(
        self, traceparent: str, name: str, kind: SpanKind, attributes: Callable[[], dict[str, Any]]
    ) -> AbstractContextManager[trace.Span]:
        """The current span while the block runs: ``name``, the child of a stored
        ``traceparent`` (a new trace when it names none), ended when the block ends.
        ``attributes`` is called only when the span is recorded, or is a root (its sampler)."""
        if traceparent:
            parent, sampled, trace_state, unsampled, unsampled_context = self._decided(
                traceparent, name, kind
            )
            if unsampled is not None:
                return _Current(unsampled, unsampled_context)
            if parent is not None:
                span = self._new(
                    name, kind, attributes(), parent.trace_id, parent, sampled, sampled, trace_state, None
                )
                return _Current(span)
        # A root (mail spooled with no trace, or an unreadable traceparent): a new trace, asked of
        # the sampler each time.
        return self.span(name, kind, attributes(), otel_context.Context(), record_exception=False)

    def span(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        context: otel_context.Context | None = None,
        *,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> AbstractContextManager[trace.Span]:
        """``Tracer.start_as_current_span`` for the calls made per batch: a span that is current
        while the block runs, the child of the span current in ``context`` (by default the
        current context), ended when the block ends; ``attributes`` becomes the span's own."""
        parent_context = otel_context.get_current() if context is None else context
        parent: SpanContext | None = trace.get_current_span(parent_context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
        else:
            parent, trace_id = None, self._ids.generate_trace_id()
        result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes)
        span = self._new(
            name,
            kind,
            attributes,
            trace_id,
            parent,
            result.decision is Decision.RECORD_AND_SAMPLE,
            result.decision in _RECORDING,
            result.trace_state,
            parent_context,
        )
        return _Current(span, None, set_status_on_exception, record_exception)

    def _new(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        trace_id: int,
        parent: SpanContext | None,
        sampled: bool,
        recording: bool,
        trace_state: Any,
        parent_context: otel_context.Context | None,
    ) -> trace.Span:
        """A span of ``trace_id`` with a new span ID: a ``HotSpan`` the processors are told of
        when ``recording``, else a non-recording one."""
        context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED if sampled else _UNSAMPLED,
            trace_state=trace_state,
        )
        if not recording:
            return trace.NonRecordingSpan(context)
        span = HotSpan(self._processor, name, context, parent, kind, attributes, self.resource, self.scope)
        self._processor.on_start(span, parent_context)  # type: ignore[arg-type]  # processors take any span
        return span

    def _decided(self, traceparent: str, name: str, kind: SpanKind) -> _Decision:
        decided = self._decisions.get(traceparent)
        if decided is None:
            if len(self._decisions) >= _DECISIONS_KEPT:
                self._decisions.clear()
            decided = self._decisions[traceparent] = self._decide(traceparent, name, kind)
        return decided

    def _decide(self, traceparent: str, name: str, kind: SpanKind) -> _Decision:
        """The parent a stored ``traceparent`` names and the sampler's word on its children."""
        context = self._propagator.extract({"traceparent": traceparent})
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            return _Decision(None, False, None)
        result = self._sampler.should_sample(context, parent.trace_id, name, kind)
        if result.decision is Decision.RECORD_AND_SAMPLE:
            return _Decision(parent, True, result.trace_state)
        span = trace.NonRecordingSpan(
            SpanContext(
                parent.trace_id,
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=_UNSAMPLED,
                trace_state=result.trace_state,
            )
        )
        return _Decision(
            parent, False, result.trace_state, span, trace.set_span_in_context(span, otel_context.Context())
        )
