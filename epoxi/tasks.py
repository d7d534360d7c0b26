"""Background tasks: the one way to repeat one, and the one way to stop them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel ``tasks`` and wait until each has ended.

    A task's own cancellation is its normal end and is not raised; an error a task ended with
    before it was cancelled is logged. If the caller itself is cancelled meanwhile, that
    cancellation propagates (``asyncio.wait`` does not swallow it, as ``suppress`` would).
    """
    running = [t for t in tasks if t is not None]
    for t in running:
        t.cancel()
    if running:
        await asyncio.wait(running)
    for t in running:
        if not t.cancelled() and (error := t.exception()) is not None:
            log.error("task %s ended with an error", t.get_name(), exc_info=error)


async def every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Await ``work()`` every ``seconds``, the first time one interval from now, until cancelled.
    A round that fails is logged with ``what`` and the next one runs on time."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            log.exception("%s failed", what)
