"""Running long-lived work outside the span of whoever started it.

A pipeline (or the supervisor's drain of spooled DSNs) is often started inside an RPC — the
EnqueueBatch that brought a key's first mail — and asyncio hands a new task a copy of the
caller's context, span included. Work that outlives the call must not run in that span: its
spans would join a stranger's trace and its log records would name it.
"""

from __future__ import annotations

import contextvars

from opentelemetry import context as otel_context


def outside_spans() -> contextvars.Context:
    """A copy of the current context (log fields and all) with no current span, for a task."""
    ctx = contextvars.copy_context()
    ctx.run(otel_context.attach, otel_context.Context())
    return ctx
