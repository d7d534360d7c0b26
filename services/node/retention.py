"""Deletes finished mail from the spool once its last outcome is ``retention`` seconds old.

Like an MTA's queue cleanup: every ``interval`` seconds (the first time one interval after the
node starts), messages whose recipients were all delivered or bounced before the cutoff go, with
their attempt history (``Spool.purge``). Mail with a queued, in-flight or deferred recipient
always stays, and the delivered and bounced counters keep counting what was purged. The same
sweep forgets the idempotency keys of batches older than ``batch_window``. Either window 0: never.
"""

from __future__ import annotations

import logging
import time

from epoxi.tasks import every
from services.node.engine.spool import Spool

log = logging.getLogger(__name__)

# Most messages one ``Spool.purge`` call deletes; a sweep calls it again until one deletes fewer.
PURGE_LIMIT = 100_000


class Retention:
    def __init__(
        self,
        spool: Spool,
        retention: float,
        interval: float,
        limit: int = PURGE_LIMIT,
        batch_window: float = 0.0,
    ) -> None:
        if retention < 0 or batch_window < 0 or interval <= 0:
            raise ValueError(
                f"retention {retention}s and batch window {batch_window}s must not be negative,"
                f" interval {interval}s must be positive"
            )
        self.spool = spool
        self.retention = retention
        self.batch_window = batch_window
        self.interval = interval
        self.limit = limit

    async def run(self) -> None:
        await every(self.interval, self.sweep, "purging finished mail")

    async def sweep(self, now: float | None = None) -> int:
        """Purge the mail finished more than ``retention`` seconds before ``now`` (default: the
        current time); how many messages went."""
        now = time.time() if now is None else now
        if self.batch_window > 0:
            forgotten = await self.spool.forget_batches(now - self.batch_window)
            if forgotten:
                log.info("forgot the idempotency keys of %d batched messages", forgotten)
        if self.retention <= 0:
            return 0
        before = now - self.retention
        total = 0
        while True:
            n = await self.spool.purge(before, self.limit)
            total += n
            if n < self.limit:
                break
            log.info("purged %d finished messages so far, more to go", total)
        if total:
            log.info("purged %d messages finished more than %gs ago", total, self.retention)
        else:
            log.debug("no finished messages older than %gs to purge", self.retention)
        return total
