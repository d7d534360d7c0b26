"""Traces across the mesh's edges, each service its own process exporting to a real OTLP
receiver (devmesh.otlp): a message over SMTP is an ``smtp ingress`` span whose RouteEmails call
the router serves as its child, with a ``route batch`` span per batch around its EnqueueBatch;
an HTTP request with a ``traceparent`` is a gateway span, the child of that header, whose
upstream call the router serves as its child."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import aiosmtplib
import pytest
import pytest_asyncio

from devmesh.otlp import OtlpReceiver, ReceivedSpan
from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from tests.support import batch_without_waiting

pytestmark = pytest.mark.asyncio(loop_scope="module")

IP = "127.0.0.2"
INTERNAL, SERVER, CLIENT = 1, 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ROUTE_EMAILS = "epoxi.v1.RouterService/RouteEmails"
ENQUEUE = "epoxi.v1.NodeService/EnqueueBatch"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = OtlpReceiver()
    await r.start()
    yield r
    await r.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, sink: Sink, receiver: OtlpReceiver
) -> AsyncIterator[Mesh]:
    m = Mesh(
        data_dir=tmp_path_factory.mktemp("edge-tracing"),
        nodes=[NodeSpec("node1", [IP])],
        route=f"*={sink.address}",
        ingress=True,
        check_interval="200ms",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    await m.start()
    try:
        assert m.consul is not None
        await batch_without_waiting(m.consul)
        yield m
    finally:
        await m.stop()


def one(spans: list[ReceivedSpan], what: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    found = [s for s in spans if what(s)]
    assert len(found) == 1, found
    return found[0]


def child_of(parent: ReceivedSpan, service: str, name: str, kind: int) -> Callable[[ReceivedSpan], bool]:
    def matches(s: ReceivedSpan) -> bool:
        return (
            s.service == service
            and s.name == name
            and s.kind == kind
            and s.trace_id == parent.trace_id
            and s.parent_span_id == parent.span_id
        )

    return matches


async def spans_until(
    receiver: OtlpReceiver, done: Callable[[list[ReceivedSpan]], bool]
) -> list[ReceivedSpan]:
    async with asyncio.timeout(30):
        return await receiver.wait_for(done)


async def test_an_smtp_message_is_one_trace_through_the_router_to_the_node(
    mesh: Mesh, receiver: OtlpReceiver
) -> None:
    message_id = "<edge-trace-1@sender.test>"
    message = (
        "From: Sender <sender@sender.test>\r\nTo: ann@alpha.example, bob@alpha.example\r\n"
        f"Subject: traced\r\nMessage-ID: {message_id}\r\n\r\nhello\r\n"
    )
    host, _, port = mesh.smtp_address.rpartition(":")
    errors, reply = await aiosmtplib.send(
        message,
        sender="sender@sender.test",
        recipients=["ann@alpha.example", "bob@alpha.example"],
        hostname=host,
        port=int(port),
        start_tls=False,
    )
    assert not errors and "Ok: queued" in reply, (errors, reply)

    def ingress_span(s: ReceivedSpan) -> bool:
        return s.service == "epoxi-ingress" and s.name == "smtp ingress"

    wanted = {
        ("epoxi-ingress", "smtp ingress", SERVER),
        ("epoxi-ingress", ROUTE_EMAILS, CLIENT),
        ("epoxi-router", ROUTE_EMAILS, SERVER),
        ("epoxi-router", "route batch", INTERNAL),
        ("epoxi-router", ENQUEUE, CLIENT),
        ("epoxi-node", ENQUEUE, SERVER),
    }

    def complete(spans: list[ReceivedSpan]) -> bool:
        ours = [s.trace_id for s in spans if ingress_span(s)]
        return bool(ours) and wanted <= {(s.service, s.name, s.kind) for s in spans if s.trace_id == ours[0]}

    spans = await spans_until(receiver, complete)
    ingress = one(spans, ingress_span)
    assert ingress.kind == SERVER
    assert ingress.attributes["epoxi.message_id"] == message_id
    assert ingress.attributes["epoxi.recipients"] == 2
    assert ingress.attributes["network.peer.address"] == "127.0.0.1"
    assert ingress.attributes["epoxi.smtp.reply_code"] == 250
    assert ingress.parent_span_id == ""  # SMTP carries no context: a new trace

    spans = receiver.trace(ingress.trace_id)
    call = one(spans, child_of(ingress, "epoxi-ingress", ROUTE_EMAILS, CLIENT))
    served = one(spans, child_of(call, "epoxi-router", ROUTE_EMAILS, SERVER))
    assert served.attributes["epoxi.emails"] == 1
    batch = one(spans, child_of(served, "epoxi-router", "route batch", INTERNAL))
    assert batch.attributes["epoxi.routing_key"].startswith("alpha.example_")
    assert batch.attributes["epoxi.batch.emails"] == 1
    assert batch.attributes["epoxi.node"] == "node1"
    assert batch.attributes["epoxi.placement"] == "placed"
    enqueue = one(spans, child_of(batch, "epoxi-router", ENQUEUE, CLIENT))
    one(spans, child_of(enqueue, "epoxi-node", ENQUEUE, SERVER))


async def test_an_http_request_is_the_child_of_its_traceparent_and_the_parent_of_its_call(
    mesh: Mesh, receiver: OtlpReceiver
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {
        "emails": [
            {
                "from": "s@sender.test",
                "to": ["cat@beta.example"],
                "subject": "s",
                "text": "t",
                "delivery": {"ip": IP},
            }
        ]
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://{mesh.address('gateway')}/v1/emails",
            json=body,
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        ) as response,
    ):
        assert response.status == 200, await response.text()

    def routed(spans: list[ReceivedSpan]) -> bool:
        mine = [(s.service, s.kind) for s in spans if s.trace_id == trace_id]
        return ("epoxi-gateway", SERVER) in mine and ("epoxi-router", SERVER) in mine

    await spans_until(receiver, routed)
    spans = receiver.trace(trace_id)
    gateway = one(spans, lambda s: s.service == "epoxi-gateway" and s.kind == SERVER)
    assert gateway.name == "POST /v1/emails"
    assert gateway.parent_span_id == parent_id
    assert gateway.attributes["http.request.method"] == "POST"
    assert gateway.attributes["http.route"] == "/v1/emails"
    assert gateway.attributes["url.path"] == "/v1/emails"
    assert gateway.attributes["http.response.status_code"] == 200
    call = one(spans, child_of(gateway, "epoxi-gateway", ROUTE_EMAILS, CLIENT))
    one(spans, child_of(call, "epoxi-router", ROUTE_EMAILS, SERVER))
