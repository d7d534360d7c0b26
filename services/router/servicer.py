"""RouterService: validate, batch by routing key, place or discover a pipeline, enqueue, summarise.

Sizes: every email is validated against ``max_email_bytes`` (INVALID_ARGUMENT naming the limit,
nothing routed), and batches are packed so that one EnqueueBatch carries at most
``epoxi.runtime.limits.batch_bytes`` of emails; see ``epoxi.runtime.limits``.

Placement: a key with no pipeline in the view goes to ``epoxi.placement.candidates``, ranked with
the keys this router just placed (``epoxi.placement.Placements``), which it records before its
first await, so the new keys of one request spread over the nodes that own their IP.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

import grpc

from epoxi import placement, validation
from epoxi.envelope import recipients_in
from epoxi.runtime import limits, status
from epoxi.runtime.channels import RPC_TIMEOUT, Channels
from epoxi.runtime.status import abort
from epoxi.v1 import node_pb2, node_pb2_grpc, router_pb2, router_pb2_grpc
from services.router.batching import Batch, plan
from services.router.discovery import ClusterSnapshot, ClusterView

log = logging.getLogger(__name__)

# Errors that another node cannot fix: the request itself is wrong.
_FINAL = {grpc.StatusCode.INVALID_ARGUMENT}


@dataclass(frozen=True)
class Target:
    node: node_pb2.NodeInfo
    has_pipeline: bool


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        view: ClusterView,
        channels: Channels,
        max_batch: int = 500,
        concurrency: int = 32,
        max_email_bytes: int = validation.MAX_EMAIL_BYTES,
    ) -> None:
        self._view = view
        self._channels = channels
        self._max_batch = max_batch
        self._max_email_bytes = max_email_bytes
        self._limit = asyncio.Semaphore(concurrency)
        # Pipelines this router placed that its registry view does not show yet.
        self._placements = placement.Placements()

    async def RouteEmails(
        self, request: router_pb2.RouteEmailsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteEmailsResponse:
        if not request.emails:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "emails is empty: send at least one email")
        problems = [
            p
            for i, e in enumerate(request.emails)
            for p in validation.validate(e, f"emails[{i}]", self._max_email_bytes)
        ]
        if problems:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"nothing was routed: {status.summary(problems)}"
            )
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                await self._view.ready()
        except TimeoutError:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the registry has not answered yet; try again")

        snap = self._view.snapshot()
        self._prune(snap)
        batches, unroutable = plan(
            request.emails,
            request.ip_pool,
            snap.pools,
            self._max_batch,
            limits.batch_bytes(self._max_email_bytes),
        )
        by_key: dict[str, list[Batch]] = defaultdict(list)
        for b in batches:
            by_key[b.routing_key].append(b)
        results = await asyncio.gather(*(self._route_key(bs) for bs in by_key.values()))

        response = router_pb2.RouteEmailsResponse(total_emails=len(request.emails))
        for u in unroutable:
            response.batches.append(
                router_pb2.BatchResult(email_count=len(u.emails), ok=False, error=u.reason)
            )
        for key_results in results:
            response.batches.extend(key_results)
        for r in response.batches:
            response.total_batches += 1
            response.successful_batches += r.ok
            response.failed_batches += not r.ok
            response.new_pipelines_started += r.new_pipeline
            response.fallbacks_used += r.ok and bool(r.error)
            response.accepted_recipients += r.recipient_count if r.ok else 0
        return response

    async def _route_key(self, batches: list[Batch]) -> list[router_pb2.BatchResult]:
        # Batches of one key go in order, so they land on the same pipeline.
        async with self._limit:
            return [await self._route_batch(b) for b in batches]

    def _prune(self, snap: ClusterSnapshot) -> None:
        # Costs only while placements wait for the view (a few keys, for a moment).
        if len(self._placements):
            self._placements.prune(snap.pipelines, snap.nodes)

    def _targets(self, batch: Batch) -> list[Target]:
        snap = self._view.snapshot()
        key = batch.routing_key
        targets = [Target(snap.nodes[p.node], True) for p in snap.pipelines.get(key, [])]
        placed = self._placements.node_for(key)
        if targets:
            self._placements.forget(key)
        elif placed in snap.nodes:
            targets.append(Target(snap.nodes[placed], True))
        seen = {t.node.id for t in targets}
        pipelines = self._placements.pipelines(snap.pipeline_counts, snap.nodes)
        targets += [
            Target(n, False)
            for n in placement.candidates(snap.nodes.values(), batch.source_ip, pipelines)
            if n.id not in seen
        ]
        return targets

    async def _route_batch(self, batch: Batch) -> router_pb2.BatchResult:
        result = router_pb2.BatchResult(
            routing_key=batch.routing_key,
            email_count=len(batch.emails),
            recipient_count=sum(len(recipients_in(e, batch.domain)) for e in batch.emails),
        )
        targets = self._targets(batch)
        if not targets:
            result.error = f"no passing node owns source IP {batch.source_ip}"
            return result
        failures: list[str] = []
        for target in targets:
            stub = node_pb2_grpc.NodeServiceStub(self._channels.get(target.node.address))
            try:
                if not target.has_pipeline:
                    # Counted before the first await: the next key placed sees it.
                    self._placements.place(batch.routing_key, target.node.id)
                    try:
                        started = await stub.StartPipeline(
                            node_pb2.StartPipelineRequest(domain=batch.domain, source_ip=batch.source_ip),
                            timeout=RPC_TIMEOUT,
                        )
                    except grpc.aio.AioRpcError:
                        self._placements.forget(batch.routing_key, target.node.id)
                        raise
                    result.new_pipeline = started.started
                reply = await stub.EnqueueBatch(
                    node_pb2.EnqueueBatchRequest(routing_key=batch.routing_key, emails=batch.emails),
                    timeout=RPC_TIMEOUT,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # The node runs no such pipeline (any more): the next batch places it again.
                    self._placements.forget(batch.routing_key, target.node.id)
                failures.append(f"node {target.node.id}: {err.code().name}: {err.details()}")
                log.warning(
                    "batch %s failed on node %s: %s", batch.routing_key, target.node.id, err.details()
                )
                if err.code() in _FINAL:
                    break
                continue
            result.ok = True
            result.node = target.node.id
            result.message_ids.extend(reply.message_ids)
            break
        result.error = "; ".join(failures)
        return result
