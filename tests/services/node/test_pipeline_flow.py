"""Lanes keep busy across batches: one slow recipient does not hold back the next batch.

A pipeline claims its next batch as soon as a lane is idle and nothing claimed is waiting, so a
server that takes its time over one RCPT delays that message only, not the mail claimed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devmesh.sink import Sink
from epoxi import rendering
from services.node.engine.delivery import Destinations, Host, SmtpSender
from services.node.engine.pipeline import Pipeline, Retry
from services.node.engine.spool import Counts, Job, NewMessage, Spool
from tests.services.node.conftest import SOURCE_IP, email, fast_policy
from tests.support import eventually

KEY = "example.com_127_0_0_2"
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


class RecordingSpool(Spool):
    """The real spool, remembering which messages each claim took."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[list[str]] = []

    async def claim(self, routing_key: str, now: float, limit: int) -> list[Job]:
        jobs = await super().claim(routing_key, now, limit)
        if jobs:
            self.batches.append([j.deliveries[0].recipient for j in jobs])
        return jobs


@pytest.fixture
async def stalling_sink() -> AsyncIterator[StallingSink]:
    s = StallingSink()
    await s.start()
    yield s
    s.release.set()
    await s.stop()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[RecordingSpool]:
    s = await RecordingSpool.open(tmp_path / "spool.db")
    assert isinstance(s, RecordingSpool)
    yield s
    await s.close()


async def settled(p: Pipeline) -> Counts:
    async def done() -> Counts | None:
        c = await p.counts()
        return c if c.unfinished == 0 else None

    counts = await eventually(done)
    assert counts is not None
    return counts


async def test_a_slow_recipient_does_not_hold_back_the_next_batch(
    spool: RecordingSpool, stalling_sink: StallingSink
) -> None:
    sink = stalling_sink
    p = Pipeline(
        routing_key=KEY,
        domain="example.com",
        source_ip=SOURCE_IP,
        policy=fast_policy(max_connections=2, batch_size=2, batch_timeout=0.01),
        spool=spool,
        sender=SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "node.epoxi.test", timeout=30),
        retry=Retry(base=0.01, cap=0.05),
    )
    rcpts = ["slow@example.com", "a@example.com", "b@example.com", "c@example.com", "d@example.com"]
    await spool.enqueue(KEY, [NewMessage("ann@sender.test", [r], rendering.render(email(r))) for r in rcpts])
    p.start()
    try:
        await sink.stalled.wait()
        # One lane waits on the slow server; the other carries every later batch meanwhile.
        await sink.wait_for(4, STALL_LIMIT + 5)
        sink.release.set()
        assert await settled(p) == Counts(delivered=5)
    finally:
        sink.release.set()
        await p.stop(grace=1)
    assert spool.batches == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]  # batch_size per claim
    assert sink.recipients() == [*rcpts[1:], "slow@example.com"]  # the slow one last
    assert sink.peak_sessions == 2
