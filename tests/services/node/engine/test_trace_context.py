"""Long-lived tasks started inside a span run outside it, keeping the rest of the context."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from epoxi.observability.logs import _fields, log_fields
from services.node.engine.trace_context import outside_spans

CALLER = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False, TraceFlags(1))


async def test_a_task_started_outside_spans_has_no_span_and_keeps_log_fields() -> None:
    async def current() -> tuple[SpanContext, dict[str, str] | None]:
        return trace.get_current_span().get_span_context(), _fields.get()

    with log_fields(node="n1"), trace.use_span(NonRecordingSpan(CALLER)):
        inherited = await asyncio.create_task(current())
        detached = await asyncio.create_task(current(), context=outside_spans())
        assert trace.get_current_span().get_span_context() == CALLER  # the caller's own is untouched
    assert inherited == (CALLER, {"node": "n1"})
    assert not detached[0].is_valid and detached[1] == {"node": "n1"}
