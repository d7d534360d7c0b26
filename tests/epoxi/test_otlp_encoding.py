"""The hand-written OTLP encoder against the maintained one: the same spans, equal messages."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from devmesh.otlp import OtlpReceiver
from epoxi.observability.hot_spans import HotSpans
from epoxi.observability.otlp_encoding import FastOTLPSpanExporter, SpanEncoder

REMOTE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Kept(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def provider(kept: Kept, **resource: str) -> TracerProvider:
    p = TracerProvider(resource=Resource.create(resource))
    p.add_span_processor(SimpleSpanProcessor(kept))
    return p


def assert_same(spans: Sequence[ReadableSpan], encoder: SpanEncoder | None = None) -> None:
    ours = ExportTraceServiceRequest.FromString((encoder or SpanEncoder()).encode(spans))
    assert ours == encode_spans(spans)


def test_spans_of_every_shape_encode_as_the_sdk_encodes_them() -> None:
    kept = Kept()
    tracer = provider(kept, **{"service.name": "node", "service.instance.id": "node1"}).get_tracer("epoxi")
    remote = TraceContextTextMapPropagator().extract({"traceparent": REMOTE, "tracestate": "a=1,b=2"})
    with tracer.start_as_current_span("root"):
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_attributes(
                {
                    "s": "gmail.com_127_0_0_2",
                    "utf8": "Grüße ✉",
                    "i": 2525,
                    "big": 2**62,
                    "neg": -7,
                    "zero": 0,
                    "f": 0.25,
                    "t": True,
                    "no": False,
                    "strings": ["a", "b"],
                    "ints": [1, -2, 3],
                    "floats": [1.5],
                    "bools": [True, False],
                    "empty": [],
                    "": "empty key",
                }
            )
            child.add_event("fallback", {"epoxi.node": "node2", "n": 3})
            child.add_event("bare")
            child.set_status(Status(StatusCode.ERROR, "deferred: 421 4.7.0 try later"))
        with tracer.start_as_current_span("ok") as ok:
            ok.set_status(Status(StatusCode.OK))
    link = Link(trace.get_current_span(remote).get_span_context(), {"why": "handed over"})
    for kind in SpanKind:
        with tracer.start_as_current_span(f"remote {kind.name}", context=remote, kind=kind, links=[link]):
            pass
    assert len(kept.spans) == 3 + len(SpanKind)
    assert_same(kept.spans)


def test_spans_of_several_resources_and_scopes_group_as_the_sdk_groups_them() -> None:
    kept = Kept()
    one, two = provider(kept, **{"service.name": "router"}), provider(kept, **{"service.name": "node"})
    for p in (one, two, one):
        for scope in ("epoxi", "epoxi.grpc", "epoxi"):
            with p.get_tracer(scope, "1.0", schema_url="https://opentelemetry.io/schemas/1.26.0").start_span(
                "x"
            ):
                pass
    assert_same(kept.spans)


def test_what_the_encoder_remembers_never_mixes_values_that_compare_equal() -> None:
    """True == 1 == 1.0 in Python; each is a different AnyValue on the wire."""
    kept = Kept()
    tracer = provider(kept, **{"service.name": "node"}).get_tracer("epoxi")
    encoder = SpanEncoder()
    for value in (1, True, 1.0, "1", 1, True):
        with tracer.start_as_current_span("v", attributes={"k": value}):
            pass
        assert_same(kept.spans[-1:], encoder)
    assert_same(kept.spans, encoder)


def test_an_empty_batch_is_an_empty_request() -> None:
    assert SpanEncoder().encode([]) == b""
    assert ExportTraceServiceRequest.FromString(b"") == encode_spans([])


@pytest.mark.parametrize("n", [1, 600])
def test_many_spans_in_one_request(n: int) -> None:
    kept = Kept()
    tracer = provider(kept, **{"service.name": "node"}).get_tracer("epoxi")
    for i in range(n):
        with tracer.start_as_current_span(
            "smtp send",
            kind=SpanKind.CLIENT,
            attributes={"epoxi.message_id": f"{i:032x}", "epoxi.attempt": i % 7 + 1},
        ):
            pass
    assert_same(kept.spans)


def test_a_key_whose_values_never_repeat_still_encodes_every_value() -> None:
    """Past the values it remembers for a key (message IDs), the encoder encodes them afresh."""
    kept = Kept()
    tracer = provider(kept, **{"service.name": "node"}).get_tracer("epoxi")
    encoder = SpanEncoder()
    for n in range(600):
        with tracer.start_as_current_span("smtp send", attributes={"epoxi.message_id": f"m{n}", "port": 25}):
            pass
    for start in range(0, 600, 100):
        assert_same(kept.spans[start : start + 100], encoder)
    assert_same(kept.spans[:3], encoder)  # remembered once, and again after the key gave up


def test_hot_spans_encode_as_the_sdk_encodes_them() -> None:
    kept = Kept()
    p = provider(kept, **{"service.name": "node"})
    hot = HotSpans(p, "epoxi")
    with hot.child_of(REMOTE, "smtp send", SpanKind.CLIENT, lambda: {"epoxi.attempt": 1}) as span:
        span.set_attributes({"server.address": "mx.example.com", "server.port": 25})
    with pytest.raises(ValueError):
        with hot.span("spool commit", SpanKind.INTERNAL, {"epoxi.messages": 3}):
            raise ValueError("disk full")
    assert len(kept.spans) == 2 and kept.spans[1].events
    assert_same(kept.spans)


async def test_the_exporter_sends_the_encoded_request_to_a_collector_and_again_after_a_reconnect() -> None:
    receiver = OtlpReceiver()
    address = await receiver.start()
    kept = Kept()
    tracer = provider(kept, **{"service.name": "node"}).get_tracer("epoxi")
    with tracer.start_as_current_span("smtp send", attributes={"epoxi.message_id": "m1"}):
        pass
    exporter = FastOTLPSpanExporter(endpoint=f"http://{address}", insecure=True, timeout=5)
    try:
        assert await asyncio.to_thread(exporter.export, kept.spans) is SpanExportResult.SUCCESS
        (span,) = receiver.spans
        assert span.name == "smtp send" and span.attributes == {"epoxi.message_id": "m1"}
        assert span.service == "node"
        exporter._initialize_channel_and_stub()  # what the exporter does on a transient error
        assert await asyncio.to_thread(exporter.export, kept.spans) is SpanExportResult.SUCCESS
        assert len(receiver.spans) == 2
    finally:
        exporter.shutdown()
        await receiver.close()
