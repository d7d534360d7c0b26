"""One pipeline per routing key across nodes: placement records, redirects, hand-offs, restarts.

Real nodes with a real dev registry: each node's session is tied to its own health check, and
EnqueueBatch claims the key's record before it starts the pipeline."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import duration_pb2

from devmesh.sink import Sink
from epoxi.registry.client import Consul
from epoxi.registry.ownership import ConsulOwnership, record_key
from epoxi.v1 import node_pb2, pipeline_pb2
from services.node.registration import NODE_REFRESH_ROUNDS
from tests.support import SOURCE_IP, Nodes, eventually, valid_email

KEY = f"example.com_{SOURCE_IP.replace('.', '_')}"
FAST = pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=50_000_000))


def batch(*recipients: str, key: str = KEY, idempotency_key: str = "") -> node_pb2.EnqueueBatchRequest:
    return node_pb2.EnqueueBatchRequest(
        routing_key=key, emails=[valid_email(to=[r]) for r in recipients], idempotency_key=idempotency_key
    )


def owner_metadata(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}


async def record(consul: Consul, key: str = KEY) -> tuple[str, dict[str, str]] | None:
    _, entry = await consul.kv.get(record_key(key))
    if entry is None:
        return None
    return entry.get("Session") or "", json.loads(entry["Value"])


async def test_the_first_node_to_take_a_key_runs_it_and_the_others_name_it(
    nodes: Nodes, consul: Consul
) -> None:
    n1 = await nodes.start("n1", SOURCE_IP)
    await nodes.start("n2", SOURCE_IP)
    reply = await nodes.stub("n1").EnqueueBatch(batch("a@example.com"), timeout=5)
    assert reply.pipeline_started and reply.pipeline.node == "n1"
    held = await record(consul)
    assert held is not None and held[0] and held[1] == {"node": "n1", "address": n1.address}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await nodes.stub("n2").EnqueueBatch(batch("b@example.com"), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"routing key {KEY!r} is run by node n1" in (err.value.details() or "")
    found = owner_metadata(err.value)
    assert (found["epoxi-owner-node"], found["epoxi-owner-address"], found["epoxi-refused"]) == (
        "n1",
        n1.address,
        "1",
    )
    state = await nodes.stub("n2").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    assert list(state.pipelines) == []  # nothing started, nothing spooled on n2


async def test_many_nodes_placing_many_keys_at_once_give_each_key_one_pipeline(
    nodes: Nodes, consul: Consul
) -> None:
    ids = ["n1", "n2", "n3"]
    for id in ids:
        await nodes.start(id, SOURCE_IP)
    keys = [f"d{i}.test_{SOURCE_IP.replace('.', '_')}" for i in range(12)]

    async def place(id: str, key: str) -> str | None:
        domain = key.split("_")[0]
        try:
            reply: node_pb2.EnqueueBatchResponse = await nodes.stub(id).EnqueueBatch(
                batch(f"x@{domain}", key=key), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), e
            return None
        return reply.pipeline.node

    results = await asyncio.gather(*(place(id, key) for key in keys for id in ids))
    running: dict[str, list[str]] = {}
    for id in ids:
        state = await nodes.stub(id).GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        for p in state.pipelines:
            running.setdefault(p.routing_key, []).append(id)
    assert all(len(owners) == 1 for owners in running.values()), running
    assert set(running) == {k for k, r in zip([k for k in keys for _ in ids], results, strict=True) if r}
    for key, [owner] in running.items():
        held = await record(consul, key)
        assert held is not None and held[1]["node"] == owner


async def test_a_stop_hands_queued_and_deferred_mail_to_a_peer(nodes: Nodes, sink: Sink) -> None:
    await nodes.start("n1", SOURCE_IP, retry_base=0.2)
    await nodes.start("n2", SOURCE_IP)
    sink.replies = {"later@example.com": "451 4.3.0 try again"}
    await nodes.stub("n1").StartPipeline(
        node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP, policy=FAST), timeout=5
    )
    first = await nodes.stub("n1").EnqueueBatch(batch("later@example.com", "now@example.com"), timeout=5)

    async def deferred() -> bool:
        stats: node_pb2.GetQueueStatsResponse = await nodes.stub("n1").GetQueueStats(
            node_pb2.GetQueueStatsRequest(routing_key=KEY)
        )
        return stats.totals.deferred == 1 and stats.totals.delivered == 1

    await eventually(deferred)
    stop = await nodes.stub("n1").StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=10)
    assert (stop.messages_handed_off, stop.handed_to_node, stop.messages_kept) == (1, "n2", 0)
    n1_stats = await nodes.stub("n1").GetQueueStats(node_pb2.GetQueueStatsRequest())
    assert n1_stats.totals.queued + n1_stats.totals.deferred == 0
    # The message keeps its spool ID and its attempt count on n2, and n2 runs the key now.
    moved = await nodes.stub("n2").GetMessage(
        node_pb2.GetMessageRequest(message_id=first.message_ids[0]), timeout=5
    )
    [pending] = moved.message.recipients
    assert pending.recipient == "later@example.com" and pending.attempts >= 1
    sink.replies = {}
    await sink.wait_for(2)
    await asyncio.sleep(0.3)  # room for a wrong second delivery to show
    assert sorted(sink.recipients()) == ["later@example.com", "now@example.com"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await nodes.stub("n1").EnqueueBatch(batch("c@example.com"), timeout=5)
    assert owner_metadata(err.value)["epoxi-owner-node"] == "n2"


async def test_a_node_back_after_its_key_moved_hands_its_mail_to_the_owner(nodes: Nodes, sink: Sink) -> None:
    n1 = await nodes.start("n1", SOURCE_IP, retry_base=0.2)
    await nodes.start("n2", SOURCE_IP)
    sink.replies = {"held@example.com": "451 4.3.0 try again"}  # so that n1 still holds it
    await nodes.stub("n1").StartPipeline(
        node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP, policy=FAST), timeout=5
    )
    held = await nodes.stub("n1").EnqueueBatch(batch("held@example.com"), timeout=5)

    async def deferred() -> bool:
        stats: node_pb2.GetQueueStatsResponse = await nodes.stub("n1").GetQueueStats(
            node_pb2.GetQueueStatsRequest(routing_key=KEY)
        )
        return stats.totals.deferred == 1

    await eventually(deferred)
    await n1.close()  # its mail stays in its spool; its record is released
    del nodes.running["n1"]
    taken = await nodes.stub("n2").EnqueueBatch(batch("new@example.com"), timeout=5)
    assert taken.pipeline.node == "n2"
    await sink.wait_for(1)
    sink.replies = {}

    await nodes.start("n1", SOURCE_IP)  # resumes: the key is n2's, so the mail goes there

    async def handed() -> bool:
        stats: node_pb2.GetQueueStatsResponse = await nodes.stub("n1").GetQueueStats(
            node_pb2.GetQueueStatsRequest()
        )
        return stats.totals.queued + stats.totals.in_flight + stats.totals.deferred == 0

    await eventually(handed)
    await sink.wait_for(2)
    assert sorted(sink.recipients()) == ["held@example.com", "new@example.com"]
    moved = await nodes.stub("n2").GetMessage(
        node_pb2.GetMessageRequest(message_id=held.message_ids[0]), timeout=5
    )
    assert moved.message.id == held.message_ids[0]


async def test_take_messages_is_idempotent_per_message_and_per_batch_slot(nodes: Nodes, sink: Sink) -> None:
    await nodes.start("n2", SOURCE_IP)
    stub = nodes.stub("n2")
    # A batch the router retried onto n2 after n1 (unreachable) may have spooled it too.
    retried = await stub.EnqueueBatch(batch("a@example.com", idempotency_key="b1"), timeout=5)
    message = node_pb2.HandedMessage(
        id="0" * 32,
        sender="sender@example.net",
        recipients=["a@example.com"],
        content=b"Subject: hi\r\n\r\nhello\r\n",
        batch_key="b1",
        batch_index=0,
    )
    request = node_pb2.TakeMessagesRequest(routing_key=KEY, from_node="n1", messages=[message])
    reply = await stub.TakeMessages(request, timeout=5)
    assert list(reply.message_ids) == list(retried.message_ids)  # recognised: not spooled again
    fresh = node_pb2.HandedMessage()
    fresh.CopyFrom(message)
    fresh.id, fresh.batch_key = "1" * 32, "b2"
    request = node_pb2.TakeMessagesRequest(routing_key=KEY, from_node="n1", messages=[fresh, fresh])
    assert list((await stub.TakeMessages(request, timeout=5)).message_ids) == ["1" * 32] * 2
    await sink.wait_for(2)
    await asyncio.sleep(0.3)
    assert len(sink.received) == 2


async def test_take_messages_refuses_bad_input(nodes: Nodes) -> None:
    await nodes.start("n2", SOURCE_IP)
    bad = node_pb2.HandedMessage(id="", recipients=[], attempts=[1])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await nodes.stub("n2").TakeMessages(
            node_pb2.TakeMessagesRequest(routing_key="nope", messages=[bad]), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    for text in (
        "routing_key: routing key 'nope'",
        "messages[0].id is empty",
        "messages[0] has no recipients",
    ):
        assert text in details


async def test_after_handing_a_key_over_a_node_can_take_it_again(nodes: Nodes, sink: Sink) -> None:
    slow = pipeline_pb2.PipelinePolicy(batch_size=100, batch_timeout=duration_pb2.Duration(seconds=3600))
    n1 = await nodes.start("n1", SOURCE_IP)
    n2 = await nodes.start("n2", SOURCE_IP)
    await nodes.stub("n1").StartPipeline(
        node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP, policy=slow), timeout=5
    )
    await nodes.stub("n1").EnqueueBatch(batch("held@example.com"), timeout=5)
    await n1.close()
    del nodes.running["n1"]
    await nodes.stub("n2").EnqueueBatch(batch("new@example.com"), timeout=5)
    await nodes.start("n1", SOURCE_IP)  # hands its mail to n2 on resume
    await sink.wait_for(2)
    await n2.close()  # n2 lets go of the key
    del nodes.running["n2"]
    reply = await nodes.stub("n1").EnqueueBatch(batch("back@example.com"), timeout=5)
    assert reply.pipeline.node == "n1" and reply.pipeline_started
    assert reply.pipeline.policy.batch_size == 100  # the policy the key last ran with here
    await sink.wait_for(3)  # and sends it
    assert sorted(sink.recipients()) == ["back@example.com", "held@example.com", "new@example.com"]


async def test_a_nodes_session_outlives_its_periodic_registrations(nodes: Nodes, consul: Consul) -> None:
    node = await nodes.start("n1", SOURCE_IP)
    await nodes.stub("n1").EnqueueBatch(batch("a@example.com"), timeout=5)
    ownership = node.supervisor.ownership
    assert isinstance(ownership, ConsulOwnership) and ownership.session is not None
    session = ownership.session
    rounds = node.registrar._rounds if node.registrar else 0

    async def refreshed() -> bool:  # the registrar registers the node again every 12 rounds
        return node.registrar is not None and node.registrar._rounds >= rounds + 2 * NODE_REFRESH_ROUNDS

    await eventually(refreshed)
    _, found = await consul.session.info(session)
    assert found is not None and found["ID"] == session
    held = await record(consul)
    assert held is not None and held[0] == session


async def test_a_key_in_its_lock_delay_is_taken_once_it_passes(nodes: Nodes, consul: Consul) -> None:
    await nodes.start("n1", SOURCE_IP)
    # A node that held the key and vanished: its session ended, which arms the record's lock-delay.
    gone = await consul.session.create(name="epoxi-node gone", behavior="release", lock_delay=1)
    assert await consul.kv.put(record_key(KEY), json.dumps({"node": "gone", "address": "x:1"}), acquire=gone)
    await consul.session.destroy(gone)
    probe = await consul.session.create(name="probe", lock_delay=0)
    assert await consul.kv.put(record_key(KEY), "", acquire=probe) is False  # in its lock-delay now
    await consul.session.destroy(probe)

    reply = await nodes.stub("n1").EnqueueBatch(batch("a@example.com"), timeout=10)

    assert reply.pipeline_started and reply.pipeline.node == "n1"
    held = await record(consul)
    assert held is not None and held[0] and held[1]["node"] == "n1"
