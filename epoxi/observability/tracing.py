"""Traces: one OpenTelemetry tracer provider per process, exporting over OTLP when asked to.

``configure`` installs the SDK's provider only when the standard variables ask for an exporter
(``OTEL_TRACES_EXPORTER=otlp``, or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` with no exporter named) and ``OTEL_SDK_DISABLED`` is not
``true``. The exporter (the SDK's OTLP/gRPC one, with its request written by
``otlp_encoding``), its endpoint, headers and TLS, the batch processor and the sampler read
the rest of the ``OTEL_*`` variables themselves. Without one, ``tracer`` hands out
non-recording spans and the gRPC interceptors are not installed, so tracing costs next to nothing.

Context travels as W3C ``traceparent`` (gRPC metadata, HTTP headers), and is stored with spooled
mail as that same string (``traceparent``); a delivery attempt's span is the child of the stored
one (``child_of``, built by ``hot_spans`` for the hot path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from epoxi.observability.hot_spans import HotSpans

log = logging.getLogger(__name__)

_proxy = trace.get_tracer("epoxi")
tracer: trace.Tracer = _proxy  # the SDK's own tracer once configured: a proxy costs a call a span
_propagator = TraceContextTextMapPropagator()
_provider: object | None = None  # the SDK's TracerProvider, once configured
_hot: HotSpans | None = None


def wanted() -> bool:
    """Whether the environment asks for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return "otlp" in {e.strip() for e in exporters.split(",")}
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def enabled() -> bool:
    """Whether this process records and exports spans."""
    return _provider is not None


def configure(service_name: str, instance_id: str | None = None) -> bool:
    """Export this process's spans over OTLP/gRPC as ``service_name`` (``OTEL_SERVICE_NAME``
    overrides it), if the environment asks for it (``wanted``); True when it does."""
    global _provider, _hot, tracer
    if _provider is not None:
        return True
    if not wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from epoxi.observability.hot_spans import HotSpans
    from epoxi.observability.otlp_encoding import FastOTLPSpanExporter

    attributes: dict[str, str] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attributes))
    processor = BatchSpanProcessor(FastOTLPSpanExporter())
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    _hot = HotSpans(provider, "epoxi", processor)
    tracer = provider.get_tracer("epoxi")
    log.info("tracing: exporting spans over OTLP as %s", service_name)
    return True


def shutdown() -> None:
    """Export what is still buffered, and stop (at the end of a process)."""
    global _provider, _hot, tracer
    provider, _provider, _hot, tracer = _provider, None, None, _proxy
    if provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]


def traceparent() -> str:
    """The current span's context as a W3C ``traceparent``; empty when there is no recording span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def child_of(
    traceparent: str, name: str, kind: SpanKind, attributes: Callable[[], dict[str, Any]]
) -> AbstractContextManager[trace.Span]:
    """A span that is current while the block runs, the child of a stored ``traceparent`` (mail
    spooled with none, while tracing was off, starts a trace of its own); tracing must be on.
    ``attributes`` is called only for a span that is recorded (or a root, for its sampler)."""
    assert _hot is not None, "tracing is off"
    return _hot.child_of(traceparent, name, kind, attributes)


def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    context: otel_context.Context | None = None,
    *,
    record_exception: bool = True,
    set_status_on_exception: bool = True,
) -> AbstractContextManager[trace.Span]:
    """``tracer.start_as_current_span`` with the same arguments, built by ``hot_spans`` (a
    fifth of the SDK's cost) while tracing is on; ``attributes`` becomes the span's own dict."""
    if _hot is None:
        return tracer.start_as_current_span(
            name,
            context,
            kind,
            attributes,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        )
    return _hot.span(
        name,
        kind,
        {} if attributes is None else attributes,
        context,
        record_exception=record_exception,
        set_status_on_exception=set_status_on_exception,
    )


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """Add the current context (``traceparent``, ``tracestate``) to ``carrier``."""
    _propagator.inject(carrier)
    return carrier


def extract(carrier: dict[str, str]) -> otel_context.Context:
    return _propagator.extract(carrier)


def trace_id() -> str:
    """The current trace's ID in hex, for logs; empty outside a recording span."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
