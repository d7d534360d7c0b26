"""A pipeline's outcomes, recorded in groups: one spool transaction (one fsync) for many."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.node.engine.spool import Outcome, Spool

# Outcomes per commit at most before a commit starts, and how long one may wait for its group.
RECORD_GROUP = 50
RECORD_DELAY = 0.05


class Recorder:
    """A pipeline's outcomes, recorded in groups: one spool transaction (one fsync) for many.

    ``add`` keeps outcomes pending. A recording starts once ``group`` are pending or the oldest
    has waited ``delay`` seconds, and commits everything pending when it starts; outcomes added
    meanwhile go in the next one. ``flush`` commits the rest at once and returns when every
    outcome added before it is durable. A recording runs in a task of its own, so cancelling
    whoever waits for it (a pipeline stopped past its grace) does not lose the group: it commits,
    or, if the spool fails, its deliveries stay ``inflight`` and are sent again once released.
    A failed recording is raised once, by the next ``add`` or ``flush``.
    """

    def __init__(self, spool: Spool, group: int = RECORD_GROUP, delay: float = RECORD_DELAY) -> None:
        self.spool = spool
        self.group = max(1, group)
        self.delay = delay
        self._pending: list[Outcome] = []
        self._oldest = 0.0  # the event loop's time when the oldest pending outcome was added
        self._timer: asyncio.TimerHandle | None = None
        self._recording: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    def add(self, outcomes: Sequence[Outcome]) -> None:
        self._raise()
        if not outcomes:
            return
        if not self._pending:
            self._oldest = asyncio.get_running_loop().time()
        self._pending.extend(outcomes)
        if len(self._pending) >= self.group:
            self._start()
        else:
            self._arm()

    async def flush(self) -> None:
        """Record every pending outcome now; return once they, and any recording under way, are durable."""
        while self._recording is not None or self._pending:
            self._start()
            if self._recording is not None:
                await asyncio.wait({self._recording})  # not cancelled with the caller
            self._raise()
        self._raise()

    def discard(self) -> int:
        """Forget the pending outcomes and any failure (after a failed flush: their deliveries stay
        in flight for the spool to release); how many were pending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        n, self._pending, self._error = len(self._pending), [], None
        return n

    def _start(self) -> None:
        """Start recording what is pending, unless a recording is under way: it takes them next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._recording is None and self._pending:
            self._recording = asyncio.create_task(self._record())

    def _arm(self) -> None:
        """See that pending outcomes start recording at most ``delay`` after the oldest was added."""
        if self._pending and self._timer is None and self._recording is None:
            self._timer = asyncio.get_running_loop().call_at(self._oldest + self.delay, self._start)

    def _due(self) -> bool:
        return len(self._pending) >= self.group or (
            bool(self._pending) and asyncio.get_running_loop().time() >= self._oldest + self.delay
        )

    async def _record(self) -> None:
        try:
            while True:
                taken, self._pending = self._pending, []
                await self.spool.record(taken)
                if not self._due():
                    break
        except Exception as e:
            self._error = e
        finally:
            self._recording = None
            self._arm()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e
