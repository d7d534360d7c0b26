"""Keeps the registry in step with the node: its service, its pipelines and their TTL checks.

``sync()`` reconciles the registry with what the node runs now and is idempotent: it registers
the node (again when its pipeline count or load changed), registers new pipelines, passes each
running pipeline's TTL check with its state line as the output (fails it while the pipeline is
restarting after a crash), registers a pipeline again when its policy changed (the policy is
in the service's metadata), and deregisters pipelines that stopped. ``run()`` calls it every
``interval``; the node also calls it right after a change. A registry that is down is retried
on the next round, and a registry that lost our registrations (e.g. restarted) gets them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from consul import ConsulException

from epoxi.registry.client import Consul
from epoxi.registry.services import node_registration, pipeline_check_id, pipeline_registration
from epoxi.v1 import node_pb2, pipeline_pb2

log = logging.getLogger(__name__)

NODE_REFRESH_ROUNDS = 12
CONCURRENT_CALLS = 16

RegistryError = (ConsulException, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True)
class PipelineState:
    info: pipeline_pb2.PipelineInfo
    line: str
    failing: bool


@dataclass(frozen=True)
class Snapshot:
    node: node_pb2.NodeInfo
    pipelines: list[PipelineState]


def go_duration(seconds: float) -> str:
    """``1.0`` → ``"1s"``, ``0.25`` → ``"250ms"``: a duration Consul parses."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class Registrar:
    def __init__(
        self,
        consul: Consul,
        snapshot: Callable[[], Awaitable[Snapshot]],
        *,
        interval: float = 5.0,
        deregister_after: str = "1m",
        timeout: float = 10.0,
    ) -> None:
        self.consul = consul
        self.snapshot = snapshot
        self.interval = interval
        self.check_interval = go_duration(interval)
        self.ttl = go_duration(interval * 3)
        self.deregister_after = deregister_after
        self.timeout = timeout  # for one round of registry calls
        self._node_meta: tuple[int, int] | None = None
        self._rounds = 0
        # Registered pipelines, with the policy their registration carries.
        self._pipelines: dict[str, pipeline_pb2.PipelinePolicy] = {}
        # What each pipeline's TTL check was last passed with, and when (monotonic).
        self._refreshed: dict[str, tuple[tuple[str, bool], float]] = {}
        self._lock = asyncio.Lock()
        # Set once the node has left the registry at shutdown: nothing registers it again.
        self._left = False

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:
                log.exception("registry sync failed unexpectedly")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        async with self._lock:
            if self._left:
                return
            try:
                snap = await self.snapshot()
                async with asyncio.timeout(self.timeout):
                    await self._sync(snap)
            except RegistryError as e:
                log.warning("registry sync failed, retrying in %ss: %s", self.interval, e)

    async def _sync(self, snap: Snapshot) -> None:
        meta = (snap.node.pipeline_count, snap.node.load)
        self._rounds += 1
        # Also now and then, so a registry that restarted empty learns about us again (Consul keeps
        # the check's state when a service is registered again unchanged).
        if meta != self._node_meta or self._rounds % NODE_REFRESH_ROUNDS == 0:
            await self.consul.agent.service.register(
                **node_registration(snap.node, self.check_interval, self.deregister_after)
            )
            self._node_meta = meta
        current = {p.info.name for p in snap.pipelines}
        now = time.monotonic()
        work = [self._deregister_pipeline(name) for name in sorted(self._pipelines.keys() - current)]
        work += [self._update(p) for p in snap.pipelines if self._due(p, now)]
        # Concurrent but bounded: a node with 1,000 pipelines must not send them one at a time.
        limit = asyncio.Semaphore(CONCURRENT_CALLS)

        async def limited(call: Awaitable[None]) -> None:
            async with limit:
                await call

        await asyncio.gather(*map(limited, work))

    def _due(self, p: PipelineState, now: float) -> bool:
        """Whether ``p`` needs a registry call this round: it is new, its policy or state line
        changed, or its TTL was last passed half an interval ago or more (the TTL is three)."""
        last = self._refreshed.get(p.info.name)
        return (
            self._pipelines.get(p.info.name) != p.info.policy
            or last is None
            or last[0] != (p.line, p.failing)
            or now - last[1] >= self.interval / 2
        )

    async def _update(self, p: PipelineState) -> None:
        if self._pipelines.get(p.info.name) != p.info.policy:
            await self._register_pipeline(p)
        else:
            await self._refresh(p)

    async def _register_pipeline(self, p: PipelineState) -> None:
        await self.consul.agent.service.register(
            **pipeline_registration(p.info, self.ttl, self.deregister_after)
        )
        self._pipelines[p.info.name] = p.info.policy
        await self._refresh(p, register_if_lost=False)

    async def _refresh(self, p: PipelineState, register_if_lost: bool = True) -> None:
        check = self.consul.agent.check
        update = check.ttl_fail if p.failing else check.ttl_pass
        try:
            # py-consul answers a 404 ("Unknown check ID") with False.
            known = await update(pipeline_check_id(p.info.name), notes=p.line)
        except ConsulException as e:
            # Consul's 500 "CheckID ... does not have associated TTL" means the same.
            log.debug("TTL update for %s failed: %s", p.info.name, e)
            known = False
        if known:
            self._refreshed[p.info.name] = ((p.line, p.failing), time.monotonic())
        if not known and not register_if_lost:
            log.warning("registry has no TTL check for pipeline %s right after registering it", p.info.name)
        elif not known:
            # The registry forgot us (restarted, or reaped a critical service): register again.
            log.warning("registry lost pipeline %s; registering it again", p.info.name)
            self._pipelines.pop(p.info.name, None)
            self._node_meta = None
            await self._register_pipeline(p)

    async def _deregister_pipeline(self, name: str) -> None:
        await self.consul.agent.service.deregister(name)  # False (404) when already gone
        self._pipelines.pop(name, None)
        self._refreshed.pop(name, None)

    async def forget_pipeline(self, name: str) -> None:
        """Deregister a stopped pipeline now."""
        async with self._lock:
            if self._left:
                return
            try:
                async with asyncio.timeout(self.timeout):
                    await self._deregister_pipeline(name)
            except RegistryError as e:
                log.warning("deregistering pipeline %s failed: %s", name, e)

    async def deregister_all(self, node_id: str) -> None:
        """On shutdown: every pipeline, then the node; the registrar does nothing after this."""
        async with self._lock:
            self._left = True
            try:
                async with asyncio.timeout(self.timeout):
                    for name in sorted(self._pipelines):
                        await self._deregister_pipeline(name)
                    await self.consul.agent.service.deregister(node_id)
                self._node_meta = None
            except RegistryError as e:
                log.warning("deregistering node %s failed: %s", node_id, e)
