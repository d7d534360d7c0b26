"""Helpers for the registry contract suite."""

from __future__ import annotations

from typing import Any

from epoxi import durations
from epoxi.registry.client import Consul


async def debug_duration(consul: Consul, name: str) -> float:
    """A duration setting from ``/v1/agent/self``'s ``DebugConfig``, in seconds."""
    me: dict[str, Any] = await consul.agent.self()
    value = me["DebugConfig"][name]
    return (
        durations.parse(value) / durations.SECOND
        if isinstance(value, str)
        else float(value) / durations.SECOND
    )
