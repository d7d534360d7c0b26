"""Values quoted in error messages, cut to a bounded length so a message always fits."""

from __future__ import annotations

MAX_SHOWN = 80


def shown(value: str, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` when it has at most ``limit`` characters; else its first ``limit``,
    followed by how many were cut: ``'aaaa'... (9920 more characters)``."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value) - limit} more characters)"
