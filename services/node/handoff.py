"""Handing a routing key's spooled mail to the node that runs the key next.

``Peers`` is what the supervisor needs from the rest of the cluster: the other passing nodes
that can send from an IP, best first (``epoxi.placement``'s metric), and a way to give one of
them messages (``NodeService.TakeMessages``). The receiver answers only once the messages are
durably in its spool, and only then does the sender delete them; a message caught between the
two (a crash) is in both spools, and the receiver recognises it when it is handed again (same
spool ID), so it is never spooled twice. A message keeps its ``traceparent`` as it moves, so
its attempts on the receiving node join the trace that first spooled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc

from epoxi import placement, proto_time
from epoxi.policy import Policy
from epoxi.registry import services
from epoxi.registry.client import Consul, RegistryError
from epoxi.registry.ownership import Owner, owner_from_metadata
from epoxi.runtime.channels import RPC_TIMEOUT, Channels
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.engine.spool import Handed, Pending

# Messages per TakeMessages call: a few MB of typical mail, one transaction on each side.
CHUNK = 200


class HandOffError(Exception):
    """The receiving node did not take the messages."""


class OwnedBy(HandOffError):
    """The receiving node refused: another node owns the routing key."""

    def __init__(self, owner: Owner, message: str) -> None:
        super().__init__(message)
        self.owner = owner


class Peers(Protocol):
    async def candidates(self, source_ip: str) -> list[Owner]:
        """Other passing nodes that own ``source_ip``, best first; [] when unknown."""
        ...

    async def take(
        self, to: Owner, routing_key: str, messages: Sequence[Handed], policy: Policy | None = None
    ) -> list[str]:
        """Give ``messages`` to ``to`` (with the key's ``policy`` for the pipeline it starts);
        the IDs it holds them under. Raises ``OwnedBy`` or ``HandOffError``."""
        ...


class NoPeers:
    """A node alone: nobody to hand mail to."""

    async def candidates(self, source_ip: str) -> list[Owner]:
        return []

    async def take(
        self, to: Owner, routing_key: str, messages: Sequence[Handed], policy: Policy | None = None
    ) -> list[str]:
        raise HandOffError("this node has no registry, so no peers")


class ClusterPeers:
    """Peers found in the registry and reached over gRPC."""

    def __init__(self, consul: Consul, channels: Channels, me: str) -> None:
        self.consul = consul
        self.channels = channels
        self.me = me

    async def candidates(self, source_ip: str) -> list[Owner]:
        try:
            _, entries = await self.consul.health.service(services.NODE_SERVICE, passing=True)
        except RegistryError:
            return []
        nodes = [services.node_from_entry(e) for e in entries or []]
        return [Owner(n.id, n.address) for n in placement.candidates(nodes, source_ip) if n.id != self.me]

    async def take(
        self, to: Owner, routing_key: str, messages: Sequence[Handed], policy: Policy | None = None
    ) -> list[str]:
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(to.address))
        request = node_pb2.TakeMessagesRequest(
            routing_key=routing_key,
            from_node=self.me,
            messages=[to_proto(m) for m in messages],
            policy=policy.to_proto() if policy is not None else None,
        )
        try:
            reply = await stub.TakeMessages(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            owner = owner_from_metadata(e.trailing_metadata())
            if owner is not None:
                raise OwnedBy(owner, e.details() or "") from e
            raise HandOffError(f"node {to.node}: {e.code().name}: {e.details()}") from e
        return list(reply.message_ids)


def to_proto(m: Handed) -> node_pb2.HandedMessage:
    return node_pb2.HandedMessage(
        id=m.id,
        sender=m.sender,
        recipients=[p.recipient for p in m.pending],
        content=m.data,
        accepted_at=proto_time.timestamp(m.accepted_at),
        batch_key=m.batch_key,
        batch_index=m.batch_index,
        attempts=[p.attempts for p in m.pending],
        next_attempts=[proto_time.timestamp(p.next_attempt_at) for p in m.pending],
        traceparent=m.traceparent,
    )


def from_proto(m: node_pb2.HandedMessage, now: float) -> Handed:
    """The message as the spool stores it; a recipient without a schedule is due ``now``."""
    pending = []
    for i, recipient in enumerate(m.recipients):
        attempts = m.attempts[i] if i < len(m.attempts) else 0
        due = m.next_attempts[i].ToNanoseconds() / 1e9 if i < len(m.next_attempts) else now
        pending.append(Pending(recipient, attempts, due))
    accepted = m.accepted_at.ToNanoseconds() / 1e9 if m.HasField("accepted_at") else now
    traceparent = m.traceparent
    return Handed(
        m.id, m.sender, m.content, accepted, m.batch_key, m.batch_index, tuple(pending), traceparent
    )
