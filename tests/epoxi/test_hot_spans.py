"""Hot-path spans are the SDK's spans: same parent, sampling, attributes, status, resource and
scope as ``Tracer.start_as_current_span`` gives, through the provider's own processors."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from epoxi.observability.hot_spans import HotSpans

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203332-00"


def provider(sampler: object | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    p = TracerProvider(resource=Resource.create({"service.name": "epoxi-test"}), sampler=sampler)  # type: ignore[arg-type]
    p.add_span_processor(SimpleSpanProcessor(exported))
    return p, exported


def sdk_span(p: TracerProvider, traceparent: str, attributes: dict[str, object]) -> ReadableSpan:
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    with p.get_tracer("epoxi").start_as_current_span(
        "smtp send",
        context=context,
        kind=SpanKind.CLIENT,
        attributes=attributes,  # type: ignore[arg-type]
    ) as span:
        span.set_attribute("epoxi.smtp.reply_code", 250)
    assert isinstance(span, ReadableSpan)
    return span


def test_a_hot_span_is_exported_as_the_sdk_would_export_it() -> None:
    p, exported = provider()
    attributes = {"epoxi.routing_key": "a.com_1_2_3_4", "epoxi.attempt": 1}
    expected = sdk_span(p, SAMPLED, dict(attributes))
    with HotSpans(p, "epoxi").child_of(
        SAMPLED, "smtp send", SpanKind.CLIENT, lambda: dict(attributes)
    ) as span:
        assert trace.get_current_span() is span
        span.set_attribute("epoxi.smtp.reply_code", 250)
    assert trace.get_current_span() is not span
    sdk, hot = exported.get_finished_spans()
    assert hot.name == sdk.name == "smtp send"
    assert hot.kind is SpanKind.CLIENT
    assert hot.parent == sdk.parent and hot.parent is not None and hot.parent.is_remote
    assert hot.context.trace_id == sdk.context.trace_id == expected.context.trace_id
    assert hot.context.span_id not in (0, sdk.context.span_id)
    assert hot.context.trace_flags.sampled
    assert dict(hot.attributes or {}) == dict(sdk.attributes or {})
    assert hot.resource == sdk.resource
    assert hot.instrumentation_scope == sdk.instrumentation_scope
    assert hot.status.status_code is StatusCode.UNSET
    assert hot.start_time is not None and hot.end_time is not None and hot.start_time <= hot.end_time


def test_children_of_a_hot_span_are_its_children() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").child_of(SAMPLED, "smtp send", SpanKind.CLIENT, dict) as parent:
        with p.get_tracer("epoxi").start_as_current_span("smtp connect"):
            pass
    child, sent = exported.get_finished_spans()
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
    assert sent.context.span_id == parent.get_span_context().span_id


def test_an_unsampled_parent_makes_an_unrecorded_span_and_unrecorded_children() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").child_of(UNSAMPLED, "smtp send", SpanKind.CLIENT, dict) as span:
        assert not span.is_recording()
        assert trace.get_current_span() is span
        with p.get_tracer("epoxi").start_as_current_span("smtp connect") as child:
            assert not child.is_recording()
    assert trace.get_current_span() is not span
    assert exported.get_finished_spans() == ()


def test_an_unsampled_parents_attempts_share_one_span_and_build_no_attributes() -> None:
    p, exported = provider()
    hot = HotSpans(p, "epoxi")

    def attributes() -> dict[str, object]:
        raise AssertionError("attributes built for a span that is not recorded")

    seen = []
    for _ in range(3):
        with hot.child_of(UNSAMPLED, "smtp send", SpanKind.CLIENT, attributes) as span:
            seen.append(span)
    assert seen[0] is seen[1] is seen[2]
    context = seen[0].get_span_context()
    assert context.trace_id == int(UNSAMPLED.split("-")[1], 16) and not context.trace_flags.sampled
    assert context.span_id != int(UNSAMPLED.split("-")[2], 16)  # a child of the stored span
    assert exported.get_finished_spans() == ()


def test_mail_stored_with_no_context_starts_a_trace_the_sampler_decides() -> None:
    p, exported = provider(ParentBased(TraceIdRatioBased(0.5)))
    hot = HotSpans(p, "epoxi")
    kept = 0
    for _ in range(400):
        with hot.child_of("", "smtp send", SpanKind.CLIENT, dict) as span:
            kept += span.is_recording()
    spans = exported.get_finished_spans()
    assert len(spans) == kept and 120 < kept < 280  # about half, and each a root of its own trace
    assert all(s.parent is None for s in spans)
    assert len({s.context.trace_id for s in spans}) == kept


def test_a_garbled_stored_context_starts_a_new_trace() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").child_of("00-nonsense", "smtp send", SpanKind.CLIENT, dict):
        pass
    (span,) = exported.get_finished_spans()
    assert span.parent is None and span.context.is_valid


def test_attributes_the_sdk_would_refuse_are_dropped_and_sequences_kept() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").child_of(SAMPLED, "smtp send", SpanKind.CLIENT, lambda: {"a": 1}) as span:
        span.set_attributes({"none": None, "dict": {"x": 1}, "list": ["a", "b"], "ok": True})
    (sent,) = exported.get_finished_spans()
    assert dict(sent.attributes or {}) == {"a": 1, "list": ("a", "b"), "ok": True}


def test_an_exception_marks_the_span_failed_and_still_ends_it() -> None:
    p, exported = provider()
    with pytest.raises(ConnectionResetError):
        with HotSpans(p, "epoxi").child_of(SAMPLED, "smtp send", SpanKind.CLIENT, dict):
            raise ConnectionResetError("peer went away")
    (sent,) = exported.get_finished_spans()
    assert sent.status.status_code is StatusCode.ERROR
    assert sent.status.description == "ConnectionResetError: peer went away"
    assert otel_context.get_current() == otel_context.Context()


def test_a_span_for_a_call_is_the_child_of_the_current_span_as_the_sdks_would_be() -> None:
    p, exported = provider()
    hot = HotSpans(p, "epoxi")
    with p.get_tracer("epoxi").start_as_current_span("RouteEmails") as root:
        with hot.span("route batch", SpanKind.INTERNAL, {"epoxi.routing_key": "a.com_1_2_3_4"}) as batch:
            assert trace.get_current_span() is batch
            with hot.span("EnqueueBatch", SpanKind.CLIENT, {}) as call:
                call.set_attribute("rpc.grpc.status_code", 0)
        with p.get_tracer("epoxi").start_as_current_span(
            "route batch", attributes={"epoxi.routing_key": "a.com_1_2_3_4"}
        ):
            pass
    enqueue, hot_batch, sdk_batch, route = exported.get_finished_spans()
    assert hot_batch.parent == sdk_batch.parent == root.get_span_context()
    assert enqueue.parent == batch.get_span_context() and enqueue.kind is SpanKind.CLIENT
    assert {s.context.trace_id for s in (enqueue, hot_batch, sdk_batch, route)} == {
        root.get_span_context().trace_id
    }
    assert dict(hot_batch.attributes or {}) == dict(sdk_batch.attributes or {})
    assert dict(enqueue.attributes or {}) == {"rpc.grpc.status_code": 0}
    assert (
        hot_batch.resource is sdk_batch.resource
        and hot_batch.instrumentation_scope == sdk_batch.instrumentation_scope
    )
    assert hot_batch.start_time is not None and hot_batch.end_time is not None
    assert hot_batch.start_time <= enqueue.start_time <= enqueue.end_time <= hot_batch.end_time  # type: ignore[operator]


def test_a_span_in_a_given_context_takes_its_remote_parent_and_the_samplers_word() -> None:
    p, exported = provider(ParentBased(TraceIdRatioBased(1.0)))
    hot = HotSpans(p, "epoxi")
    sampled = TraceContextTextMapPropagator().extract({"traceparent": SAMPLED})
    unsampled = TraceContextTextMapPropagator().extract({"traceparent": UNSAMPLED})
    with hot.span("node.v1.NodeService/EnqueueBatch", SpanKind.SERVER, {}, sampled) as kept:
        assert kept.is_recording()
    with hot.span("node.v1.NodeService/EnqueueBatch", SpanKind.SERVER, {}, unsampled) as dropped:
        assert not dropped.is_recording()
        assert not dropped.get_span_context().trace_flags.sampled
        assert dropped.get_span_context().trace_id == int(UNSAMPLED.split("-")[1], 16)
    (span,) = exported.get_finished_spans()
    assert span.parent is not None and span.parent.is_remote
    assert span.parent.span_id == int(SAMPLED.split("-")[2], 16)
    assert span.kind is SpanKind.SERVER


def test_a_span_with_no_parent_starts_a_trace() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").span("smtp ingress", SpanKind.SERVER, {}):
        pass
    (span,) = exported.get_finished_spans()
    assert span.parent is None and span.context.is_valid and span.context.trace_flags.sampled


@pytest.mark.parametrize(("records", "marks"), [(True, True), (False, False), (True, False)])
def test_a_spans_exception_flags_do_what_the_sdks_of_the_same_name_do(records: bool, marks: bool) -> None:
    p, exported = provider()
    for make in (
        lambda: HotSpans(p, "epoxi").span(
            "x", SpanKind.INTERNAL, {}, record_exception=records, set_status_on_exception=marks
        ),
        lambda: p.get_tracer("epoxi").start_as_current_span(
            "x", record_exception=records, set_status_on_exception=marks
        ),
    ):
        with pytest.raises(ValueError):
            with make():
                raise ValueError("bad input")
    hot, sdk = exported.get_finished_spans()
    assert hot.status.status_code is sdk.status.status_code
    assert hot.status.description == sdk.status.description
    assert [e.name for e in hot.events] == [e.name for e in sdk.events] == (["exception"] if records else [])
    if records:
        for key in ("exception.type", "exception.message", "exception.escaped"):
            assert hot.events[0].attributes[key] == sdk.events[0].attributes[key]  # type: ignore[index]
        assert "ValueError: bad input" in hot.events[0].attributes["exception.stacktrace"]  # type: ignore[index,operator]


def test_spans_go_to_the_processor_named_for_them_only() -> None:
    p, everyone = provider()
    named = InMemorySpanExporter()
    hot = HotSpans(p, "epoxi", SimpleSpanProcessor(named))
    with hot.child_of(SAMPLED, "smtp send", SpanKind.CLIENT, dict), hot.span("bounce", SpanKind.INTERNAL, {}):
        pass
    assert [s.name for s in named.get_finished_spans()] == ["bounce", "smtp send"]
    assert everyone.get_finished_spans() == ()


def test_set_attributes_keeps_plain_values_and_drops_what_otel_allows_not() -> None:
    p, exported = provider()
    with HotSpans(p, "epoxi").child_of(SAMPLED, "smtp send", SpanKind.CLIENT, dict) as span:
        span.set_attributes({"a": 1, "b": "x", "c": [1, 2], "d": {"no": "maps"}, "e": True})
    span.set_attributes({"late": 1})  # ended: ignored
    [ended] = exported.get_finished_spans()
    assert dict(ended.attributes or {}) == {"a": 1, "b": "x", "c": (1, 2), "e": True}
