"""A pipeline against a real sink and a real spool: delivery, retries, bounces, stops and crashes."""

from __future__ import annotations

import asyncio

from devmesh.sink import Sink
from services.node.engine.hooks import PipelineHooks
from services.node.engine.pipeline import FAILED, RUNNING, Pipeline
from services.node.engine.spool import Counts, Spool, State
from tests.services.node.support import (
    KEY,
    SOURCE_IP,
    Flaky,
    MakePipeline,
    enqueue,
    fast_policy,
    settled,
    smtp_to,
)
from tests.support import eventually


async def test_mail_is_delivered_from_the_source_ip(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline()
    await enqueue(p, "a@example.com", "b@example.com", "c@example.com")
    counts = await settled(p)
    assert counts == Counts(delivered=3)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com", "c@example.com"]
    assert {r.peer for r in sink.received} == {SOURCE_IP}
    assert p.state_line(counts) == "running: 0 queued, 0 in flight, 0 deferred, 3 delivered, 0 bounced"


async def test_a_4xx_defers_then_bounces_after_max_retries(make_pipeline: MakePipeline, sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later"}
    p = make_pipeline(fast_policy(max_retries=2))
    [mid] = await enqueue(p, "later@example.com")
    assert await settled(p) == Counts(bounced=1)
    [row] = await p.spool.deliveries(mid)
    assert row.state is State.BOUNCED
    assert row.attempts == 3  # the first attempt and two retries
    assert row.reply is not None
    assert (row.reply.code, row.reply.enhanced) == (451, "4.3.0")
    assert row.reply.text == "try later (gave up after 3 attempts)"
    assert sink.received == []


async def test_a_5xx_bounces_at_once_with_the_reply(make_pipeline: MakePipeline, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p = make_pipeline(fast_policy(max_retries=5))
    [mid, _] = await enqueue(p, "gone@example.com", "ok@example.com")
    assert await settled(p) == Counts(delivered=1, bounced=1)
    [row] = await p.spool.deliveries(mid)
    assert row.reply is not None
    assert (row.state, row.attempts, row.reply.code, row.reply.enhanced, row.reply.text) == (
        State.BOUNCED,
        1,
        550,
        "5.1.1",
        "no such user",
    )


async def test_a_temporary_failure_that_clears_ends_delivered(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    refusals = {"n": 0}

    def twice_then_accept(rcpt: str) -> str | None:
        if refusals["n"] < 2:
            refusals["n"] += 1
            return "421 4.7.0 busy"
        return None

    sink.reply_rule = twice_then_accept
    p = make_pipeline(fast_policy(max_retries=5))
    [mid] = await enqueue(p, "slow@example.com")
    assert await settled(p) == Counts(delivered=1)
    [row] = await p.spool.deliveries(mid)
    assert row.reply is not None
    assert (row.state, row.attempts, row.reply.code) == (State.DELIVERED, 3, 250)
    assert sink.recipients() == ["slow@example.com"]


async def test_a_full_batch_goes_without_waiting_for_the_timeout(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(batch_size=2, batch_timeout=3600.0))
    await enqueue(p, "a@example.com", "b@example.com")
    assert await settled(p) == Counts(delivered=2)


async def test_one_message_on_an_idle_pipeline_goes_without_waiting_for_the_timeout(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(batch_size=10, batch_timeout=3600.0))
    await enqueue(p, "a@example.com")  # one of ten, and nothing else sending: it goes at once
    await sink.wait_for(1)
    assert await settled(p) == Counts(delivered=1)
    await enqueue(p, "b@example.com")  # idle again after the first: the next goes at once too
    await sink.wait_for(2)
    assert sink.recipients() == ["a@example.com", "b@example.com"]


async def test_stopping_keeps_undelivered_mail_in_the_spool(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    waiting = make_pipeline(fast_policy(allowed_messages=1, message_interval=3600.0))
    await enqueue(waiting, "a@example.com", "b@example.com")  # the second waits for the rate limit
    await sink.wait_for(1)
    await waiting.stop()
    assert await spool.counts(KEY) == Counts(queued=1, delivered=1)
    assert sink.recipients() == ["a@example.com"]

    p = make_pipeline(fast_policy())
    assert await settled(p) == Counts(delivered=2)
    assert sink.recipients() == ["a@example.com", "b@example.com"]


async def test_a_crashed_pipeline_reports_the_failure_and_restarts(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    flaky = Flaky(smtp_to(sink))
    reports: list[str] = []

    class Reports(PipelineHooks):
        async def pipeline_failed(self, pipeline: Pipeline) -> None:
            reports.append(pipeline.state_line(await pipeline.counts()))

    p = make_pipeline(sender=flaky, hooks=Reports(), restart_delay=0.01)
    await enqueue(p, "a@example.com")

    async def crashed_twice() -> bool:
        return flaky.crashes >= 2

    await eventually(crashed_twice)
    assert p.restarts >= 1
    assert (
        reports[0]
        == "failed (RuntimeError: boom), restarting: 1 queued, 0 in flight, 0 deferred, 0 delivered, 0 bounced"
    )
    assert p.status in (FAILED, RUNNING)

    flaky.healed.set()
    assert await settled(p) == Counts(delivered=1)
    assert p.status == RUNNING
    assert sink.recipients() == ["a@example.com"]


async def test_the_pipeline_paces_sending_by_policy(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline(fast_policy(allowed_messages=2, message_interval=3600.0))
    await enqueue(p, "a@example.com", "b@example.com", "c@example.com")

    async def two_sent() -> bool:
        return len(sink.recipients()) == 2

    await eventually(two_sent)
    await asyncio.sleep(0.2)
    assert len(sink.recipients()) == 2  # the third waits for the next slot
    assert (await p.counts()).in_flight == 1
