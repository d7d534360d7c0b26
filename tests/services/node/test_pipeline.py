from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from devmesh.sink import Sink
from epoxi import rendering
from epoxi.policy import Policy
from services.node.engine.delivery import Destinations, Host, Result, SmtpConnection, SmtpSender
from services.node.engine.pipeline import FAILED, RUNNING, Pipeline, RateLimiter, Retry
from services.node.engine.spool import Counts, NewMessage, Spool, State
from tests.services.node.conftest import SOURCE_IP, email, fast_policy
from tests.support import eventually

KEY = "example.com_127_0_0_2"
FAST_RETRY = Retry(base=0.01, cap=0.05)

MakePipeline = Callable[..., Pipeline]


@pytest.fixture
async def make_pipeline(spool: Spool, sink: Sink) -> AsyncIterator[MakePipeline]:
    started: list[Pipeline] = []

    def make(policy: Policy | None = None, **kwargs: Any) -> Pipeline:
        kwargs.setdefault(
            "sender", SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "node.epoxi.test")
        )
        p = Pipeline(
            routing_key=KEY,
            domain="example.com",
            source_ip=SOURCE_IP,
            policy=policy or fast_policy(),
            spool=spool,
            retry=FAST_RETRY,
            **kwargs,
        )
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop(grace=1)


async def enqueue(p: Pipeline, *recipients: str) -> list[str]:
    messages = [NewMessage("ann@sender.test", [r], rendering.render(email(r))) for r in recipients]
    ids = await p.spool.enqueue(p.routing_key, messages)
    p.wake()
    return ids


async def settled(p: Pipeline) -> Counts:
    """Wait until nothing is queued, in flight or deferred."""

    async def done() -> Counts | None:
        c = await p.counts()
        return c if c.unfinished == 0 else None

    counts = await eventually(done)
    assert counts is not None
    return counts


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
    assert row.reply_code == 451
    assert row.reply_text == "4.3.0 try later (gave up after 3 attempts)"
    assert sink.received == []


async def test_a_5xx_bounces_at_once_with_the_reply(make_pipeline: MakePipeline, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p = make_pipeline(fast_policy(max_retries=5))
    [mid, _] = await enqueue(p, "gone@example.com", "ok@example.com")
    assert await settled(p) == Counts(delivered=1, bounced=1)
    [row] = await p.spool.deliveries(mid)
    assert (row.state, row.attempts, row.reply_code, row.reply_text) == (
        State.BOUNCED,
        1,
        550,
        "5.1.1 no such user",
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
    assert (row.state, row.attempts, row.reply_code) == (State.DELIVERED, 3, 250)
    assert sink.recipients() == ["slow@example.com"]


async def test_a_full_batch_goes_without_waiting_for_the_timeout(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    p = make_pipeline(fast_policy(batch_size=2, batch_timeout=3600.0))
    await enqueue(p, "a@example.com", "b@example.com")
    assert await settled(p) == Counts(delivered=2)


async def test_stopping_keeps_undelivered_mail_in_the_spool(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    waiting = make_pipeline(fast_policy(batch_size=10, batch_timeout=3600.0))
    await enqueue(waiting, "a@example.com")  # one of ten: the pipeline waits for the batch to fill
    await waiting.stop()
    assert await spool.counts(KEY) == Counts(queued=1)
    assert sink.received == []

    p = make_pipeline(fast_policy())
    assert await settled(p) == Counts(delivered=1)


class _Flaky:
    """The real SMTP sender, except that sending raises until ``healed`` is set."""

    def __init__(self, real: SmtpSender) -> None:
        self.real = real
        self.healed = asyncio.Event()
        self.crashes = 0

    def connection(self, domain: str, source_ip: str) -> _FlakyConnection:
        return _FlakyConnection(self, self.real.connection(domain, source_ip))


class _FlakyConnection:
    def __init__(self, owner: _Flaky, conn: SmtpConnection) -> None:
        self.owner = owner
        self.conn = conn

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Result]:
        if not self.owner.healed.is_set():
            self.owner.crashes += 1
            raise RuntimeError("boom")
        return await self.conn.send(sender, recipients, data)

    async def close(self) -> None:
        await self.conn.close()


async def test_a_crashed_pipeline_reports_the_failure_and_restarts(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    flaky = _Flaky(SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "node.epoxi.test"))
    reports: list[str] = []

    async def on_failure(p: Pipeline) -> None:
        reports.append(p.state_line(await p.counts()))

    p = make_pipeline(sender=flaky, on_failure=on_failure, restart_delay=0.01)
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


def test_retry_delay_grows_exponentially_with_jitter() -> None:
    r = Retry(base=10.0, cap=100.0)
    assert [r.delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [10.0, 20.0, 40.0, 80.0, 100.0]
    assert [r.delay(n, rng=lambda: 0.0) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]


def test_the_rate_limiter_allows_a_burst_of_exactly_allowed_then_waits_a_full_interval() -> None:
    now = [100.0]
    limiter = RateLimiter(allowed=3, interval=30.0, clock=lambda: now[0])
    assert [limiter.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take() is None  # all three in flight: nothing frees before one completes
    limiter.release()
    now[0] = 101.0
    limiter.release()
    limiter.release()
    assert limiter.take() == pytest.approx(29.0)  # the first slot frees 30 s after its send completed
    now[0] = 130.0
    assert limiter.take() == 0.0
    assert limiter.take() == pytest.approx(1.0)
    now[0] = 131.0
    assert [limiter.take(), limiter.take()] == [0.0, 0.0]
    assert limiter.take() is None


def test_the_rate_limiter_never_lets_more_than_allowed_into_any_window() -> None:
    """Sends that complete at once, as fast as the limiter lets them: GCRA would let 2n - 1 through."""
    now = [0.0]
    limiter = RateLimiter(allowed=3, interval=30.0, clock=lambda: now[0])
    sent: list[float] = []
    while len(sent) < 20:
        wait = limiter.take()
        assert wait is not None
        if wait > 0:
            now[0] += wait
            continue
        sent.append(now[0])
        limiter.release()
    assert sent[:3] == [0.0, 0.0, 0.0]  # a burst of exactly ``allowed``
    assert max(sum(1 for t in sent if s <= t < s + 30.0) for s in sent) == 3


def test_a_resized_rate_limiter_remembers_recent_sends() -> None:
    now = [0.0]
    limiter = RateLimiter(allowed=2, interval=10.0, clock=lambda: now[0])
    limiter.take()
    limiter.release()
    limiter.take()  # in flight during the change
    bigger = limiter.resized(3, 10.0)
    assert bigger.take() == 0.0
    assert bigger.take() == pytest.approx(10.0)  # 1 sent + 2 in flight fill the window of 3
    bigger.release()
    bigger.release()
    assert bigger.take() == pytest.approx(10.0)


async def test_the_pipeline_paces_sending_by_policy(make_pipeline: MakePipeline, sink: Sink) -> None:
    p = make_pipeline(fast_policy(allowed_messages=2, message_interval=3600.0))
    await enqueue(p, "a@example.com", "b@example.com", "c@example.com")

    async def two_sent() -> bool:
        return len(sink.recipients()) == 2

    await eventually(two_sent)
    await asyncio.sleep(0.2)
    assert len(sink.recipients()) == 2  # the third waits for the next slot
    assert (await p.counts()).in_flight == 1
