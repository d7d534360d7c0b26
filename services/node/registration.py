"""Keeps the registry in step with the node: its service, its pipelines and their TTL checks.

``sync(snapshot)`` reconciles the registry with what the node runs now (``snapshot()``, a
``NodeSnapshot``) and is idempotent: it registers the node (again when its pipeline count or
load changed), registers new pipelines, passes each running pipeline's TTL check with its state
line as the output (fails it while the pipeline is restarting after a crash), registers a
pipeline again when its policy or MX site changed (both are in the service's metadata), and
deregisters pipelines that stopped. ``run(snapshot)`` calls it every ``interval``. A registry that
is down is retried on the next round, and a registry that lost our registrations (e.g.
restarted) gets them again.

The ``Registrar`` is a pipeline hook and holds no supervisor: the snapshot function is an
argument of ``sync`` and ``run``, never stored. A hook event (a pipeline started, stopped,
crashed or took a new policy) wakes ``run`` for a round at once and returns when that round is
done, so a StartPipeline or StopPipeline call answers only once the registry shows it. Before
``run`` starts and after it ends, events wait for nothing: the startup's inline ``sync`` and the
first round see them. Once ``deregister_all`` ran at shutdown, nothing registers again.

Each check carries ``Notes`` saying what it means (what an operator reads in the Consul UI),
while its Output stays the one-line state. The node's registration names its ``/metrics``
address in its Meta as ``metrics`` (``metrics_address``), for Prometheus's consul_sd.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consul import ConsulException

from epoxi import durations
from epoxi.registry.client import Consul, RegistryError
from epoxi.registry.services import (
    node_registration,
    pipeline_check_id,
    pipeline_registration,
    with_metrics,
)
from epoxi.v1 import node_pb2, pipeline_pb2
from services.node.engine.hooks import PipelineHooks

if TYPE_CHECKING:
    from services.node.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

NODE_REFRESH_ROUNDS = 12
CONCURRENT_CALLS = 16


@dataclass(frozen=True)
class PipelineState:
    info: pipeline_pb2.PipelineInfo
    line: str
    failing: bool


@dataclass(frozen=True)
class NodeSnapshot:
    """What the node runs now: itself and each pipeline, as the registry shows them."""

    node: node_pb2.NodeInfo
    pipelines: list[PipelineState]


Snapshots = Callable[[], Awaitable[NodeSnapshot]]


class Registrar(PipelineHooks):
    def __init__(
        self,
        consul: Consul,
        *,
        interval: float = 5.0,
        deregister_after: str = "1m",
        timeout: float = 10.0,
        check_fields: Mapping[str, Any] | None = None,
        metrics_address: str = "",
    ) -> None:
        self.consul = consul
        # host:port of the node's /metrics ("" when it serves none), in its Meta as "metrics".
        self.metrics_address = metrics_address
        # Added to the node's GRPC check: GRPCUseTLS (and TLSServerName) when the node serves TLS.
        self.check_fields = dict(check_fields or {})
        self.interval = interval
        self.check_interval = durations.go(interval)
        self.ttl = durations.go(interval * 3)
        self.deregister_after = deregister_after
        self.timeout = timeout  # for one round of registry calls
        self._node_meta: tuple[int, int] | None = None
        self._rounds = 0
        # Registered pipelines, with the policy and MX site their registration carries.
        self._pipelines: dict[str, tuple[pipeline_pb2.PipelinePolicy, str]] = {}
        # What each pipeline's TTL check was last passed with, and when (monotonic).
        self._refreshed: dict[str, tuple[tuple[str, bool], float]] = {}
        self._lock = asyncio.Lock()
        # Set once the node has left the registry at shutdown: nothing registers it again.
        self._left = False
        # While ``run`` runs: set to start a round now, and the round hook events wait for.
        self._running = False
        self._wake = asyncio.Event()
        self._next_round: asyncio.Future[None] | None = None

    async def run(self, snapshot: Snapshots) -> None:
        """Sync every ``interval``, and at once when a hook event asks; until cancelled."""
        self._running = True
        try:
            while True:
                self._wake.clear()
                waiting, self._next_round = self._next_round, None
                try:
                    await self.sync(snapshot)
                except Exception:
                    log.exception("registry sync failed unexpectedly")
                finally:
                    _done(waiting)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
        finally:
            self._running = False
            waiting, self._next_round = self._next_round, None
            _done(waiting)

    async def pipeline_started(self, pipeline: Pipeline) -> None:
        await self._round()

    async def pipeline_stopped(self, pipeline: Pipeline) -> None:
        await self._round()

    async def pipeline_failed(self, pipeline: Pipeline) -> None:
        await self._round()

    async def policy_changed(self, pipeline: Pipeline) -> None:
        await self._round()

    async def _round(self) -> None:
        """Have ``run`` sync now; return once a round that began after this call is done."""
        if not self._running or self._left:
            return
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        round_ = self._next_round
        self._wake.set()
        await asyncio.shield(round_)  # shared: a cancelled waiter must not cancel it for the rest

    async def sync(self, snapshot: Snapshots) -> None:
        async with self._lock:
            if self._left:
                return
            try:
                snap = await snapshot()
                async with asyncio.timeout(self.timeout):
                    await self._sync(snap)
            except RegistryError as e:
                log.warning("registry sync failed, retrying in %ss: %s", self.interval, e)

    async def _sync(self, snap: NodeSnapshot) -> None:
        meta = (snap.node.pipeline_count, snap.node.load)
        self._rounds += 1
        # Also now and then, so a registry that restarted empty learns about us again (Consul keeps
        # the check's state when a service is registered again unchanged).
        if meta != self._node_meta or self._rounds % NODE_REFRESH_ROUNDS == 0:
            registration = node_registration(snap.node, self.check_interval, self.deregister_after)
            registration["check"].update(self.check_fields)
            registration["check"]["Notes"] = node_notes(snap.node.id, snap.node.address, self.check_interval)
            registration = with_metrics(registration, self.metrics_address)
            await self.consul.agent.service.register(**registration)
            self._node_meta = meta
        current = {p.info.name for p in snap.pipelines}
        now = time.monotonic()
        # Calls to make, not coroutines made: one a cancelled round never starts is never created.
        work: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self._deregister_pipeline, name)
            for name in sorted(self._pipelines.keys() - current)
        ]
        work += [functools.partial(self._update, p) for p in snap.pipelines if self._due(p, now)]
        # Concurrent but bounded: a node with 1,000 pipelines must not send them one at a time.
        limit = asyncio.Semaphore(CONCURRENT_CALLS)

        async def limited(call: Callable[[], Awaitable[None]]) -> None:
            async with limit:
                await call()

        await asyncio.gather(*map(limited, work))

    def _due(self, p: PipelineState, now: float) -> bool:
        """Whether ``p`` needs a registry call this round: it is new, its policy or state line
        changed, or its TTL was last passed half an interval ago or more (the TTL is three)."""
        last = self._refreshed.get(p.info.name)
        return (
            self._pipelines.get(p.info.name) != _meta(p)
            or last is None
            or last[0] != (p.line, p.failing)
            or now - last[1] >= self.interval / 2
        )

    async def _update(self, p: PipelineState) -> None:
        if self._pipelines.get(p.info.name) != _meta(p):
            await self._register_pipeline(p)
        else:
            await self._refresh(p)

    async def _register_pipeline(self, p: PipelineState) -> None:
        registration = pipeline_registration(p.info, self.ttl, self.deregister_after)
        registration["check"]["Notes"] = pipeline_notes(
            p.info.node, p.info.routing_key, self.ttl, self.deregister_after
        )
        await self.consul.agent.service.register(**registration)
        self._pipelines[p.info.name] = _meta(p)
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


def node_notes(node: str, address: str, interval: str) -> str:
    """What the node's check means, for its ``Notes``."""
    return (
        f"gRPC health check of Epoxi node {node} at {address}, run by the registry every {interval}: "
        "passing while the node serves NodeService; critical when it does not answer (stopped, "
        "crashed, unreachable, or shutting down). Its pipelines are the epoxi-pipeline services "
        f"tagged node:{node}."
    )


def pipeline_notes(node: str, routing_key: str, ttl: str, deregister_after: str) -> str:
    """What a pipeline's check means, for its ``Notes``."""
    return (
        f"TTL check kept passing by node {node} while pipeline {routing_key} runs; critical while "
        f"the pipeline restarts after a crash (the Output says why), and critical when the node "
        f"stops updating it for {ttl} (the node is down or cannot reach the registry); "
        f"deregistered after {deregister_after} critical. Output: the pipeline's state line "
        "(queued, in flight, deferred, delivered, bounced)."
    )


def _done(round_: asyncio.Future[None] | None) -> None:
    if round_ is not None and not round_.done():
        round_.set_result(None)


def _meta(p: PipelineState) -> tuple[pipeline_pb2.PipelinePolicy, str]:
    """What a pipeline's registration carries that can change while it runs."""
    return p.info.policy, p.info.site
