"""One trace follows an email across processes: the router's RouteEmails and its ``route batch``,
its EnqueueBatch call, the node's EnqueueBatch, the spool commit, and the SMTP delivery; and a
bounce, with its DSN's delivery, in the trace of the mail that bounced.

A real mesh (``devmesh.supervisor.Mesh``: each service its own process) exports its spans over
OTLP/gRPC to a real receiver in this test (``devmesh.otlp``), and delivers to a real SMTP sink
that refuses one recipient. This process traces nothing: the router's span is the root.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from devmesh.otlp import OtlpReceiver, ReceivedSpan
from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi.envelope import new_email
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from tests.support import batch_without_waiting

pytestmark = pytest.mark.asyncio(loop_scope="module")

IP = "127.0.0.2"
SENDER = "Epoxi Test <sender@epoxi.dev>"
REFUSED = "gone@bounced.test"
DSN_KEY = f"epoxi.dev_{IP.replace('.', '_')}"
# opentelemetry.proto.trace.v1.Span.SpanKind
INTERNAL, SERVER, CLIENT = 1, 2, 3
ERROR = 2  # Status.StatusCode
ENQUEUE = "epoxi.v1.NodeService/EnqueueBatch"
ROUTE = "epoxi.v1.RouterService/RouteEmails"


@dataclass
class Traced:
    mesh: Mesh
    receiver: OtlpReceiver
    sink: Sink


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traced]:
    receiver = OtlpReceiver()
    await receiver.start()
    sink = await Sink(replies={REFUSED: "550 5.1.1 no such user"}).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "EPOXI_NODE_DSN_FROM": "MAILER-DAEMON@node1.epoxi.test",
    }
    mesh = Mesh(
        tmp_path_factory.mktemp("tracing"),
        nodes=[NodeSpec("node1", [IP])],
        route=f"*={sink.address}",
        check_interval="200ms",
        env=env,
    )
    try:
        await mesh.start()
        assert mesh.consul is not None
        await batch_without_waiting(mesh.consul)
        yield Traced(mesh, receiver, sink)
    finally:
        await mesh.stop()
        await sink.stop()
        await receiver.close()


def email(to: str) -> email_pb2.Email:
    return new_email(SENDER, to=[to], subject="traced", text="hello", delivery=email_pb2.Delivery(ip=IP))


async def route(mesh: Mesh, to: str) -> router_pb2.BatchResult:
    async with channel(mesh.address("router")) as ch:
        reply: router_pb2.RouteEmailsResponse = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=[email(to)]), timeout=30
        )
    [batch] = reply.batches
    assert batch.ok, batch.error
    return batch


def one(spans: list[ReceivedSpan], name: str, **attributes: object) -> ReceivedSpan:
    found = [
        s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [(s.service, s.name, s.attributes) for s in spans])
    return found[0]


async def trace_with(
    receiver: OtlpReceiver, first: Callable[[ReceivedSpan], bool], names: list[str]
) -> list[ReceivedSpan]:
    """The spans of the trace holding a span that ``first`` picks, once it has a span of each of
    ``names`` (several processes export it, each on its own schedule)."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        picked = next((s for s in spans if first(s)), None)
        if picked is None:
            return False
        have = [s.name for s in receiver.trace(picked.trace_id)]
        return all(have.count(n) >= names.count(n) for n in set(names))

    async with asyncio.timeout(30):
        spans = await receiver.wait_for(complete)
    picked = next(s for s in spans if first(s))
    return receiver.trace(picked.trace_id)


