"""NodeService: validates requests, then asks the ``Node`` to act. Errors go through ``context.abort``."""

from __future__ import annotations

from typing import NoReturn

import grpc

from epoxi import mail, policy
from epoxi.policy import Policy
from epoxi.routing import is_ip, recipients_in, routing_key
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.node import Node

MAX_PROBLEMS_REPORTED = 20

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def StartPipeline(
        self, request: node_pb2.StartPipelineRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.StartPipelineResponse:
        problems = []
        if not request.domain or mail.address_problem(f"postmaster@{request.domain}") is not None:
            problems.append(f"domain {request.domain!r} is not a valid domain name")
        if not is_ip(request.source_ip):
            problems.append(f"source_ip {request.source_ip!r} is not an IP address")
        problems += policy.validate(request.policy)
        if problems:
            await _abort(context, _INVALID, "; ".join(problems))
        if not self.node.owns(request.source_ip):
            owned = ", ".join(self.node.egress_ips) or "none"
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self.node.id} cannot send from {request.source_ip}; it owns: {owned}",
            )
        key = routing_key(request.domain, request.source_ip)
        p, started = await self.node.start_pipeline(
            request.domain, request.source_ip, Policy.from_proto(request.policy, key)
        )
        return node_pb2.StartPipelineResponse(pipeline=await self.node.pipeline_info(p), started=started)

    async def StopPipeline(
        self, request: node_pb2.StopPipelineRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.StopPipelineResponse:
        p = await self.node.stop_pipeline(request.routing_key)
        if p is None:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no pipeline {request.routing_key!r} runs on node {self.node.id}",
            )
        return node_pb2.StopPipelineResponse(pipeline=await self.node.pipeline_info(p))

    async def ListPipelines(
        self, request: node_pb2.ListPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListPipelinesResponse:
        return node_pb2.ListPipelinesResponse(
            pipelines=[p.info for p in (await self.node.snapshot()).pipelines]
        )

    async def GetNodeState(
        self, request: node_pb2.GetNodeStateRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetNodeStateResponse:
        snap = await self.node.snapshot()
        return node_pb2.GetNodeStateResponse(node=snap.node, pipelines=[p.info for p in snap.pipelines])

    async def EnqueueBatch(
        self, request: node_pb2.EnqueueBatchRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.EnqueueBatchResponse:
        if not request.emails:
            await _abort(context, _INVALID, "emails is empty: send at least one email")
        problems = [p for i, e in enumerate(request.emails) for p in mail.validate(e, f"emails[{i}]")]
        if problems:
            await _abort(context, _INVALID, _summary(problems))
        p = self.node.pipelines.get(request.routing_key)
        if p is None:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no pipeline {request.routing_key!r} runs on node {self.node.id}; start it first",
            )
        outside = [
            f"emails[{i}] has no recipient in {p.domain}"
            for i, e in enumerate(request.emails)
            if not recipients_in(e, p.domain)
        ]
        if outside:
            await _abort(context, _INVALID, _summary(outside))
        ids = await self.node.enqueue(p, request.emails)
        return node_pb2.EnqueueBatchResponse(message_ids=ids, pipeline=await self.node.pipeline_info(p))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it always raises


def _summary(problems: list[str]) -> str:
    more = len(problems) - MAX_PROBLEMS_REPORTED
    return "; ".join(problems[:MAX_PROBLEMS_REPORTED]) + (f"; and {more} more" if more > 0 else "")
