"""The spool's attempt history and its queue inspection queries."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.node.engine.reply import Reply
from services.node.engine.spool import (
    AttemptRow,
    Counts,
    Delivery,
    MessageRow,
    NewMessage,
    Outcome,
    Spool,
    State,
)

KEY = "example.com_127_0_0_2"
OTHER = "example.org_127_0_0_2"


def message(*recipients: str, subject: str = "hi") -> NewMessage:
    return NewMessage("ann@sender.test", recipients, f"Subject: {subject}\r\n\r\nhello\r\n".encode())


async def record_two_in_one_commit(
    spool: Spool, outcomes: Callable[[Delivery, Delivery], list[Outcome]]
) -> str:
    """Spool one message to two recipients, claim it, and record ``outcomes(a, b)`` in one call;
    check that call was one commit, and return the message's ID."""
    [mid] = await spool.enqueue(KEY, [message("a@example.com", "b@example.com")])
    [job] = await spool.claim(KEY, time.time(), 10)
    statements: list[str] = []
    await spool._run(spool._db.set_trace_callback, statements.append)
    await spool.record(outcomes(*job.deliveries))
    await spool._run(spool._db.set_trace_callback, None)
    assert sum(s.strip().upper().startswith("COMMIT") for s in statements) == 1
    return mid


async def test_an_outcome_and_its_attempt_are_one_transaction(spool: Spool) -> None:
    mid = await record_two_in_one_commit(
        spool,
        lambda a, b: [
            Outcome(a.id, State.DEFERRED, 1, time.time() + 60, Reply.parse(451, "4.3.0 try later")),
            Outcome(b.id, State.BOUNCED, 1, time.time(), Reply.parse(550, "5.1.1 no such user")),
        ],
    )
    found = await spool.message(mid)
    assert found is not None
    _, attempts = found
    assert [
        (x.recipient, x.attempt, x.result, x.reply.code, x.reply.enhanced, x.reply.text) for x in attempts
    ] == [
        ("a@example.com", 1, State.DEFERRED, 451, "4.3.0", "try later"),
        ("b@example.com", 1, State.BOUNCED, 550, "5.1.1", "no such user"),
    ]


async def test_every_attempt_is_kept_in_order(spool: Spool) -> None:
    [mid] = await spool.enqueue(KEY, [message("a@example.com")])
    for n, (state, code, text) in enumerate(
        [
            (State.DEFERRED, 0, "cannot connect: refused"),
            (State.DEFERRED, 421, "4.7.0 busy"),
            (State.DELIVERED, 250, "2.0.0 OK"),
        ],
        start=1,
    ):
        [job] = await spool.claim(KEY, time.time() + 3600 * n, 1)
        await spool.record([Outcome(job.deliveries[0].id, state, n, time.time(), Reply.parse(code, text))])
    found = await spool.message(mid)
    assert found is not None
    row, attempts = found
    assert [(x.attempt, x.result, x.reply.code, x.reply.enhanced, x.reply.text) for x in attempts] == [
        (1, State.DEFERRED, 0, "", "cannot connect: refused"),
        (2, State.DEFERRED, 421, "4.7.0", "busy"),
        (3, State.DELIVERED, 250, "2.0.0", "OK"),
    ]
    assert attempts[0].attempted_at <= attempts[1].attempted_at <= attempts[2].attempted_at
    [d] = row.deliveries
    assert (d.state, d.attempts, d.reply) == (State.DELIVERED, 3, Reply(250, "2.0.0", "OK"))
    assert (row.id, row.routing_key, row.sender) == (mid, KEY, "ann@sender.test")
    assert row.size == len(b"Subject: hi\r\n\r\nhello\r\n") and row.head.startswith(b"Subject: hi")


async def message_on_opening(path: Path, mid: str) -> tuple[MessageRow, list[AttemptRow]]:
    """Open the spool file at ``path`` (migrating it), read message ``mid``, close it."""
    spool = await Spool.open(path)
    try:
        found = await spool.message(mid)
    finally:
        await spool.close()
    assert found is not None
    return found


