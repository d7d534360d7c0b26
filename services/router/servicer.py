"""RouterService: validate, batch by routing key, place or discover a pipeline, enqueue, summarise."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

import grpc

from epoxi import placement, validation
from epoxi.envelope import recipients_in
from epoxi.runtime import status
from epoxi.runtime.channels import RPC_TIMEOUT, Channels
from epoxi.runtime.status import abort
from epoxi.v1 import node_pb2, node_pb2_grpc, router_pb2, router_pb2_grpc
from services.router.batching import Batch, plan
from services.router.discovery import ClusterView

log = logging.getLogger(__name__)

# Errors that another node cannot fix: the request itself is wrong.
_FINAL = {grpc.StatusCode.INVALID_ARGUMENT}


@dataclass(frozen=True)
class Target:
    node: node_pb2.NodeInfo
    has_pipeline: bool


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self, view: ClusterView, channels: Channels, max_batch: int = 500, concurrency: int = 32
    ) -> None:
        self._view = view
        self._channels = channels
        self._max_batch = max_batch
        self._limit = asyncio.Semaphore(concurrency)
        # Pipelines this router placed that its registry cache may not show yet.
        self._placed: dict[str, str] = {}

    async def RouteEmails(
        self, request: router_pb2.RouteEmailsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteEmailsResponse:
        if not request.emails:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "emails is empty: send at least one email")
        problems = [p for i, e in enumerate(request.emails) for p in validation.validate(e, f"emails[{i}]")]
        if problems:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"nothing was routed: {status.summary(problems)}"
            )
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                await self._view.ready()
        except TimeoutError:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the registry has not answered yet; try again")

        batches, unroutable = plan(
            request.emails, request.ip_pool, self._view.snapshot().pools, self._max_batch
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

    def _targets(self, batch: Batch) -> list[Target]:
        snap = self._view.snapshot()
        targets = [Target(snap.nodes[p.node], True) for p in snap.pipelines.get(batch.routing_key, [])]
        placed = self._placed.get(batch.routing_key)
        if targets:
            self._placed.pop(batch.routing_key, None)
        elif placed in snap.nodes:
            targets.append(Target(snap.nodes[placed], True))
        seen = {t.node.id for t in targets}
        targets += [
            Target(n, False)
            for n in placement.candidates(snap.nodes.values(), batch.source_ip)
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
                    started = await stub.StartPipeline(
                        node_pb2.StartPipelineRequest(domain=batch.domain, source_ip=batch.source_ip),
                        timeout=RPC_TIMEOUT,
                    )
                    result.new_pipeline = started.started
                    self._placed[batch.routing_key] = target.node.id
                reply = await stub.EnqueueBatch(
                    node_pb2.EnqueueBatchRequest(routing_key=batch.routing_key, emails=batch.emails),
                    timeout=RPC_TIMEOUT,
                )
            except grpc.aio.AioRpcError as err:
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
