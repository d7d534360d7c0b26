"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], seconds: float = 30.0, step: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``seconds`` (generous: a
    loaded machine may take a while to run a registry check, and only a failure waits it out)."""
    async with asyncio.timeout(seconds):
        while True:
            if result := await check():
                return result
            await asyncio.sleep(step)
