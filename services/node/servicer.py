"""NodeService: validates requests, then asks the ``PipelineSupervisor`` to act, and only it.
Errors go through ``epoxi.runtime.status.abort``.

A routing key another node runs is FAILED_PRECONDITION with that node in the trailing metadata
(``epoxi-owner-node``, ``epoxi-owner-address``), so a router sends the batch there. Every error
EnqueueBatch and TakeMessages answer on purpose carries ``epoxi-refused: 1``: nothing was
spooled, so trying elsewhere cannot double the mail. An error without it (a deadline, a lost
connection) leaves that open. A batch with an email that fails validation, or passes it and
still cannot be rendered, is INVALID_ARGUMENT naming each such email, and none of it is spooled.

While tracing is on, EnqueueBatch's and TakeMessages' server spans (made by the gRPC
interceptor) carry ``epoxi.routing_key``, ``epoxi.node`` and how many emails came.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc
from opentelemetry import trace

from epoxi import policy, routing, validation
from epoxi.envelope import recipients_in
from epoxi.observability import tracing
from epoxi.policy import Policy
from epoxi.policy_store import POLICIES, PolicyError, check_name
from epoxi.registry import ownership
from epoxi.registry.ownership import ClaimError, Owner
from epoxi.routing import routing_key
from epoxi.runtime.status import abort, summary
from epoxi.v1 import node_pb2, node_pb2_grpc, pipeline_pb2, queue_pb2, shaping_pb2
from services.node import handoff, queue
from services.node.engine.spool import Counts, KeyStats
from services.node.supervisor import OwnedElsewhere, PipelineSupervisor, Stopped, Unrenderable

log = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED = (ownership.REFUSED, "1")


async def _refuse(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    metadata: Sequence[tuple[str, str]] = (),
) -> None:
    """End the call with ``code``: nothing was spooled."""
    context.set_trailing_metadata((REFUSED, *metadata))
    await abort(context, code, message)


async def _not_here(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Refuse for a key this node may not run now: owned elsewhere, unclaimable, or not its IP."""
    if isinstance(error, OwnedElsewhere):
        await _refuse(
            context, grpc.StatusCode.FAILED_PRECONDITION, str(error), ownership.owner_metadata(error.owner)
        )
    if isinstance(error, ClaimError):
        await _refuse(context, grpc.StatusCode.UNAVAILABLE, str(error))
    await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self, supervisor: PipelineSupervisor, max_email_bytes: int = validation.MAX_EMAIL_BYTES
    ) -> None:
        self.supervisor = supervisor
        self.max_email_bytes = max_email_bytes

    async def StartPipeline(
        self, request: node_pb2.StartPipelineRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.StartPipelineResponse:
        problems = routing.target_problems(request.domain, request.source_ip)
        problems += policy.validate(request.policy)
        inline = request.policy != pipeline_pb2.PipelinePolicy()
        if request.policy_name:
            try:
                check_name(request.policy_name)
            except PolicyError as e:
                problems.append(str(e))
            if inline:
                problems.append("give policy or policy_name, not both")
        if problems:
            await abort(context, _INVALID, "; ".join(problems))
        if not self.supervisor.owns(request.source_ip):
            owned = ", ".join(self.supervisor.egress_ips) or "none"
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self.supervisor.id} cannot send from {request.source_ip}; it owns: {owned}",
            )
        key = routing_key(request.domain, request.source_ip)
        chosen: Policy | None = Policy.from_proto(request.policy, key) if inline else None
        if request.policy_name:
            chosen = self.supervisor.stored_policy(request.policy_name)
            if chosen is None:
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"no valid policy {request.policy_name!r} is stored under {POLICIES}",
                )
        try:
            p, started = await self.supervisor.start_pipeline(request.domain, request.source_ip, chosen)
        except (OwnedElsewhere, ClaimError) as e:
            await _not_here(context, e)
            raise
        return node_pb2.StartPipelineResponse(
            pipeline=await self.supervisor.pipeline_info(p), started=started
        )

    async def StopPipeline(
        self, request: node_pb2.StopPipelineRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.StopPipelineResponse:
        to = None
        if request.hand_to_node:
            if request.hand_to_node == self.supervisor.id:
                await abort(context, _INVALID, f"hand_to_node {request.hand_to_node!r} is this node")
            to = await self._peer(request.hand_to_node, request.routing_key)
            if to is None:
                await abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"hand_to_node {request.hand_to_node!r} is not a passing node that sends from "
                    f"the source IP of {request.routing_key!r}",
                )
        try:
            stopped = await self.supervisor.stop_pipeline(request.routing_key, to)
        except OwnedElsewhere as e:
            await abort(context, grpc.StatusCode.ABORTED, f"{e}: a stop or hand-off is under way")
            raise
        if stopped.pipeline is None and not (stopped.handed.moved or stopped.handed.kept):
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no pipeline {request.routing_key!r} runs on node {self.supervisor.id}",
            )
        reply = await self._stopped(stopped)
        reply.moved_with.extend([await self._stopped(s) for s in stopped.moved_with])
        return reply

    async def _stopped(self, stopped: Stopped) -> node_pb2.StopPipelineResponse:
        handed = stopped.handed
        reply = node_pb2.StopPipelineResponse(
            messages_handed_off=handed.moved,
            handed_to_node=handed.to,
            messages_kept=handed.kept,
            kept_reason=handed.reason,
        )
        if stopped.pipeline is not None:
            reply.pipeline.CopyFrom(await self.supervisor.pipeline_info(stopped.pipeline))
        return reply

    async def _peer(self, node: str, key: str) -> Owner | None:
        try:
            _, source_ip = routing.split_routing_key(key)
        except ValueError:
            return None
        return next((o for o in await self.supervisor.peers.candidates(source_ip) if o.node == node), None)

    async def ListPipelines(
        self, request: node_pb2.ListPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListPipelinesResponse:
        return node_pb2.ListPipelinesResponse(
            pipelines=[p.info for p in (await self.supervisor.snapshot()).pipelines]
        )

    async def GetNodeState(
        self, request: node_pb2.GetNodeStateRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetNodeStateResponse:
        snap = await self.supervisor.snapshot()
        return node_pb2.GetNodeStateResponse(node=snap.node, pipelines=[p.info for p in snap.pipelines])

    async def EnqueueBatch(
        self, request: node_pb2.EnqueueBatchRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.EnqueueBatchResponse:
        if tracing.enabled():
            self._describe_call(request.routing_key, len(request.emails))
        if not request.emails:
            await _refuse(context, _INVALID, "emails is empty: send at least one email")
        problems = [
            p
            for i, e in enumerate(request.emails)
            for p in validation.validate(e, f"emails[{i}]", self.max_email_bytes)
        ]
        try:
            domain, _ = routing.split_routing_key(request.routing_key)
        except ValueError as e:
            problems.insert(0, f"routing_key: {e}")
            domain = ""
        if domain:
            problems += [
                f"emails[{i}] has no recipient in {domain}"
                for i, e in enumerate(request.emails)
                if not recipients_in(e, domain)
            ]
        if problems:
            await _refuse(context, _INVALID, summary(problems))
        try:
            p, started = await self.supervisor.pipeline_for_mail(request.routing_key)
            spooled = await self.supervisor.enqueue_batch(p, request.emails, request.idempotency_key)
        except Unrenderable as e:
            message = summary(e.problems)
            log.warning(
                "batch for %s refused: %s",
                request.routing_key,
                message,
                extra={"routing_key": request.routing_key},
            )
            await _refuse(context, _INVALID, message)
            raise
        except (OwnedElsewhere, ClaimError, ValueError) as e:
            await _not_here(context, e)
            raise
        p = self.supervisor.pipeline(p.routing_key) or p  # restarted if it stopped meanwhile
        return node_pb2.EnqueueBatchResponse(
            message_ids=spooled.ids,
            pipeline=await self.supervisor.pipeline_info(p),
            pipeline_started=started,
            duplicate=spooled.duplicate,
        )

    async def TakeMessages(
        self, request: node_pb2.TakeMessagesRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.TakeMessagesResponse:
        if tracing.enabled():
            self._describe_call(request.routing_key, len(request.messages))
        problems = []
        try:
            routing.split_routing_key(request.routing_key)
        except ValueError as e:
            problems.append(f"routing_key: {e}")
        for i, m in enumerate(request.messages):
            where = f"messages[{i}]"
            if not m.id:
                problems.append(f"{where}.id is empty")
            if not m.recipients:
                problems.append(f"{where} has no recipients")
            if not m.content:
                problems.append(f"{where}.content is empty")
            if len(m.attempts) not in (0, len(m.recipients)):
                problems.append(f"{where}.attempts must have one entry per recipient")
            if len(m.next_attempts) not in (0, len(m.recipients)):
                problems.append(f"{where}.next_attempts must have one entry per recipient")
        if not request.messages:
            problems.append("messages is empty")
        if request.HasField("policy"):
            problems += policy.validate(request.policy)
        if problems:
            await _refuse(context, _INVALID, summary(problems))
        handed_policy = None
        if request.HasField("policy"):
            handed_policy = Policy.from_proto(request.policy, request.routing_key)
        now = time.time()
        try:
            p, ids = await self.supervisor.receive(
                request.routing_key, [handoff.from_proto(m, now) for m in request.messages], handed_policy
            )
        except (OwnedElsewhere, ClaimError, ValueError) as e:
            await _not_here(context, e)
            raise
        return node_pb2.TakeMessagesResponse(message_ids=ids, pipeline=await self.supervisor.pipeline_info(p))

    def _describe_call(self, key: str, emails: int) -> None:
        trace.get_current_span().set_attributes(
            {"epoxi.routing_key": key, "epoxi.node": self.supervisor.id, "epoxi.emails": emails}
        )

    # Queue inspection

    async def GetQueueStats(
        self, request: node_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetQueueStatsResponse:
        key = request.routing_key or None
        stats = await self.supervisor.queue_stats(key)
        if key is not None and not stats:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"routing key {key!r} has no pipeline and no mail on node {self.supervisor.id}",
            )
        return node_pb2.GetQueueStatsResponse(
            pipelines=[self._stats(k, stats[k]) for k in sorted(stats)],
            totals=sum((s.counts for s in stats.values()), Counts()).to_proto(),
        )

    def _stats(self, key: str, stats: KeyStats) -> queue_pb2.QueueStats:
        p = self.supervisor.pipeline(key)
        out = queue.stats_proto(key, stats, p is not None)
        if p is not None and p.budget is not None:
            out.site = p.site
            if p.budget.adjustment is not None:
                out.shaping.CopyFrom(p.budget.to_proto(self.supervisor.id))
        return out

    async def ListShaping(
        self, request: shaping_pb2.ListShapingRequest, context: grpc.aio.ServicerContext
    ) -> shaping_pb2.ListShapingResponse:
        return shaping_pb2.ListShapingResponse(adjustments=self.supervisor.shaper.adjustments())

    async def ClearShaping(
        self, request: shaping_pb2.ClearShapingRequest, context: grpc.aio.ServicerContext
    ) -> shaping_pb2.ClearShapingResponse:
        if not request.site:
            await abort(context, _INVALID, "site is empty: give a site as ListShaping names it")
        if request.source_ip and not routing.is_ip(request.source_ip):
            await abort(context, _INVALID, f"source_ip {request.source_ip!r} is not an IP address")
        cleared = self.supervisor.shaper.clear(request.site, request.source_ip)
        if not cleared:
            where = f" from {request.source_ip}" if request.source_ip else ""
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no shaping adjustment in force for site {request.site!r}{where} on node {self.supervisor.id}",
            )
        log.info("shaping of %s cleared by an operator: %d adjustments", request.site, len(cleared))
        return shaping_pb2.ClearShapingResponse(cleared=cleared)

    async def ListMessages(
        self, request: node_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListMessagesResponse:
        problems = []
        try:
            size = queue.page_size(request.page_size)
        except ValueError as e:
            problems.append(str(e))
        state = None
        if request.state != queue_pb2.DELIVERY_STATE_UNSPECIFIED:
            state = queue.SPOOL_STATES.get(request.state)
            if state is None:
                problems.append(f"state {request.state} is not a DeliveryState")
        after = None
        if request.page_token:
            try:
                page = queue.Page.parse(request.page_token)
            except queue.BadPageToken as e:
                problems.append(str(e))
            else:
                if (page.routing_key, page.state) != (request.routing_key, request.state):
                    problems.append("page_token belongs to a listing with another routing_key or state")
                after = page.after
        if problems:
            await abort(context, _INVALID, "; ".join(problems))
        rows = await self.supervisor.list_messages(request.routing_key or None, state, after, size + 1)
        reply = node_pb2.ListMessagesResponse(messages=[queue.message_proto(m) for m in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            reply.next_page_token = queue.Page(
                request.routing_key, request.state, (last.created_at, last.id)
            ).token()
        return reply

    async def GetMessage(
        self, request: node_pb2.GetMessageRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetMessageResponse:
        if not request.message_id:
            await abort(context, _INVALID, "message_id is empty: give a spool ID from EnqueueBatch")
        found = await self.supervisor.message(request.message_id)
        if found is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no message {request.message_id!r} in the spool of node {self.supervisor.id}",
            )
        message, attempts = found
        return node_pb2.GetMessageResponse(
            message=queue.message_proto(message), attempts=[queue.attempt_proto(a) for a in attempts]
        )