async def a_deferred_and_b_delivered(spool: Spool) -> tuple[str, Delivery, Delivery]:
    """One message to a and b, its first attempt at 1000.0: a deferred, b delivered."""
    [mid] = await spool.enqueue(KEY, [message("a@example.com", "b@example.com")])
    [job] = await spool.claim(KEY, time.time(), 1)
    a, b = job.deliveries
    await spool.record(
        [
            Outcome(a.id, State.DEFERRED, 1, 1060.0, Reply.parse(451, "4.3.0 later"), attempted_at=1000.0),
            Outcome(b.id, State.DELIVERED, 1, 1000.0, Reply.parse(250, "2.0.0 OK"), attempted_at=1000.0),
        ]
    )
    return mid, a, b


async def test_the_attempt_that_finishes_a_delivery_is_its_row_and_ends_its_history(spool: Spool) -> None:
    mid, a, _ = await a_deferred_and_b_delivered(spool)
    [_] = await spool.claim(KEY, 2000.0, 1)  # a is due again
    await spool.record(
        [Outcome(a.id, State.BOUNCED, 2, 1500.0, Reply.parse(550, "5.1.1 gone"), attempted_at=1500.0)]
    )
    [(written,)] = await spool._run(
        spool._query, "SELECT COUNT(*) FROM attempts WHERE message_id = ?", (mid,)
    )
    assert written == 1  # the deferral only: each finishing attempt is its delivery's row
    found = await spool.message(mid)
    assert found is not None
    assert [(x.recipient, x.attempt, x.attempted_at, x.result, x.reply) for x in found[1]] == [
        ("a@example.com", 1, 1000.0, State.DEFERRED, Reply(451, "4.3.0", "later")),
        ("b@example.com", 1, 1000.0, State.DELIVERED, Reply(250, "2.0.0", "OK")),
        ("a@example.com", 2, 1500.0, State.BOUNCED, Reply(550, "5.1.1", "gone")),
    ]


@pytest.mark.parametrize("reopened", [1, 2])
async def test_a_spool_whose_history_holds_finished_attempts_reads_them_once(
    tmp_path: Path, reopened: int
) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    mid, _, b = await a_deferred_and_b_delivered(spool)
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older node left it
        db.execute(
            "INSERT INTO attempts (delivery_id, message_id, recipient, attempt, attempted_at, result,"
            " reply_code, enhanced_code, reply_text) VALUES (?, ?, 'b@example.com', 1, 999.5, 'delivered',"
            " 250, '2.0.0', 'OK')",
            (b.id, mid),
        )
        db.execute("UPDATE deliveries SET next_attempt_at = 999.0 WHERE id = ?", (b.id,))
        db.execute("PRAGMA user_version = 0")

    for _ in range(reopened):
        found = await message_on_opening(path, mid)
        assert [(x.recipient, x.attempt, x.attempted_at, x.result) for x in found[1]] == [
            ("b@example.com", 1, 999.5, State.DELIVERED),
            ("a@example.com", 1, 1000.0, State.DEFERRED),
        ]


async def test_queue_stats_give_the_next_retry_of_deferred_mail(spool: Spool) -> None:
    await spool.enqueue(KEY, [message("a@example.com"), message("b@example.com"), message("c@example.com")])
    await spool.enqueue(OTHER, [message("x@example.org")])
    now = time.time()
    jobs = await spool.claim(KEY, now, 2)
    await spool.record(
        [
            Outcome(jobs[0].deliveries[0].id, State.DEFERRED, 1, now + 300, Reply.parse(451, "4.3.0 later")),
            Outcome(jobs[1].deliveries[0].id, State.DEFERRED, 1, now + 100, Reply.parse(451, "4.3.0 later")),
        ]
    )
    stats = await spool.queue_stats()
    assert stats[KEY].counts == Counts(queued=1, deferred=2)
    assert stats[KEY].next_attempt_at == now + 100
    assert stats[OTHER].counts == Counts(queued=1) and stats[OTHER].next_attempt_at is None
    assert set(await spool.queue_stats(OTHER)) == {OTHER}
    assert await spool.queue_stats("nothing.test_127_0_0_2") == {}


