"""NodeService over real gRPC, against node n1 (``tests/conftest.py``) sending to the sink."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from devmesh.sink import Sink
from epoxi.policy import Policy
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, pipeline_pb2
from services.node.main import NodeConfig, start_node
from tests.services.node.support import FAST, KEY, SOURCE_IP, Stub, email, start, state
from tests.support import eventually


async def test_start_pipeline_is_idempotent(stub: Stub) -> None:
    first = await start(stub)
    again = await start(stub, domain="EXAMPLE.com", policy=pipeline_pb2.PipelinePolicy(batch_size=1))
    assert (first.started, again.started) == (True, False)
    p = first.pipeline
    assert (p.name, p.routing_key, p.node, p.domain, p.source_ip) == (
        f"epoxi-pipeline-n1-{KEY}",
        KEY,
        "n1",
        "example.com",
        SOURCE_IP,
    )
    assert p.status == pipeline_pb2.PIPELINE_STATUS_RUNNING and p.healthy
    assert again.pipeline.started_at == p.started_at
    assert again.pipeline.policy == FAST  # the running pipeline keeps its policy
    listed = await stub.ListPipelines(node_pb2.ListPipelinesRequest(), timeout=5)
    assert [x.routing_key for x in listed.pipelines] == [KEY]


@pytest.mark.parametrize(
    ("domain", "ip", "policy", "expected"),
    [
        ("", SOURCE_IP, None, "domain '' is not a valid domain name"),
        ("bad domain", SOURCE_IP, None, "domain 'bad domain' is not a valid domain name"),
        ("example.com", "127.0.0.300", None, "source_ip '127.0.0.300' is not an IP address"),
        (
            "example.com",
            SOURCE_IP,
            pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(seconds=-1)),
            "policy.batch_timeout must be a positive duration",
        ),
    ],
)
async def test_start_pipeline_rejects_bad_arguments(
    stub: Stub, domain: str, ip: str, policy: pipeline_pb2.PipelinePolicy | None, expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, domain, ip, policy or pipeline_pb2.PipelinePolicy())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (err.value.details() or "")
    assert list((await state(stub)).pipelines) == []


async def test_start_pipeline_refuses_an_ip_the_node_does_not_own(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, ip="127.0.0.9")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "node n1 cannot send from 127.0.0.9; it owns: 127.0.0.2, 127.0.0.3"


async def test_stop_pipeline(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await start(stub)
    stopped = await stub.StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=5)
    assert stopped.pipeline.status == pipeline_pb2.PIPELINE_STATUS_STOPPED
    assert list((await state(stub)).pipelines) == []


async def test_enqueue_batch_delivers_from_the_source_ip(stub: Stub, sink: Sink) -> None:
    await start(stub)
    reply = await stub.EnqueueBatch(
        node_pb2.EnqueueBatchRequest(
            routing_key=KEY,
            emails=[email("a@example.com", "x@other.org"), email("b@example.com", cc=["c@example.com"])],
        ),
        timeout=5,
    )
    assert len(reply.message_ids) == 2 and len(set(reply.message_ids)) == 2
    assert reply.pipeline.routing_key == KEY
    await sink.wait_for(3)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com", "c@example.com"]
    assert {m.peer for m in sink.received} == {SOURCE_IP}
    assert all(m.mail_from == "ann@sender.test" for m in sink.received)

    async def all_delivered() -> bool:
        s = await state(stub)
        return s.pipelines[0].counters.delivered == 3 and s.node.load == 0

    await eventually(all_delivered)
    s = await state(stub)
    assert (s.node.id, list(s.node.egress_ips), s.node.pipeline_count, s.node.ip_pool) == (
        "n1",
        [SOURCE_IP, "127.0.0.3"],
        1,
        "default",
    )


@pytest.mark.parametrize(
    ("emails", "expected"),
    [
        ([], "emails is empty"),
        (
            [email("a@example.com", subject="hi\r\nBcc: evil@example.org")],
            "emails[0].subject contains CR or LF",
        ),
        (
            [
                email("a@example.com"),
                email(
                    "b@example.com",
                    headers=[email_pb2.Header(name="X-Tag", value="1\nBcc: evil@example.org")],
                ),
            ],
            "emails[1].headers[0] (X-Tag) value contains CR or LF",
        ),
        ([email("not-an-address")], "emails[0].to[0] 'not-an-address' is not an email address"),
        ([email("a@example.com"), email("b@example.org")], "emails[1] has no recipient in example.com"),
    ],
)
async def test_enqueue_batch_rejects_bad_emails_and_spools_nothing(
    stub: Stub, emails: list[email_pb2.Email], expected: str
) -> None:
    await start(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EnqueueBatch(node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=emails), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (err.value.details() or "")
    s = await state(stub)
    assert s.node.load == 0 and s.pipelines[0].counters == pipeline_pb2.PipelineCounters()


async def test_enqueue_batch_starts_the_pipeline_itself(stub: Stub, sink: Sink) -> None:
    request = node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com")])
    first = await stub.EnqueueBatch(request, timeout=5)
    assert first.pipeline_started and first.pipeline.routing_key == KEY and not first.duplicate
    second = await stub.EnqueueBatch(request, timeout=5)
    assert not second.pipeline_started and second.message_ids != first.message_ids
    await sink.wait_for(2)


async def test_enqueue_batch_with_a_known_idempotency_key_spools_nothing(stub: Stub, sink: Sink) -> None:
    emails = [email("a@example.com"), email("b@example.com")]
    request = node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=emails, idempotency_key="batch-1")
    first = await stub.EnqueueBatch(request, timeout=5)
    again = await stub.EnqueueBatch(request, timeout=5)
    assert (again.message_ids, again.duplicate, first.duplicate) == (first.message_ids, True, False)
    await sink.wait_for(2)

    async def both_delivered() -> bool:
        stats = await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(routing_key=KEY), timeout=5)
        return bool(stats.totals.delivered == 2)

    await eventually(both_delivered)  # the sink's 250 comes before the node records the delivery
    assert len(sink.received) == 2


async def test_enqueue_batch_refusals_say_nothing_was_spooled(stub: Stub) -> None:
    cases = [
        ("example.com_10_9_9_9", grpc.StatusCode.FAILED_PRECONDITION, "cannot send from 10.9.9.9"),
        ("not-a-key", grpc.StatusCode.INVALID_ARGUMENT, "routing_key: routing key 'not-a-key'"),
        ("example.org_127_0_0_2", grpc.StatusCode.INVALID_ARGUMENT, "has no recipient in example.org"),
    ]
    for key, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EnqueueBatch(
                node_pb2.EnqueueBatchRequest(routing_key=key, emails=[email("a@example.com")]), timeout=5
            )
        assert err.value.code() == code and text in (err.value.details() or ""), key
        assert ("epoxi-refused", "1") in tuple(err.value.trailing_metadata() or ())


def unfinished(p: pipeline_pb2.PipelineInfo) -> int:
    return p.counters.queued + p.counters.in_flight + p.counters.deferred


async def deferred(stub: Stub, n: int) -> bool:
    return sum(p.counters.deferred for p in (await state(stub)).pipelines) == n


async def test_a_restarted_node_resumes_unfinished_pipelines_with_their_policy(
    node_config: NodeConfig, sink: Sink
) -> None:
    slow = Policy(name="slow", batch_size=50, batch_timeout=3600.0).to_proto()
    # An idle pipeline sends at once: the sink defers the mail, so it stays unfinished (deferred
    # for its retry, minutes away) across the restart.
    sink.replies["a@example.com"] = "451 4.3.0 not now"
    async with await start_node(node_config) as first, channel(first.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        await start(stub, policy=slow)
        await stub.EnqueueBatch(
            node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com")]), timeout=5
        )
        await eventually(lambda: deferred(stub, 1))
        await start(stub, domain="example.org", policy=FAST)  # no mail: not resumed

    async with await start_node(node_config) as second, channel(second.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        [p] = (await state(stub)).pipelines
        assert p.routing_key == KEY and p.policy == slow
        assert unfinished(p) == 1 and sink.received == []  # deferred, and tried again

        # The only node for its IP: a stop keeps the mail, and the pipeline runs on with its policy.
        stop = await stub.StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=5)
        assert (stop.messages_kept, stop.handed_to_node) == (1, "")
        [p] = (await state(stub)).pipelines
        assert p.policy == slow and unfinished(p) == 1
