"""Bodies apart from envelopes: what scans the queue never reads a body, and old spool files move theirs.

A spool file from before the ``bodies`` table kept each body in its ``messages`` row; opening it
moves the bodies out and the mail in it is delivered as before.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from devmesh.sink import Sink
from services.node.engine.spool import Counts, NewMessage, Spool, State
from tests.services.node.support import KEY, MakePipeline, settled

# A 100 KB message, in lines SMTP allows.
BODY = b"Subject: big\r\nMessage-ID: <big@sender.test>\r\n\r\n" + (b"x" * 76 + b"\r\n") * 1300

# The two tables as a node before the bodies table created them (indexes included).
OLD_DDL = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    routing_key TEXT NOT NULL,
    sender TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL,
    batch_key TEXT,
    batch_index INTEGER,
    traceparent TEXT
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id),
    routing_key TEXT NOT NULL,
    recipient TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'inflight', 'deferred', 'delivered', 'bounced')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    reply_code INTEGER,
    enhanced_code TEXT,
    reply_text TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (routing_key, state, next_attempt_at);
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX messages_listed ON messages (routing_key, created_at, id);
CREATE INDEX messages_created ON messages (created_at, id);
"""


def old_spool_file(path: Path) -> None:
    """A spool file as a node before the bodies table left it: two messages, one in flight."""
    now = time.time()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_DDL)
        db.executemany(
            "INSERT INTO messages (id, routing_key, sender, data, created_at) VALUES (?, ?, ?, ?, ?)",
            [
                ("m1", KEY, "ann@sender.test", BODY, now),
                ("m2", KEY, "ann@sender.test", b"Subject: s\r\n\r\nx\r\n", now),
            ],
        )
        db.executemany(
            "INSERT INTO deliveries (message_id, routing_key, recipient, state, next_attempt_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("m1", KEY, "a@example.com", "queued", now, now),
                ("m1", KEY, "b@example.com", "inflight", now, now),
                ("m2", KEY, "c@example.com", "queued", now, now),
            ],
        )


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    """The pipelines' spool: an old file, opened (and so migrated) as a node opens it."""
    path = tmp_path / "old.db"
    old_spool_file(path)
    s = await Spool.open(path)
    yield s
    await s.close()


async def test_an_old_spool_files_bodies_move_out_and_its_mail_is_delivered(
    make_pipeline: MakePipeline, spool: Spool, sink: Sink
) -> None:
    assert await spool.counts(KEY) == Counts(queued=3)  # what was in flight went back to the queue
    [big, small] = await spool.list_messages(KEY, None, None, 10)
    assert small.size < big.size
    assert (big.id, big.size, big.head) == ("m1", len(BODY), BODY[:8192])
    columns = await spool._run(spool._query, "SELECT name FROM pragma_table_info('messages')", ())
    assert "data" not in {c for (c,) in columns}

    p = make_pipeline()
    p.wake()
    assert await settled(p) == Counts(delivered=3)
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com", "c@example.com"]
    [received] = [r for r in sink.received if "a@example.com" in r.rcpt_tos]
    assert received.data.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")
    assert [d.state for d in await spool.deliveries("m2")] == [State.DELIVERED]


async def test_an_old_spool_file_opens_again_after_its_migration(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_spool_file(path)
    await (await Spool.open(path)).close()
    spool = await Spool.open(path)
    try:
        jobs = await spool.claim(KEY, time.time(), 10)
        assert {j.message_id: j.data for j in jobs} == {"m1": BODY, "m2": b"Subject: s\r\n\r\nx\r\n"}
    finally:
        await spool.close()


# Which statements read bodies


async def traced(spool: Spool, call: Callable[[], Awaitable[object]]) -> list[str]:
    """The SELECTs that ``call`` runs on the spool's connection, parameters filled in."""
    statements: list[str] = []
    await spool._run(spool._db.set_trace_callback, statements.append)
    try:
        await call()
    finally:
        await spool._run(spool._db.set_trace_callback, None)
    return [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]


def body_reads(db: sqlite3.Connection, sql: str) -> list[str]:
    """How ``sql``'s query plan reaches the bodies table (its lines naming it)."""
    sql = sql.replace("-Inf", "-9e999")  # how the trace prints minus infinity
    return [
        d for *_, d in db.execute("EXPLAIN QUERY PLAN " + sql) if "bodies" in d or d.split()[1:2] == ["b"]
    ]


async def plans(spool: Spool, call: Callable[[], Awaitable[object]]) -> list[list[str]]:
    return [await spool._run(body_reads, spool._db, s) for s in await traced(spool, call)]


async def test_queue_scans_counts_and_due_never_read_a_body(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        await spool.enqueue(
            KEY, [NewMessage("ann@sender.test", [f"r{i}@example.com"], BODY) for i in range(3)]
        )
        now = time.time()
        for counting in (lambda: spool.counts(KEY), spool.all_counts):
            assert await traced(spool, counting) == []  # a tally: no table is read
        for call in (
            lambda: spool.due(KEY, now),
            spool.backlog,
            spool.queue_stats,
            spool.unfinished_keys,
            spool.pipelines_to_resume,
        ):
            found = await plans(spool, call)
            assert found and all(p == [] for p in found), found

        # A claim selects what is due without bodies, then reads each claimed body by its key.
        *selecting, reading = await plans(spool, lambda: spool.claim(KEY, now, 2))
        assert selecting and all(p == [] for p in selecting), selecting
        [lookup] = reading
        assert lookup.startswith("SEARCH bodies USING INDEX") and "(message_id=?)" in lookup

        # A listing scans messages; the bodies of the listed rows alone are looked up.
        listing, *deliveries = await plans(spool, lambda: spool.list_messages(KEY, State.QUEUED, None, 10))
        assert deliveries == [[]]  # the one message still queued
        [lookup] = listing
        assert lookup.startswith("SEARCH b USING INDEX") and "(message_id=?)" in lookup
    finally:
        await spool.close()
