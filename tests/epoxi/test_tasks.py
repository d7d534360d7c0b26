"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from epoxi.tasks import cancel_and_wait, every


async def test_cancel_and_wait_ends_every_task() -> None:
    started = asyncio.Event()
    cleaned = []

    async def forever(name: str) -> None:
        try:
            started.set()
            await asyncio.sleep(3600)
        finally:
            cleaned.append(name)

    tasks = [asyncio.create_task(forever(n)) for n in "ab"]
    await started.wait()
    await cancel_and_wait(*tasks, None)
    assert sorted(cleaned) == ["a", "b"] and all(t.done() for t in tasks)


async def test_a_task_that_failed_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails(), name="failing")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, "epoxi.tasks"):
        await cancel_and_wait(task)
    assert "task failing ended with an error" in caplog.text and "boom" in caplog.text


async def test_the_callers_own_cancellation_propagates() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()  # takes its time to clean up

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    await asyncio.wait([inner])


async def test_every_repeats_and_outlives_a_failed_round(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    done = asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise RuntimeError("round two fails")
        if len(rounds) == 4:
            done.set()

    with caplog.at_level(logging.ERROR, "epoxi.tasks"):
        task = asyncio.create_task(every(0.001, work, "sweeping"))
        await asyncio.wait_for(done.wait(), 10)
        await cancel_and_wait(task)
    assert rounds[:4] == [0, 1, 2, 3]
    assert "sweeping failed" in caplog.text and "round two fails" in caplog.text
