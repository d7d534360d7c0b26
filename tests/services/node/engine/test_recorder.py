"""The recorder on its own: groups of outcomes, one spool transaction each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from services.node.engine.recorder import Recorder
from services.node.engine.reply import Reply
from services.node.engine.spool import Counts, Outcome, Spool, State
from tests.services.node.support import KEY, messages

OK = Reply.parse(250, "2.0.0 OK")


class _FailingSpool(Spool):
    """A spool whose next ``fail`` recordings raise."""

    fail = 0

    async def record(self, outcomes: Iterable[Outcome]) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("disk on fire")
        await super().record(outcomes)


async def test_a_failed_recording_is_raised_once_and_leaves_its_mail_in_flight(tmp_path: Path) -> None:
    spool = await _FailingSpool.open(tmp_path / "spool.db")
    try:
        await spool.enqueue(KEY, messages("a@example.com", "b@example.com"))
        a, b = await spool.claim(KEY, time.time(), 10)
        recorder = Recorder(spool, group=10, delay=0.01)  # the delay starts the recording
        spool.fail = 1
        recorder.add([Outcome(a.deliveries[0].id, State.DELIVERED, 1, time.time(), OK)])
        await asyncio.sleep(0.1)
        with pytest.raises(OSError, match="disk on fire"):
            recorder.add([Outcome(b.deliveries[0].id, State.DELIVERED, 1, time.time(), OK)])
        assert await spool.counts(KEY) == Counts(in_flight=2)  # a goes back to the queue on release

        recorder.add([Outcome(b.deliveries[0].id, State.DELIVERED, 1, time.time(), OK)])
        await recorder.flush()
        assert await spool.counts(KEY) == Counts(in_flight=1, delivered=1)
    finally:
        await spool.close()


async def test_a_full_group_commits_at_once_and_the_rest_waits_for_the_delay(spool: Spool) -> None:
    await spool.enqueue(KEY, messages(*(f"r{i}@example.com" for i in range(5))))
    jobs = await spool.claim(KEY, time.time(), 10)
    outcomes = [Outcome(j.deliveries[0].id, State.DELIVERED, 1, time.time(), OK) for j in jobs]
    recorder = Recorder(spool, group=3, delay=3600.0)
    recorder.add(outcomes[:3])  # a full group
    await asyncio.sleep(0.1)
    assert await spool.counts(KEY) == Counts(in_flight=2, delivered=3)
    recorder.add(outcomes[3:])  # short of a group: it waits for the delay, or a flush
    await asyncio.sleep(0.1)
    assert await spool.counts(KEY) == Counts(in_flight=2, delivered=3)
    await recorder.flush()
    assert await spool.counts(KEY) == Counts(delivered=5)
