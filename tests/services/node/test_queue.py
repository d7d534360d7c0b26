"""Queue inspection over real gRPC: GetQueueStats, ListMessages and GetMessage."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest

from devmesh.sink import Sink
from epoxi.v1 import email_pb2, node_pb2, queue_pb2
from services.node.main import NodeConfig, RunningNode
from tests.services.node.support import FAST, KEY, OTHER, Stub, email, enqueue_batch, start
from tests.support import eventually


@pytest.fixture
def node_config(node_config: NodeConfig) -> NodeConfig:
    """n1 with retries an hour away: a deferred recipient stays deferred for the whole test."""
    return replace(node_config, retry_base=3600.0)


async def message_ids(stub: Stub, key: str, *emails: email_pb2.Email) -> list[str]:
    """EnqueueBatch; the spool IDs."""
    return list((await enqueue_batch(stub, key, *emails)).message_ids)


async def stats(stub: Stub, key: str = "") -> node_pb2.GetQueueStatsResponse:
    reply: node_pb2.GetQueueStatsResponse = await stub.GetQueueStats(
        node_pb2.GetQueueStatsRequest(routing_key=key), timeout=5
    )
    return reply


async def attempted(stub: Stub) -> node_pb2.GetQueueStatsResponse:
    """Wait until nothing is queued or in flight (deferred mail waits an hour); the stats then."""

    async def done() -> node_pb2.GetQueueStatsResponse | None:
        s = await stats(stub)
        return s if s.totals.queued + s.totals.in_flight == 0 else None

    return await eventually(done)


async def test_stats_count_each_state_and_give_the_next_retry(stub: Stub, sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later", "gone@example.com": "550 5.1.1 no such user"}
    await start(stub)
    await start(stub, domain="example.org")
    before = time.time()
    await message_ids(stub, KEY, email("ok@example.com", "later@example.com"), email("gone@example.com"))
    s = await attempted(stub)
    [com, org] = s.pipelines
    assert (com.routing_key, com.running, org.routing_key, org.running) == (KEY, True, OTHER, True)
    assert (com.counters.delivered, com.counters.deferred, com.counters.bounced) == (1, 1, 1)
    assert com.HasField("next_attempt_at") and com.next_attempt_at.ToSeconds() > before + 60
    assert not org.HasField("next_attempt_at") and org.counters.delivered == 0
    assert (s.totals.delivered, s.totals.deferred, s.totals.bounced) == (1, 1, 1)

    [only] = (await stats(stub, KEY)).pipelines
    assert only == com
    stop = await stub.StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=5)
    # No other node sends from its IP: the deferred mail stays, and the pipeline runs again for it.
    assert (stop.messages_kept, stop.messages_handed_off, stop.handed_to_node) == (1, 0, "")
    assert stop.kept_reason == "no other passing node sends from 127.0.0.2"
    [stopped] = (await stats(stub, KEY)).pipelines
    assert stopped.running and stopped.counters == com.counters


async def test_stats_of_an_unknown_routing_key_are_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stats(stub, "nothing.test_127_0_0_2")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        err.value.details() == "routing key 'nothing.test_127_0_0_2' has no pipeline and no mail on node n1"
    )


async def test_get_message_shows_every_attempt(stub: Stub, sink: Sink) -> None:
    sink.replies = {
        "later@example.com": "451 4.7.0 busy, come back",
        "gone@example.com": "550 5.1.1 no such user",
    }
    await start(stub)
    [mid] = await message_ids(
        stub,
        KEY,
        email("later@example.com", "gone@example.com", subject="Quarterly report", message_id="<q1@x>"),
    )
    await attempted(stub)
    reply: node_pb2.GetMessageResponse = await stub.GetMessage(
        node_pb2.GetMessageRequest(message_id=mid), timeout=5
    )
    m = reply.message
    assert (m.id, m.routing_key, m.sender, m.subject, m.message_id_header) == (
        mid,
        KEY,
        "ann@sender.test",
        "Quarterly report",
        "<q1@x>",
    )
    assert m.size_bytes > 0 and m.accepted_at.ToSeconds() > 0
    later, gone = m.recipients
    assert (
        later.recipient,
        later.state,
        later.attempts,
        later.smtp_code,
        later.enhanced_code,
        later.text,
    ) == (
        "later@example.com",
        queue_pb2.DELIVERY_STATE_DEFERRED,
        1,
        451,
        "4.7.0",
        "busy, come back",
    )
    assert later.HasField("next_attempt_at")
    assert (gone.state, gone.smtp_code, gone.enhanced_code, gone.text) == (
        queue_pb2.DELIVERY_STATE_BOUNCED,
        550,
        "5.1.1",
        "no such user",
    )
    assert not gone.HasField("next_attempt_at")
    assert [
        (a.recipient, a.attempt, a.result, a.smtp_code, a.enhanced_code, a.text) for a in reply.attempts
    ] == [
        ("later@example.com", 1, queue_pb2.DELIVERY_STATE_DEFERRED, 451, "4.7.0", "busy, come back"),
        ("gone@example.com", 1, queue_pb2.DELIVERY_STATE_BOUNCED, 550, "5.1.1", "no such user"),
    ]
    assert all(a.attempted_at.ToSeconds() > 0 for a in reply.attempts)


@pytest.mark.parametrize(
    ("message_id", "code", "details"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "message_id is empty: give a spool ID from EnqueueBatch"),
        ("0123abcd", grpc.StatusCode.NOT_FOUND, "no message '0123abcd' in the spool of node n1"),
    ],
)
async def test_get_message_errors(stub: Stub, message_id: str, code: grpc.StatusCode, details: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetMessage(node_pb2.GetMessageRequest(message_id=message_id), timeout=5)
    assert (err.value.code(), err.value.details()) == (code, details)


async def list_all(stub: Stub, **fields: object) -> tuple[list[queue_pb2.QueuedMessage], int]:
    """Every page of a listing; the messages and the number of pages."""
    messages: list[queue_pb2.QueuedMessage] = []
    token, pages = "", 0
    while True:
        reply: node_pb2.ListMessagesResponse = await stub.ListMessages(
            node_pb2.ListMessagesRequest(page_token=token, **fields),  # type: ignore[arg-type]
            timeout=5,
        )
        messages += reply.messages
        pages += 1
        token = reply.next_page_token
        if not token:
            return messages, pages


async def test_list_messages_by_state_a_page_at_a_time(stub: Stub, sink: Sink) -> None:
    sink.replies = {f"r{i}@example.com": "451 4.3.0 try later" for i in range(0, 7, 3)}
    await start(stub)
    await start(stub, domain="example.org")
    ids = await message_ids(stub, KEY, *[email(f"r{i}@example.com") for i in range(7)])
    [org] = await message_ids(stub, OTHER, email("x@example.org"))
    await attempted(stub)

    listed, pages = await list_all(stub, routing_key=KEY, page_size=2)
    assert sorted(m.id for m in listed) == sorted(ids) and len(listed) == 7 and pages == 4
    deferred, _ = await list_all(stub, routing_key=KEY, state=queue_pb2.DELIVERY_STATE_DEFERRED, page_size=2)
    assert sorted(m.recipients[0].recipient for m in deferred) == [
        "r0@example.com",
        "r3@example.com",
        "r6@example.com",
    ]
    delivered, _ = await list_all(stub, routing_key=KEY, state=queue_pb2.DELIVERY_STATE_DELIVERED)
    assert len(delivered) == 4 and all(m.recipients[0].smtp_code == 250 for m in delivered)
    everything, pages = await list_all(stub)
    assert {m.id for m in everything} == {*ids, org} and pages == 1
    none, _ = await list_all(stub, routing_key=OTHER, state=queue_pb2.DELIVERY_STATE_BOUNCED)
    assert none == []


@pytest.mark.parametrize(
    ("request_fields", "details"),
    [
        ({"page_size": -1}, "page_size must not be negative (got -1)"),
        ({"page_token": "not a token"}, "page_token is not a token this node issued"),
        ({"page_token": "W10"}, "page_token is not a token this node issued"),  # base64 of "[]"
        ({"state": 42}, "state 42 is not a DeliveryState"),
    ],
)
async def test_list_messages_rejects_bad_arguments(
    stub: Stub, request_fields: dict[str, object], details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListMessages(node_pb2.ListMessagesRequest(**request_fields), timeout=5)  # type: ignore[arg-type]
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)


async def test_a_page_token_only_continues_its_own_listing(stub: Stub) -> None:
    await start(stub, policy=FAST)
    await message_ids(stub, KEY, email("a@example.com"), email("b@example.com"))
    first = await stub.ListMessages(node_pb2.ListMessagesRequest(routing_key=KEY, page_size=1), timeout=5)
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListMessages(
            node_pb2.ListMessagesRequest(routing_key=OTHER, page_size=1, page_token=first.next_page_token),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "page_token belongs to a listing with another routing_key or state"


async def test_enqueue_batch_is_one_commit(node: RunningNode, stub: Stub) -> None:
    await start(stub, policy=FAST)
    statements: list[str] = []
    spool = node.spool
    await spool._run(spool._db.set_trace_callback, statements.append)
    await message_ids(stub, KEY, *[email(f"r{i}@example.com", cc=[f"c{i}@example.com"]) for i in range(20)])
    await spool._run(spool._db.set_trace_callback, None)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT INTO MESSAGES")]
    commits = [i for i, s in enumerate(statements) if s.strip().upper() == "COMMIT"]
    assert len(inserts) == 20
    # The 20 inserts (and their 40 deliveries) share one commit: none falls between them.
    first, last = statements.index(inserts[0]), statements.index(inserts[-1])
    assert commits and not any(first < i < last for i in commits)