async def test_listing_pages_through_messages_oldest_first(spool: Spool) -> None:
    ids = [(await spool.enqueue(KEY, [message(f"r{i}@example.com")]))[0] for i in range(5)]
    await spool.enqueue(OTHER, [message("x@example.org")])
    [job] = await spool.claim(KEY, time.time(), 1)
    await spool.record(
        [Outcome(job.deliveries[0].id, State.DELIVERED, 1, time.time(), Reply.parse(250, "2.0.0 OK"))]
    )

    seen: list[str] = []
    after = None
    while True:
        page = await spool.list_messages(KEY, None, after, 2)
        seen += [m.id for m in page]
        if len(page) < 2:
            break
        after = (page[-1].created_at, page[-1].id)
    assert seen == ids
    queued = await spool.list_messages(KEY, State.QUEUED, None, 10)
    assert [m.id for m in queued] == ids[1:]
    delivered = await spool.list_messages(KEY, State.DELIVERED, None, 10)
    assert [m.id for m in delivered] == [ids[0]]
    assert len(await spool.list_messages(None, None, None, 10)) == 6


async def test_an_unknown_message_is_none(spool: Spool) -> None:
    assert await spool.message("nope") is None


async def test_a_spool_from_before_attempt_history_opens_and_records(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    [mid] = await spool.enqueue(KEY, [message("a@example.com")])
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older node left it
        db.execute("DROP TABLE attempts")
    spool = await Spool.open(path)
    try:
        [job] = await spool.claim(KEY, time.time(), 1)
        await spool.record(
            [Outcome(job.deliveries[0].id, State.DELIVERED, 1, time.time(), Reply.parse(250, "2.0.0 OK"))]
        )
        found = await spool.message(mid)
        assert found is not None and [a.result for a in found[1]] == [State.DELIVERED]
    finally:
        await spool.close()


async def test_outcomes_recorded_together_keep_the_time_of_each_attempt(spool: Spool) -> None:
    mid = await record_two_in_one_commit(
        spool,
        lambda a, b: [
            Outcome(a.id, State.DELIVERED, 1, 1000.0, Reply.parse(250, "2.0.0 OK"), attempted_at=1000.0),
            Outcome(b.id, State.DEFERRED, 1, 1060.0, Reply.parse(451, "4.3.0 later"), attempted_at=1001.5),
        ],
    )
    found = await spool.message(mid)
    assert found is not None
    assert [(x.recipient, x.attempted_at) for x in found[1]] == [
        ("a@example.com", 1000.0),
        ("b@example.com", 1001.5),
    ]


OLD_REPLIES = {  # recipient: (code, text), as a node before the enhanced code column kept them
    "a@example.com": (250, "2.0.0 OK"),
    "b@example.com": (451, "4.3.0 try later (gave up after 3 attempts)"),
    "c@example.com": (0, "4.4.2 connection lost"),
    "d@example.com": (550, "no code here"),
    "e@example.com": (550, "5.1.1 5.1.1 twice"),  # split once only
}


@pytest.mark.parametrize("reopened", [1, 2])
async def test_a_spool_from_before_the_enhanced_code_column_reads_as_before(
    tmp_path: Path, reopened: int
) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    [mid] = await spool.enqueue(KEY, [message(*OLD_REPLIES, "f@example.com")])
    jobs = await spool.claim(KEY, time.time(), 10)
    await spool.record(
        Outcome(d.id, State.DEFERRED, 1, time.time(), Reply.parse(*OLD_REPLIES[d.recipient]))
        for j in jobs
        for d in j.deliveries
        if d.recipient in OLD_REPLIES
    )
    await spool.release(KEY)
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older node left it
        db.execute("ALTER TABLE deliveries DROP COLUMN enhanced_code")
        for rcpt, (code, text) in OLD_REPLIES.items():
            db.execute(
                "UPDATE deliveries SET reply_code = ?, reply_text = ? WHERE recipient = ?", (code, text, rcpt)
            )

    for _ in range(reopened):
        found = await message_on_opening(path, mid)
    replies = {d.recipient: d.reply for d in found[0].deliveries}
    assert replies == {
        "a@example.com": Reply(250, "2.0.0", "OK"),
        "b@example.com": Reply(451, "4.3.0", "try later (gave up after 3 attempts)"),
        "c@example.com": Reply(0, "4.4.2", "connection lost"),
        "d@example.com": Reply(550, "", "no code here"),
        "e@example.com": Reply(550, "5.1.1", "5.1.1 twice"),
        "f@example.com": None,  # never tried
    }
