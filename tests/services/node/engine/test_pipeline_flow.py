"""Lanes keep busy across batches: one slow recipient does not hold back the next batch.

A pipeline claims its next batch as soon as a lane is idle and nothing claimed is waiting, so a
server that takes its time over one RCPT delays that message only, not the mail claimed after it.
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
    fast_policy,
    messages,
    settled,
    smtp_to,
)

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
