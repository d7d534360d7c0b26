"""A local copy of one service's health entries, kept fresh by Consul blocking queries.

Readers look at ``entries`` without a registry round trip; a background task re-issues
``GET /v1/health/service/<name>?index=N&wait=…`` and replaces the list when the index moves.
``answered_at`` is when the registry last answered (a change or not): the copy is known to be
current as of then, and a blocking query answers at least once per ``wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from epoxi.backoff import Backoff
from epoxi.registry.services import Entry
from epoxi.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# After n failures in a row: 0.4s, 0.8s, ... up to 10s, each between half and all of it.
RETRY = Backoff(base=0.4, cap=10.0, jitter=0.5)


class HealthWatch:
    def __init__(self, consul: Any, service: str, wait: str = "30s") -> None:
        self._consul = consul
        self.service = service
        self._wait = wait
        self.entries: list[Entry] = []
        self.index = 0
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        # time.monotonic() of the registry's last answer; of the start until the first.
        self.answered_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> HealthWatch:
        self.answered_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"watch {self.service}")
        return self

    async def refresh(self) -> None:
        """Read the current entries now (not blocking), e.g. right after this process changed them."""
        index, entries = await self._consul.health.service(self.service)
        self.answered_at = time.monotonic()
        self._store(int(index), entries)

    def _store(self, index: int, entries: list[Entry] | None) -> None:
        # Consul: an index that goes backwards means the store was reset; start over from 0.
        if index < self.index:
            index = 0
        self.index = index
        self.entries = entries or []
        self.ready.set()
        self.changed.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                index, entries = await self._consul.health.service(
                    self.service, index=self.index or None, wait=self._wait
                )
                failures = 0
                self.answered_at = time.monotonic()
                if int(index) != self.index or not self.ready.is_set():
                    self._store(int(index), entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = RETRY.delay(failures)
                log.warning("watching %s failed (%s); retrying in %.1fs", self.service, exc, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
