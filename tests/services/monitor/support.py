"""Conditions the monitor tests wait for with ``tests.support.eventually``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def contains(value: Awaitable[Any], item: Any) -> bool:
    return item in await value


async def excludes(value: Awaitable[Any], item: Any) -> bool:
    return item not in await value
