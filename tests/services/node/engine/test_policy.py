"""Each policy knob, enforced by a running pipeline against a real sink and a real spool."""

from __future__ import annotations

import asyncio

import pytest

from devmesh.sink import Sink
from services.node.engine.spool import Counts, State
from tests.services.node.support import MakePipeline, RecordingSpool, enqueue, fast_policy, settled
from tests.support import eventually


@pytest.fixture
def spool(recording_spool: RecordingSpool) -> RecordingSpool:
    return recording_spool


def rcpts(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


# max_connections, and reuse


async def test_at_most_max_connections_each_carrying_many_messages(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(max_connections=3, batch_size=30))
    await enqueue(p, *rcpts(30))
    assert await settled(p) == Counts(delivered=30)
    assert sink.peak_sessions == 3  # three at once, never more
    assert sink.sessions == 3  # and each reused for ten messages


async def test_a_connection_is_replaced_after_its_message_limit(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(max_connections=1), max_messages_per_connection=2)
    await enqueue(p, *rcpts(5))
    assert await settled(p) == Counts(delivered=5)
    assert (sink.sessions, sink.peak_sessions) == (3, 1)


# batch_size and batch_timeout


async def test_batches_hold_at_most_batch_size_messages(
    make_pipeline: MakePipeline, spool: RecordingSpool
) -> None:
    p = make_pipeline(fast_policy(batch_size=2, batch_timeout=0.05))
    ids = await enqueue(p, *rcpts(5))
    assert await settled(p) == Counts(delivered=5)
    assert spool.batch_ids() == [ids[0:2], ids[2:4], ids[4:5]]


# When a partial batch waits and when it goes at once: test_pipeline_flow.py.


# allowed_messages per message_interval


def busiest_window(times: list[float], interval: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + interval) for i, start in enumerate(times))


async def test_no_window_of_message_interval_holds_more_than_allowed_messages(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    interval = 0.4
    p = make_pipeline(fast_policy(allowed_messages=3, message_interval=interval, max_connections=3))
    await enqueue(p, *rcpts(10))
    assert await settled(p) == Counts(delivered=10)
    assert busiest_window([r.at for r in sink.received], interval) == 3  # the burst, and never more


# max_retries


@pytest.mark.parametrize("max_retries", [0, 1, 3])
async def test_a_4xx_is_retried_max_retries_times(
    make_pipeline: MakePipeline, sink: Sink, max_retries: int
) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later"}
    p = make_pipeline(fast_policy(max_retries=max_retries))
    [mid] = await enqueue(p, "later@example.com")
    assert await settled(p) == Counts(bounced=1)
    [row] = await p.spool.deliveries(mid)
    assert row.reply is not None
    assert (row.state, row.attempts, row.reply.code) == (State.BOUNCED, max_retries + 1, 451)


# apply_policy


async def test_a_new_rate_limit_applies_to_waiting_mail(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline(fast_policy(allowed_messages=1, message_interval=3600.0, max_connections=1))
    await enqueue(p, *rcpts(3))
    await sink.wait_for(1)
    await asyncio.sleep(0.1)
    assert len(sink.received) == 1  # the rest wait an hour for the next slot
    p.apply_policy(fast_policy(allowed_messages=100, message_interval=1.0, max_connections=1))
    assert await settled(p) == Counts(delivered=3)
    assert sorted(sink.recipients()) == rcpts(3)


async def test_a_new_policy_does_not_grant_a_fresh_burst(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline(fast_policy(allowed_messages=2, message_interval=3600.0))
    await enqueue(p, *rcpts(3))

    async def two_done() -> bool:
        return (await p.counts()) == Counts(delivered=2, in_flight=1)  # the third waits for a slot

    await eventually(two_done)
    p.apply_policy(fast_policy(allowed_messages=2, message_interval=3600.0, batch_size=5))
    await asyncio.sleep(0.2)
    assert len(sink.received) == 2  # the two sends already made still count


async def test_fewer_connections_from_the_next_batch_on(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline(fast_policy(max_connections=3, batch_size=9))
    await enqueue(p, *rcpts(9, "a"))
    await settled(p)
    assert sink.peak_sessions == 3
    p.apply_policy(fast_policy(max_connections=1, batch_size=9))
    await eventually(lambda: _zero(sink.open_sessions))  # idle: the first batch's connections closed
    sink.peak_sessions = 0
    await enqueue(p, *rcpts(9, "b"))
    assert await settled(p) == Counts(delivered=18)
    assert sink.peak_sessions == 1


async def _zero(n: int) -> bool:
    return n == 0


async def test_policy_changes_while_sending_lose_and_repeat_nothing(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(max_connections=4, batch_size=3))
    expected = rcpts(60)
    await enqueue(p, *expected)
    for i in range(20):
        await asyncio.sleep(0.01)
        p.apply_policy(fast_policy(max_connections=1 + i % 4, batch_size=2 + i % 5, batch_timeout=0.01))
    assert await settled(p) == Counts(delivered=60)
    assert sorted(sink.recipients()) == sorted(expected)
