"""Logs: readable lines, or one JSON object per line carrying what ties a record to mail.

``log_fields(routing_key=..., message_id=...)`` sets fields for the records logged inside it
(context variables, so they follow asyncio tasks); a record's own ``extra=`` fields of the same
names win. The JSON form adds the current ``trace_id`` and ``span_id`` when a span records.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

FIELDS = ("routing_key", "message_id", "node")
_fields: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "epoxi_log_fields", default=None
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_fields(**fields: str) -> Iterator[None]:
    token = _fields.set({**(_fields.get() or {}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _fields.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "trace_id"?, "span_id"?, "routing_key"?, ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        entry.update(_fields.get() or {})
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level``, as ``fmt`` says (``text`` or ``json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
