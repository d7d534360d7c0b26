"""A pipeline records its outcomes in groups: one spool commit (one fsync) for many deliveries.

Outcomes wait for their group, never past the end of the batch or ``record_delay``; stopping and
crashing record them before in-flight mail is released, so nothing is lost or sent twice; and a
bounce's DSN is spooled before the group that records the bounce.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import pytest

from devmesh.sink import Sink
from services.node.engine.reply import Reply
from services.node.engine.smtp import Connection, Follow, SmtpSender
from services.node.engine.spool import Counts, Outcome, Spool, State
from tests.services.node.support import (
    KEY,
    SENDER_KEY,
    SOURCE_IP,
    MakePipeline,
    MakeSupervisor,
    email,
    fast_policy,
    messages,
    settled,
    smtp_to,
)
from tests.support import eventually


async def commits_during(spool: Spool, statements: list[str]) -> None:
    await spool._run(spool._db.set_trace_callback, statements.append)


def commits(statements: list[str]) -> int:
    return sum(s.strip().upper().startswith("COMMIT") for s in statements)


async def attempts_of(spool: Spool, ids: Iterable[str]) -> list[int]:
    """How many attempts each message's history holds."""
    found = [await spool.message(i) for i in ids]
    return [len(f[1]) for f in found if f is not None]


