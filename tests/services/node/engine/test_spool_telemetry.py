"""What the spool keeps and tells for telemetry: each message's traceparent (through a claim and
a hand-over, and in a spool file from before the column), its backlog in one query, and its
commits, counted only when they wrote rows."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from services.node import handoff
from services.node.engine.instruments import Instruments
from services.node.engine.reply import Reply
from services.node.engine.spool import Backlog, NewMessage, Outcome, Spool, State

KEY = "example.com_127_0_0_2"
OTHER = "example.org_127_0_0_2"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def message(*recipients: str) -> NewMessage:
    return NewMessage("ann@sender.test", list(recipients), b"Subject: hi\r\n\r\nhello\r\n")


class Commits(Instruments):
    def __init__(self) -> None:
        self.operations: list[str] = []

    def committed(self, operation: str, seconds: float, *, synced: bool = True) -> None:
        assert seconds >= 0
        self.operations.append(operation if synced else f"{operation} (not synced)")


async def test_a_message_keeps_its_traceparent_and_accepted_time_through_a_claim(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        before = time.time()
        [traced] = await spool.enqueue(KEY, [message("a@example.com")], traceparent=TRACEPARENT)
        [plain] = await spool.enqueue(KEY, [message("b@example.com")])
        jobs = {j.message_id: j for j in await spool.claim(KEY, time.time(), 10)}
        assert (jobs[traced].traceparent, jobs[plain].traceparent) == (TRACEPARENT, "")
        assert before <= jobs[traced].accepted_at <= time.time()
    finally:
        await spool.close()


async def test_handed_mail_keeps_the_traceparent_it_came_with(tmp_path: Path) -> None:
    giver = await Spool.open(tmp_path / "giver.db")
    taker = await Spool.open(tmp_path / "taker.db")
    try:
        [mid] = await giver.enqueue(KEY, [message("a@example.com")], traceparent=TRACEPARENT)
        [taken] = await giver.take_queued(KEY, 10)
        # As TakeMessages carries it from node to node.
        handed = handoff.from_proto(handoff.to_proto(taken), time.time())
        assert handed.traceparent == TRACEPARENT
        assert await taker.receive(KEY, [handed]) == [mid]
        [job] = await taker.claim(KEY, time.time(), 10)
        assert (job.message_id, job.traceparent, job.accepted_at) == (mid, TRACEPARENT, handed.accepted_at)
    finally:
        await giver.close()
        await taker.close()


async def test_a_spool_from_before_the_traceparent_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    [old] = await spool.enqueue(KEY, [message("a@example.com")])
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older node left it
        db.execute("ALTER TABLE messages DROP COLUMN traceparent")
    spool = await Spool.open(path)
    try:
        [new] = await spool.enqueue(KEY, [message("b@example.com")], traceparent=TRACEPARENT)
        jobs = {j.message_id: j.traceparent for j in await spool.claim(KEY, time.time(), 10)}
        assert jobs == {old: "", new: TRACEPARENT}
    finally:
        await spool.close()


async def test_the_backlog_is_counted_per_key_and_unfinished_state(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        await spool.enqueue(KEY, [message("a@example.com", "b@example.com")])
        await spool.enqueue(KEY, [message("c@example.com")])
        await spool.enqueue(OTHER, [message("d@example.org")])
        [first, _] = await spool.claim(KEY, time.time(), 2)  # both KEY messages in flight
        a, b = first.deliveries
        now = time.time()
        await spool.record(
            [
                Outcome(a.id, State.DELIVERED, 1, now, Reply.parse(250, "2.0.0 OK")),
                Outcome(b.id, State.DEFERRED, 1, now + 600, Reply.parse(451, "4.3.0 later")),
            ]
        )
        backlog = {(b.routing_key, b.state): b for b in await spool.backlog()}
        assert {k: b.deliveries for k, b in backlog.items()} == {
            (KEY, State.DEFERRED): 1,
            (KEY, State.INFLIGHT): 1,
            (OTHER, State.QUEUED): 1,
        }
        assert all(isinstance(b, Backlog) and 0 < b.oldest_accepted_at <= now for b in backlog.values())
    finally:
        await spool.close()


async def test_only_commits_that_wrote_rows_are_counted(tmp_path: Path) -> None:
    commits = Commits()
    spool = await Spool.open(tmp_path / "spool.db", commits)
    try:
        await spool.enqueue_batch(KEY, [message("a@example.com")], "batch-1")
        await spool.enqueue_batch(KEY, [message("a@example.com")], "batch-1")  # a duplicate: no write
        assert await spool.claim(OTHER, time.time(), 10) == []  # nothing due: no write
        [job] = await spool.claim(KEY, time.time(), 10)
        d = job.deliveries[0]
        await spool.record([Outcome(d.id, State.DELIVERED, 1, time.time(), Reply.parse(250, "OK"))])
        assert commits.operations == ["enqueue", "claim (not synced)", "record"]
    finally:
        await spool.close()
