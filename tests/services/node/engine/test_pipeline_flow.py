"""When a pipeline claims: at once when idle, in batches while lanes are busy.

A pipeline considers a claim as soon as a lane is idle and nothing claimed is waiting, so a
server that takes its time over one RCPT delays that message only, not the mail claimed after it.
While that lane is busy, the others take mail in batches of ``batch_size`` (or what waited
``batch_timeout``); once no lane is sending, whatever is due goes at once. A stalled RCPT keeps
one lane busy for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from devmesh.sink import Sink
from services.node.engine.spool import Counts
from tests.services.node.support import (
    KEY,
    MakePipeline,
    RecordingSpool,
    enqueue,
    fast_policy,
    messages,
    settled,
    smtp_to,
    true_when,
)
from tests.support import eventually

STALL_LIMIT = 10.0  # only so that a regression fails instead of hanging


class StallingSink(Sink):
    """A sink that holds its reply to ``RCPT TO:<slow@…>`` until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(rcpt_hook=self._stall)
        self.release = asyncio.Event()
        self.stalled = asyncio.Event()

    async def _stall(self, address: str) -> None:
        if address.startswith("slow@"):
            self.stalled.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), STALL_LIMIT)


@pytest.fixture
async def stalling_sink() -> AsyncIterator[StallingSink]:
    s = StallingSink()
    await s.start()
    yield s
    s.release.set()
    await s.stop()


@pytest.fixture
def spool(recording_spool: RecordingSpool) -> RecordingSpool:
    return recording_spool


async def test_a_slow_recipient_does_not_hold_back_the_next_batch(
    make_pipeline: MakePipeline, spool: RecordingSpool, stalling_sink: StallingSink
) -> None:
    sink = stalling_sink
    rcpts = ["slow@example.com", "a@example.com", "b@example.com", "c@example.com", "d@example.com"]
    await spool.enqueue(KEY, messages(*rcpts))  # spooled before the pipeline starts
    p = make_pipeline(
        fast_policy(max_connections=2, batch_size=2, batch_timeout=0.01), sender=smtp_to(sink, timeout=30)
    )
    try:
        await sink.stalled.wait()
        # One lane waits on the slow server; the other carries every later batch meanwhile.
        await sink.wait_for(4, STALL_LIMIT + 5)
        sink.release.set()
        assert await settled(p) == Counts(delivered=5)
    finally:
        sink.release.set()
        await p.stop(grace=1)
    assert spool.batch_recipients() == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]  # batch_size per claim
    assert sink.recipients() == [*rcpts[1:], "slow@example.com"]  # the slow one last
    assert sink.peak_sessions == 2


async def test_while_a_lane_is_busy_claims_come_in_full_batches(
    make_pipeline: MakePipeline, spool: RecordingSpool, stalling_sink: StallingSink
) -> None:
    sink = stalling_sink
    p = make_pipeline(
        fast_policy(max_connections=2, batch_size=10, batch_timeout=3600.0), sender=smtp_to(sink, timeout=30)
    )
    try:
        await enqueue(p, "slow@example.com")  # idle: claimed alone, at once
        await sink.stalled.wait()
        rcpts = [f"r{i}@example.com" for i in range(25)]
        for r in rcpts:  # a burst, one message per enqueue, while one lane is busy
            await enqueue(p, r)

        async def two_batches_sent() -> bool:
            return await p.counts() == Counts(queued=5, in_flight=1, delivered=20)

        await eventually(two_batches_sent, STALL_LIMIT)
        assert [len(b) for b in spool.batches] == [1, 10, 10]  # the five left wait for a full batch
        sink.release.set()
        assert await settled(p) == Counts(delivered=26)
    finally:
        sink.release.set()
        await p.stop(grace=1)
    # Once the slow lane ends, nothing is sending: the five go at once, in one claim.
    assert spool.batch_recipients() == [["slow@example.com"], rcpts[0:10], rcpts[10:20], rcpts[20:25]]


async def test_while_a_lane_is_busy_a_partial_batch_waits_for_the_batch_timeout(
    make_pipeline: MakePipeline, spool: RecordingSpool, stalling_sink: StallingSink
) -> None:
    sink = stalling_sink
    p = make_pipeline(
        fast_policy(max_connections=2, batch_size=10, batch_timeout=0.5), sender=smtp_to(sink, timeout=30)
    )
    try:
        await enqueue(p, "slow@example.com")
        await sink.stalled.wait()
        first = await enqueue(p, "a@example.com")
        await asyncio.sleep(0.05)
        second = await enqueue(p, "b@example.com")
        await sink.wait_for(2, STALL_LIMIT)  # sent while the slow lane is still busy
        assert spool.batch_ids()[1:] == [first + second]  # one partial batch, when its timeout ran out
    finally:
        sink.release.set()
        await p.stop(grace=1)


async def test_a_batch_waiting_to_fill_follows_a_new_batch_size(
    make_pipeline: MakePipeline, spool: RecordingSpool, stalling_sink: StallingSink
) -> None:
    sink = stalling_sink
    p = make_pipeline(
        fast_policy(max_connections=2, batch_size=10, batch_timeout=3600.0), sender=smtp_to(sink, timeout=30)
    )
    try:
        await enqueue(p, "slow@example.com")
        await sink.stalled.wait()
        ids = await enqueue(p, "a@example.com", "b@example.com")
        await asyncio.sleep(0.1)
        assert len(spool.batches) == 1  # two of ten: waiting for the batch to fill
        p.apply_policy(fast_policy(max_connections=2, batch_size=2, batch_timeout=3600.0))
        await eventually(true_when(lambda: len(spool.batches) == 2), STALL_LIMIT)
        assert spool.batch_ids()[1] == ids and not sink.release.is_set()
        await sink.wait_for(2, STALL_LIMIT)
    finally:
        sink.release.set()
        await p.stop(grace=1)