async def test_a_batch_of_k_deliveries_costs_about_k_over_the_group_commits(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    k, group = 120, 25
    ids = await spool.enqueue(KEY, messages(*(f"r{i}@example.com" for i in range(k))))
    statements: list[str] = []
    await commits_during(spool, statements)
    started = time.time()
    p = make_pipeline(
        fast_policy(batch_size=k, max_connections=4),
        record_group=group,
        record_delay=3600.0,  # only the group size and the end of the batch commit
    )
    p.wake()
    assert await settled(p) == Counts(delivered=k)
    await spool._run(spool._db.set_trace_callback, None)

    # One claim, a commit per full group, and the batch's remainder; one per outcome would be 120.
    assert commits(statements) <= 1 + math.ceil(k / group) + 1
    assert sorted(sink.recipients()) == sorted(f"r{i}@example.com" for i in range(k))
    assert await attempts_of(spool, ids) == [1] * k  # every attempt in the history, once
    found = await spool.message(ids[0])
    assert found is not None
    [attempt] = found[1]
    assert started <= attempt.attempted_at <= time.time()


async def test_a_long_batch_commits_its_outcomes_within_the_delay(
    make_pipeline: MakePipeline, sink: Sink
) -> None:
    # Two sends, then the rate limit holds the third for an hour: the batch is far from done.
    p = make_pipeline(fast_policy(allowed_messages=2, message_interval=3600.0), record_delay=0.05)
    await p.spool.enqueue(KEY, messages("a@example.com", "b@example.com", "c@example.com"))
    p.wake()

    async def two_recorded() -> bool:
        return await p.counts() == Counts(in_flight=1, delivered=2)

    await eventually(two_recorded, 2)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com"]


async def test_stopping_records_the_pending_outcomes_and_sends_nothing_twice(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    waiting = make_pipeline(
        fast_policy(allowed_messages=2, message_interval=3600.0), record_group=1000, record_delay=3600.0
    )
    ids = await spool.enqueue(KEY, messages("a@example.com", "b@example.com", "c@example.com"))
    waiting.wake()
    await sink.wait_for(2)
    await asyncio.sleep(0.1)
    assert await waiting.counts() == Counts(in_flight=3)  # sent, but their outcomes are pending
    await waiting.stop()
    assert await spool.counts(KEY) == Counts(queued=1, delivered=2)
    assert await attempts_of(spool, ids) == [1, 1, 0]

    p = make_pipeline(fast_policy())
    assert await settled(p) == Counts(delivered=3)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com", "c@example.com"]


class _Stuck:
    """The real SMTP sender, except that a send to ``stuck@`` never returns."""

    def __init__(self, real: SmtpSender) -> None:
        self.real = real

    def connection(self, domain: str, source_ip: str) -> _StuckConnection:
        return _StuckConnection(self.real.connection(domain, source_ip))


class _StuckConnection:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None = None
    ) -> dict[str, Reply]:
        if any(r.startswith("stuck@") for r in recipients):
            await asyncio.Event().wait()
        return await self.conn.send(sender, recipients, data, follow)

    async def close(self) -> None:
        await self.conn.close()


async def test_a_stop_past_its_grace_still_records_what_was_sent(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    stuck = make_pipeline(
        fast_policy(max_connections=1),
        sender=_Stuck(smtp_to(sink)),
        record_group=1000,
        record_delay=3600.0,
    )
    await spool.enqueue(KEY, messages("a@example.com", "b@example.com", "stuck@example.com"))
    stuck.wake()
    await sink.wait_for(2)
    await stuck.stop(grace=0.1)  # the task is cancelled mid-send
    assert await spool.counts(KEY) == Counts(queued=1, delivered=2)

    p = make_pipeline(fast_policy())
    assert await settled(p) == Counts(delivered=3)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com", "stuck@example.com"]


class _FailsOnce:
    """The real SMTP sender, except that the first send to ``boom@`` raises."""

    def __init__(self, real: SmtpSender) -> None:
        self.real = real
        self.failed = False

    def connection(self, domain: str, source_ip: str) -> _FailsOnceConnection:
        return _FailsOnceConnection(self, self.real.connection(domain, source_ip))


class _FailsOnceConnection:
    def __init__(self, owner: _FailsOnce, conn: Connection) -> None:
        self.owner = owner
        self.conn = conn

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None = None
    ) -> dict[str, Reply]:
        if not self.owner.failed and any(r.startswith("boom@") for r in recipients):
            self.owner.failed = True
            raise RuntimeError("boom")
        return await self.conn.send(sender, recipients, data, follow)

    async def close(self) -> None:
        await self.conn.close()


async def test_a_crash_records_what_was_sent_before_releasing_the_rest(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    flaky = _FailsOnce(smtp_to(sink))
    p = make_pipeline(
        fast_policy(max_connections=1),
        sender=flaky,
        restart_delay=0.01,
        record_group=1000,
        record_delay=3600.0,
    )
    rcpts = ["a@example.com", "b@example.com", "boom@example.com", "c@example.com"]
    ids = await spool.enqueue(KEY, messages(*rcpts))
    p.wake()
    assert await settled(p) == Counts(delivered=4)
    assert flaky.failed and p.restarts == 1
    assert sorted(sink.recipients()) == sorted(rcpts)  # a and b were not sent again
    assert await attempts_of(spool, ids) == [1, 1, 1, 1]


class _DsnWatchingSpool(Spool):
    """Notes, at each recording, the bounces it records and the DSNs already spooled."""

    seen: list[tuple[int, int]]

    async def record(self, outcomes: Iterable[Outcome]) -> None:
        outcomes = list(outcomes)
        dsns = await self.list_messages(SENDER_KEY, None, None, 100)
        self.seen.append((sum(o.state is State.BOUNCED for o in outcomes), len(dsns)))
        await super().record(outcomes)


@pytest.fixture
async def dsn_watching_spool(tmp_path: Path) -> AsyncIterator[_DsnWatchingSpool]:
    s = await _DsnWatchingSpool.open(tmp_path / "watched.db")
    s.seen = []
    yield s
    await s.close()


async def test_a_bounce_is_recorded_only_after_its_dsn_is_spooled(
    dsn_watching_spool: _DsnWatchingSpool, make_supervisor: MakeSupervisor, sink: Sink
) -> None:
    sink.reply_rule = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("gone") else None
    spool = dsn_watching_spool
    supervisor = make_supervisor(spool=spool)
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(max_connections=3))
    rcpts = [f"{'gone' if i % 3 == 0 else 'ok'}{i}@example.com" for i in range(9)]
    await supervisor.enqueue(p, [email(r) for r in rcpts])
    await sink.wait_for(6 + 3)  # six delivered, three DSNs to the sender

    async def all_recorded() -> bool:
        return await spool.all_counts() == {
            p.routing_key: Counts(delivered=6, bounced=3),
            SENDER_KEY: Counts(delivered=3),
        }

    await eventually(all_recorded)
    bounces_recorded = 0
    for bounces, dsns in spool.seen:
        bounces_recorded += bounces
        assert bounces_recorded <= dsns, spool.seen  # every bounce recorded has its DSN
    assert bounces_recorded == 3
    assert len(await spool.list_messages(SENDER_KEY, None, None, 100)) == 3
