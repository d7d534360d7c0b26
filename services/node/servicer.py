"""NodeService: validates requests, then asks the ``PipelineSupervisor`` to act, and only it.
Errors go through ``epoxi.runtime.status.abort``."""

from __future__ import annotations

import grpc

from epoxi import policy, routing, validation
from epoxi.envelope import recipients_in
from epoxi.policy import Policy
from epoxi.policy_store import POLICIES, PolicyError, check_name
from epoxi.routing import routing_key
from epoxi.runtime.status import abort, summary
from epoxi.v1 import node_pb2, node_pb2_grpc, pipeline_pb2, queue_pb2
from services.node import queue
from services.node.engine.spool import Counts
from services.node.supervisor import PipelineSupervisor

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


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
        p, started = await self.supervisor.start_pipeline(request.domain, request.source_ip, chosen)
        return node_pb2.StartPipelineResponse(
            pipeline=await self.supervisor.pipeline_info(p), started=started
        )

    async def StopPipeline(
        self, request: node_pb2.StopPipelineRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.StopPipelineResponse:
        p = await self.supervisor.stop_pipeline(request.routing_key)
        if p is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no pipeline {request.routing_key!r} runs on node {self.supervisor.id}",
            )
        return node_pb2.StopPipelineResponse(pipeline=await self.supervisor.pipeline_info(p))

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
        if not request.emails:
            await abort(context, _INVALID, "emails is empty: send at least one email")
        problems = [
            p
            for i, e in enumerate(request.emails)
            for p in validation.validate(e, f"emails[{i}]", self.max_email_bytes)
        ]
        if problems:
            await abort(context, _INVALID, summary(problems))
        p = await self.supervisor.pipeline_for_mail(request.routing_key)
        if p is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no pipeline {request.routing_key!r} runs on node {self.supervisor.id}; start it first",
            )
        outside = [
            f"emails[{i}] has no recipient in {p.domain}"
            for i, e in enumerate(request.emails)
            if not recipients_in(e, p.domain)
        ]
        if outside:
            await abort(context, _INVALID, summary(outside))
        ids = await self.supervisor.enqueue(p, request.emails)
        p = self.supervisor.pipeline(p.routing_key) or p  # restarted if it stopped meanwhile
        return node_pb2.EnqueueBatchResponse(message_ids=ids, pipeline=await self.supervisor.pipeline_info(p))

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
            pipelines=[
                queue.stats_proto(k, stats[k], self.supervisor.pipeline(k) is not None) for k in sorted(stats)
            ],
            totals=sum((s.counts for s in stats.values()), Counts()).to_proto(),
        )

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