async def test_one_trace_covers_router_node_spool_and_delivery(traced: Traced) -> None:
    key = f"traced.test_{IP.replace('.', '_')}"
    batch = await route(traced.mesh, "ann@traced.test")
    [message_id] = batch.message_ids
    await traced.sink.wait_for(1)
    spans = await trace_with(
        traced.receiver,
        lambda s: s.name == "smtp send" and s.attributes.get("epoxi.message_id") == message_id,
        [ROUTE, "route batch", ENQUEUE, ENQUEUE, "spool commit", "smtp send"],
    )

    routed = one(spans, ROUTE)
    assert (routed.service, routed.kind, routed.parent_span_id) == ("epoxi-router", SERVER, "")
    assert routed.attributes["rpc.system"] == "grpc"
    assert routed.attributes["rpc.service"] == "epoxi.v1.RouterService"
    assert routed.attributes["rpc.method"] == "RouteEmails"

    placed = one(spans, "route batch")
    assert (placed.service, placed.kind, placed.parent_span_id) == ("epoxi-router", INTERNAL, routed.span_id)
    assert placed.attributes["epoxi.routing_key"] == key
    assert placed.attributes["epoxi.node"] == "node1"

    [call] = [s for s in spans if s.name == ENQUEUE and s.kind == CLIENT]
    assert (call.service, call.parent_span_id) == ("epoxi-router", placed.span_id)
    assert call.attributes["rpc.method"] == "EnqueueBatch"

    [served] = [s for s in spans if s.name == ENQUEUE and s.kind == SERVER]
    assert served.service == "epoxi-node" and served.resource.get("service.instance.id") == "node1"
    assert served.parent_span_id == call.span_id  # across the processes, through gRPC metadata
    assert served.attributes["rpc.system"] == "grpc"
    assert served.attributes["rpc.service"] == "epoxi.v1.NodeService"
    assert served.attributes["rpc.grpc.status_code"] == 0
    assert (served.attributes["epoxi.routing_key"], served.attributes["epoxi.node"]) == (key, "node1")

    spooled = one(spans, "spool commit")
    assert (spooled.service, spooled.parent_span_id) == ("epoxi-node", served.span_id)
    assert spooled.attributes["db.system.name"] == "sqlite"
    assert (spooled.attributes["epoxi.routing_key"], spooled.attributes["epoxi.messages"]) == (key, 1)

    # The attempt runs later, in the pipeline: its parent is the context stored with the message.
    sent = one(spans, "smtp send")
    assert (sent.service, sent.kind, sent.parent_span_id) == ("epoxi-node", CLIENT, served.span_id)
    assert sent.attributes["epoxi.routing_key"] == key
    assert sent.resource.get("service.instance.id") == "node1"
    assert sent.attributes["epoxi.message_id"] == message_id
    assert sent.attributes["epoxi.attempt"] == 1
    assert sent.attributes["epoxi.smtp.reply_code"] == 250
    assert sent.attributes["epoxi.smtp.enhanced_code"] == "2.0.0"
    assert sent.attributes["epoxi.outcome"] == "delivered"
    assert sent.attributes["server.port"] == traced.sink.port
    assert sent.attributes["epoxi.smtp.connection_reused"] is False
    assert sent.status_code != ERROR

    # The message opened the pipeline's first connection: the lookup and the connect are inside.
    looked_up = one(spans, "dns mx")
    connected = one(spans, "smtp connect")
    assert looked_up.parent_span_id == sent.span_id and connected.parent_span_id == sent.span_id
    assert connected.attributes["network.local.address"] == IP
    assert connected.kind == CLIENT


async def test_a_bounce_and_its_dsn_delivery_join_the_bounced_mail_trace(traced: Traced) -> None:
    key = f"bounced.test_{IP.replace('.', '_')}"
    batch = await route(traced.mesh, REFUSED)
    [message_id] = batch.message_ids
    spans = await trace_with(
        traced.receiver,
        lambda s: s.name == "bounce" and s.attributes.get("epoxi.message_id") == message_id,
        [ROUTE, "route batch", ENQUEUE, ENQUEUE, "spool commit", "smtp send", "bounce", "smtp send"],
    )
    [served] = [s for s in spans if s.name == ENQUEUE and s.kind == SERVER]
    refused = one(spans, "smtp send", **{"epoxi.message_id": message_id})
    assert refused.parent_span_id == served.span_id
    assert refused.attributes["epoxi.routing_key"] == key
    assert refused.attributes["epoxi.smtp.reply_code"] == 550
    assert refused.attributes["epoxi.smtp.enhanced_code"] == "5.1.1"
    assert refused.attributes["epoxi.outcome"] == "bounced"
    assert refused.status_code == ERROR

    bounce = one(spans, "bounce")
    assert (bounce.service, bounce.kind, bounce.parent_span_id) == ("epoxi-node", INTERNAL, refused.span_id)
    dsn_id = bounce.attributes["epoxi.dsn.message_id"]
    dsn = one(spans, "smtp send", **{"epoxi.message_id": dsn_id})
    assert dsn.parent_span_id == bounce.span_id  # the DSN was spooled under the bounce span
    assert dsn.attributes["epoxi.routing_key"] == DSN_KEY
    assert dsn.attributes["epoxi.outcome"] == "delivered"
    assert dsn.attributes["epoxi.smtp.reply_code"] == 250
    report = next(m for m in traced.sink.received if m.rcpt_tos == ["sender@epoxi.dev"])
    assert report.mail_from == "<>"  # a DSN is sent from the null path
