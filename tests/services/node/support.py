"""Helpers for the node's tests: mail to send, fast policies, and waiting on pipelines and nodes.

The fixtures that build things (spools, pipelines, supervisors) are in ``conftest.py``; the
node, its stub, the sink and the registry come from ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from devmesh.sink import Sink
from epoxi import envelope, rendering
from epoxi.policy import Policy
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, pipeline_pb2
from services.node.engine.mx import Destinations, Host
from services.node.engine.pipeline import Pipeline
from services.node.engine.reply import Reply
from services.node.engine.smtp import Connection, Follow, SmtpSender
from services.node.engine.spool import Counts, Job, NewMessage, Spool
from tests.support import SOURCE_IP, eventually

if TYPE_CHECKING:
    from services.node.supervisor import PipelineSupervisor

__all__ = [
    "FAST",
    "KEY",
    "OTHER",
    "SENDER",
    "SENDER_KEY",
    "SOURCE_IP",
    "Flaky",
    "MakePipeline",
    "MakeSupervisor",
    "RecordingSpool",
    "Stub",
    "email",
    "enqueue",
    "enqueue_batch",
    "fast_policy",
    "messages",
    "settled",
    "smtp_to",
    "start",
    "state",
    "true_when",
]

Stub = node_pb2_grpc.NodeServiceStub
# The ``make_pipeline`` and ``make_supervisor`` fixtures (conftest.py).
MakePipeline = Callable[..., Pipeline]
MakeSupervisor = Callable[..., "PipelineSupervisor"]

SENDER = "Ann <ann@sender.test>"
KEY = "example.com_127_0_0_2"
OTHER = "example.org_127_0_0_2"
# Where DSNs to SENDER go from SOURCE_IP.
SENDER_KEY = "sender.test_127_0_0_2"


def email(*to: str, **fields: Any) -> email_pb2.Email:
    return envelope.new_email(SENDER, **{"to": list(to), "subject": "hi", "text": "hello", **fields})


def fast_policy(key: str = KEY, **overrides: Any) -> Policy:
    """Small batches and timeouts so tests never wait on the defaults."""
    fields: dict[str, Any] = {
        "name": key,
        "batch_size": 10,
        "batch_timeout": 0.02,
        "max_retries": 2,
        **overrides,
    }
    return Policy(**fields)


FAST = fast_policy().to_proto()


def smtp_to(sink: Sink, **kwargs: Any) -> SmtpSender:
    """The real SMTP sender, every domain routed to ``sink``."""
    kwargs.setdefault("timeout", 5)
    return SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "node.epoxi.test", **kwargs)


def true_when(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as something ``eventually`` polls."""

    async def probe() -> bool:
        return check()

    return probe


# Pipelines


def messages(*recipients: str) -> list[NewMessage]:
    """One rendered message per recipient, from ann@sender.test."""
    return [NewMessage("ann@sender.test", [r], rendering.render(email(r))) for r in recipients]


async def enqueue(p: Pipeline, *recipients: str) -> list[str]:
    """Spool a message to each recipient for ``p`` and wake it; their spool IDs."""
    ids = await p.spool.enqueue(p.routing_key, messages(*recipients))
    p.wake()
    return ids


async def settled(p: Pipeline) -> Counts:
    """Wait until nothing is queued, in flight or deferred; the counts then."""

    async def done() -> Counts | None:
        c = await p.counts()
        return c if c.unfinished == 0 else None

    return await eventually(done)


class RecordingSpool(Spool):
    """The real spool, remembering the jobs each claim took (a pipeline's batches)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[list[Job]] = []

    async def claim(self, routing_key: str, now: float, limit: int, due_by: float | None = None) -> list[Job]:
        jobs = await super().claim(routing_key, now, limit, due_by)
        if jobs:
            self.batches.append(jobs)
        return jobs

    def batch_ids(self) -> list[list[str]]:
        return [[j.message_id for j in batch] for batch in self.batches]

    def batch_recipients(self) -> list[list[str]]:
        """Each batch's messages by their first recipient."""
        return [[j.deliveries[0].recipient for j in batch] for batch in self.batches]


class Flaky:
    """The real SMTP sender, except that sending raises until ``healed`` is set."""

    def __init__(self, real: SmtpSender) -> None:
        self.real = real
        self.healed = asyncio.Event()
        self.crashes = 0

    def connection(self, domain: str, source_ip: str) -> _FlakyConnection:
        return _FlakyConnection(self, self.real.connection(domain, source_ip))


class _FlakyConnection:
    def __init__(self, owner: Flaky, conn: Connection) -> None:
        self.owner = owner
        self.conn = conn

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None = None
    ) -> dict[str, Reply]:
        if not self.owner.healed.is_set():
            self.owner.crashes += 1
            raise RuntimeError("boom")
        return await self.conn.send(sender, recipients, data, follow)

    async def close(self) -> None:
        await self.conn.close()


# A node, over gRPC


async def start(
    stub: Stub,
    domain: str = "example.com",
    ip: str = SOURCE_IP,
    policy: pipeline_pb2.PipelinePolicy | None = FAST,
    **fields: Any,
) -> node_pb2.StartPipelineResponse:
    """StartPipeline, by default with the fast policy (``policy=None``: none in the request)."""
    if policy is not None:
        fields["policy"] = policy
    request = node_pb2.StartPipelineRequest(domain=domain, source_ip=ip, **fields)
    reply: node_pb2.StartPipelineResponse = await stub.StartPipeline(request, timeout=5)
    return reply


async def state(stub: Stub) -> node_pb2.GetNodeStateResponse:
    reply: node_pb2.GetNodeStateResponse = await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    return reply


async def enqueue_batch(stub: Stub, key: str, *emails: email_pb2.Email) -> node_pb2.EnqueueBatchResponse:
    reply: node_pb2.EnqueueBatchResponse = await stub.EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key=key, emails=emails), timeout=5
    )
    return reply


async def enqueue_numbered(stub: Stub, total: int, per_batch: int = 10) -> None:
    """``total`` emails to r0@example.com, r1@... for KEY, ``per_batch`` a batch."""
    for i in range(0, total, per_batch):
        emails = [email(f"r{i + j}@example.com") for j in range(min(per_batch, total - i))]
        await enqueue_batch(stub, KEY, *emails)
