"""Stops pipelines that have had no unfinished mail for ``timeout`` seconds.

A stopped pipeline leaves the registry, so routers start it again (StartPipeline) when mail
for its routing key comes; mail sent straight to the node restarts it too
(``PipelineSupervisor.pipeline_for_mail``). Pipelines with queued, in-flight or deferred mail never stop.

Each sweep also drops the supervisor's per-key state for keys stopped and without mail for
``forget_after`` seconds (by default twice ``timeout``), so memory follows the running keys,
not every key ever seen.
"""

from __future__ import annotations

import logging

from epoxi.tasks import every
from services.node.supervisor import PipelineSupervisor

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.05
MAX_INTERVAL = 5.0


class IdleReaper:
    def __init__(
        self, supervisor: PipelineSupervisor, timeout: float, forget_after: float | None = None
    ) -> None:
        self.supervisor = supervisor
        self.timeout = timeout
        self.forget_after = 2 * timeout if forget_after is None else forget_after
        # Look a few times per timeout, so a pipeline stops at most a quarter late.
        self.interval = min(MAX_INTERVAL, max(MIN_INTERVAL, timeout / 4))

    async def run(self) -> None:
        await every(self.interval, self.sweep, "stopping idle pipelines")

    async def sweep(self) -> list[str]:
        """Stop the pipelines idle for long enough now, and forget keys stopped long enough ago;
        the routing keys stopped."""
        keys = self.supervisor.routing_keys()
        stopped = [key for key in keys if await self.supervisor.stop_if_idle(key, self.timeout)]
        self.supervisor.forget_idle(self.forget_after)
        return stopped
