"""Test nodes that answer EnqueueBatch as the node contract says (protos/epoxi/v1/node.proto),
on real ports, registered in the dev registry as real nodes register.

A ``ContractNode`` keeps no spool and sends no mail. Its EnqueueBatch takes the key's placement
record with the node's own registry session (``epoxi.registry.ownership.ConsulOwnership``, as a
node does), answers FAILED_PRECONDITION naming the owner when another node holds it, starts the
key's "pipeline" (registering its new pipeline count before it answers, as a node does), and
answers a batch it has by idempotency key with the same message IDs and ``duplicate``. Every
error it returns on purpose carries ``epoxi-refused: 1``. ``faults`` scripts the next calls:
refuse, fail without the marker, or spool and then lose the reply.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from epoxi.registry import ownership, services
from epoxi.registry.client import Consul
from epoxi.registry.ownership import ClaimError, ConsulOwnership, Owner
from epoxi.runtime.server import GrpcServer, bind_grpc_server
from epoxi.runtime.status import abort
from epoxi.v1 import node_pb2, node_pb2_grpc
from tests.support import CHECK_INTERVAL, eventually, passing_nodes, unused_address

NODE_SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
REFUSED = (ownership.REFUSED, "1")


class Fault(enum.Enum):
    REFUSE = "refuse"  # refuse on purpose (epoxi-refused), spooling nothing
    UNMARKED = "unmarked"  # fail before spooling, without the marker: ambiguous to the router
    LOSE_REPLY = "lose reply"  # spool the batch, then fail without the marker


@dataclass
class Script:
    fault: Fault
    code: grpc.StatusCode
    details: str = "scripted"


@dataclass
class Spooled:
    request: node_pb2.EnqueueBatchRequest
    message_ids: list[str]


class ContractNode(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, info: node_pb2.NodeInfo, consul: Consul) -> None:
        self.info = info
        self.consul = consul
        self.ownership = ConsulOwnership(consul, info.id, info.address, f"service:{info.id}")
        self.pipelines: set[str] = set()
        # By idempotency key: each batch spooled once.
        self.spooled: dict[str, Spooled] = {}
        self.calls: list[node_pb2.EnqueueBatchRequest] = []
        self.faults: deque[Script] = deque()
        # Answer every call FAILED_PRECONDITION naming this owner, whoever holds the record.
        self.redirect_to: Owner | None = None
        self._ids = itertools.count(1)

    def registration(self) -> dict[str, Any]:
        info = node_pb2.NodeInfo()
        info.CopyFrom(self.info)
        info.pipeline_count = len(self.pipelines)
        return services.node_registration(info, f"{int(CHECK_INTERVAL * 1000)}ms", "1m")

    async def register(self) -> None:
        await self.consul.agent.service.register(**self.registration())

    async def EnqueueBatch(
        self, request: node_pb2.EnqueueBatchRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.EnqueueBatchResponse:
        self.calls.append(request)
        script = self.faults.popleft() if self.faults else None
        if script is not None and script.fault is Fault.REFUSE:
            await refuse(context, script.code, script.details)
        if script is not None and script.fault is Fault.UNMARKED:
            await abort(context, script.code, script.details)
        if not request.emails:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "emails is empty")
        key = request.routing_key
        if self.redirect_to is not None:
            await refuse_for(context, self.redirect_to, f"routing key {key!r} is owned by another node")
        try:
            holder = await self.ownership.claim(key)
        except ClaimError as e:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, str(e))
        if holder is not None:
            await refuse_for(context, holder, f"routing key {key!r} runs on node {holder.node}")
        started = key not in self.pipelines
        spooled = self.spooled.get(request.idempotency_key)
        if spooled is None:
            spooled = Spooled(request, [f"{self.info.id}-{next(self._ids)}" for _ in request.emails])
            self.spooled[request.idempotency_key] = spooled
        if started:
            self.pipelines.add(key)
            await self.register()  # before answering, as a node registers its new pipeline
        if script is not None and script.fault is Fault.LOSE_REPLY:
            await abort(context, script.code, script.details)
        return node_pb2.EnqueueBatchResponse(
            message_ids=spooled.message_ids,
            pipeline_started=started,
            duplicate=spooled.request is not request,
        )

    async def release(self, routing_key: str) -> None:
        """Stop running ``routing_key``: free its record (no lock-delay)."""
        self.pipelines.discard(routing_key)
        await self.ownership.release(routing_key)


async def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call on purpose: nothing was spooled."""
    context.set_trailing_metadata((REFUSED,))
    await abort(context, code, details)


async def refuse_for(context: grpc.aio.ServicerContext, owner: Owner, details: str) -> NoReturn:
    context.set_trailing_metadata((REFUSED, *ownership.owner_metadata(owner)))
    await abort(context, grpc.StatusCode.FAILED_PRECONDITION, details)


@dataclass
class ContractNodes:
    """Starts ContractNodes on real ports, registered in the registry; closes them all."""

    consul: Consul
    running: dict[str, ContractNode] = field(default_factory=dict)
    servers: dict[str, GrpcServer] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)

    async def start(self, id: str, *egress_ips: str) -> ContractNode:
        server = bind_grpc_server("127.0.0.1:0")
        info = node_pb2.NodeInfo(id=id, address=f"127.0.0.1:{server.port}", egress_ips=list(egress_ips))
        node = ContractNode(info, self.consul)  # type: ignore[abstract]  # only what the router calls
        await server.start(
            [(lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(node, s), NODE_SERVICE_NAME)]
        )
        await server.serving()
        self.running[id], self.servers[id] = node, server
        await node.register()
        return node

    async def start_unreachable(self, id: str, *egress_ips: str) -> node_pb2.NodeInfo:
        """A node the registry shows passing (a TTL check, passed) at an address nothing
        listens on: dialing it fails to connect."""
        info = node_pb2.NodeInfo(id=id, address=unused_address(), egress_ips=list(egress_ips))
        registration = services.node_registration(info, "1s", "1m")
        registration["check"] = {"Name": "node TTL", "TTL": "1h", "Status": "passing"}
        await self.consul.agent.service.register(**registration)
        self.dead.append(id)
        return info

    async def all_passing(self, *ids: str) -> None:
        wanted = set(ids or [*self.running, *self.dead])

        async def passing() -> bool:
            return await passing_nodes(self.consul) >= wanted

        await eventually(passing, seconds=20)

    async def close(self) -> None:
        for id, node in self.running.items():
            await node.ownership.close()
            await self.servers[id].stop(0)
        await asyncio.gather(
            *(self.consul.agent.service.deregister(id) for id in [*self.running, *self.dead]),
            return_exceptions=True,
        )
