"""Conditions the monitor tests wait for with ``tests.support.eventually``, and the mail they send."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc

from devmesh.sink import Sink
from epoxi.envelope import new_email
from epoxi.registry import services
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2
from tests.support import Nodes

OWNER_ADDRESS = "epoxi-owner-address"
REFUSED = "epoxi-refused"
# Node settings for mail that moves between nodes: deferred mail is retried within 0.3 s.
FAST_RETRY: dict[str, Any] = {"retry_base": 0.05, "retry_cap": 0.3}


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def contains(value: Awaitable[Any], item: Any) -> bool:
    return item in await value


async def excludes(value: Awaitable[Any], item: Any) -> bool:
    return item not in await value


def key_of(domain: str, ip: str) -> str:
    return f"{domain}_{ip.replace('.', '_')}"


def mail(domain: str, ip: str, tag: str, count: int = 1) -> list[email_pb2.Email]:
    """``count`` emails to ``domain`` from ``ip``, Message-IDs ``<tag-i@epoxi.test>``."""
    return [
        new_email(
            "sender@epoxi.dev",
            to=[f"rcpt-{tag}-{i}@{domain}"],
            subject="hi",
            text="hello",
            message_id=f"<{tag}-{i}@epoxi.test>",
            delivery=email_pb2.Delivery(ip=ip),
        )
        for i in range(count)
    ]


def ids_of(emails: Sequence[email_pb2.Email]) -> list[str]:
    return [e.message_id for e in emails]


def received_ids(sink: Sink) -> Counter[str]:
    """How many times the sink received each Message-ID."""
    return Counter(str(r.message()["Message-ID"]) for r in sink.received)


class Hold:
    """Makes the sink defer every recipient (451) while ``on``: the mail stays queued on its node."""

    def __init__(self, sink: Sink) -> None:
        self.on = True
        sink.reply_rule = self.reply

    def reply(self, rcpt: str) -> str | None:
        return "451 4.3.0 held by the test" if self.on else None


async def enqueue(nodes: Nodes, address: str, key: str, emails: Sequence[email_pb2.Email], batch: str) -> str:
    """Spool ``emails`` on the node that owns ``key``, starting at ``address`` and following the
    refusals that name the owner (``epoxi-owner-address``); retried while the key is changing
    hands. The same ``batch`` (idempotency key) each time, so a retry never spools twice. The
    address of the node that took it."""
    request = node_pb2.EnqueueBatchRequest(routing_key=key, emails=emails, idempotency_key=batch)
    for _ in range(400):
        try:
            await nodes.stub_at(address).EnqueueBatch(request, timeout=10)
            return address
        except grpc.aio.AioRpcError as e:
            trailing = dict(e.trailing_metadata() or ())
            owner = trailing.get(OWNER_ADDRESS)
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and isinstance(owner, str) and owner:
                address = owner
                continue
            if trailing.get(REFUSED) != "1" and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        # Between owners (a stop under way, the record in its lock-delay): a moment later.
        await asyncio.sleep(0.02)
    raise AssertionError(f"no node took batch {batch} of {key}")


async def unfinished(nodes: Nodes) -> int:
    """Messages the running nodes still have to finish."""
    total = 0
    for id in nodes.running:
        state = await nodes.stub(id).GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        total += state.node.load
    return total


async def keys_on(nodes: Nodes, id: str) -> list[str]:
    listed = await nodes.stub(id).ListPipelines(node_pb2.ListPipelinesRequest(), timeout=5)
    return sorted(p.routing_key for p in listed.pipelines)


async def register_pipeline(
    consul: Any, node: str, domain: str, ip: str, address: str = "127.0.0.1:1"
) -> str:
    """A pipeline as a node registers it, but with no node refreshing its TTL check; its check ID."""
    key = key_of(domain, ip)
    info = pipeline_pb2.PipelineInfo(
        name=services.pipeline_service_id(node, key),
        routing_key=key,
        node=node,
        address=address,
        domain=domain,
        source_ip=ip,
    )
    await consul.agent.service.register(**services.pipeline_registration(info, "1m", "1m"))
    return services.pipeline_check_id(info.name)


async def register_ghost(consul: Any) -> None:
    """A node the registry shows passing that nothing answers for."""
    ghost = node_pb2.NodeInfo(id="ghost", address="127.0.0.1:1", egress_ips=["127.0.0.2"])
    registration = services.node_registration(ghost, "1s", "1m")
    registration["check"] = {"Name": "always passing", "TTL": "1m", "Status": "passing"}
    await consul.agent.service.register(**registration)
