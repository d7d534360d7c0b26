"""The spool: durable batches, claims, outcomes and counts."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from epoxi.policy import Policy
from services.node.engine.reply import Reply
from services.node.engine.spool import Counts, NewMessage, Outcome, Spool, State

KEY = "example.com_127_0_0_2"


def message(*recipients: str, data: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> NewMessage:
    return NewMessage("ann@sender.test", recipients, data)


async def test_a_batch_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    policy = Policy(name="slow", batch_size=7, batch_timeout=42.0, max_retries=1)
    await spool.save_pipeline(KEY, "example.com", "127.0.0.2", policy)
    ids = await spool.enqueue(KEY, [message("a@example.com", "b@example.com"), message("c@example.com")])
    await spool.close()

    spool = await Spool.open(path)
    try:
        assert len(set(ids)) == 2
        assert await spool.counts(KEY) == Counts(queued=3)
        assert await spool.unfinished_keys() == {KEY}
        [resumed] = await spool.pipelines_to_resume()
        assert (resumed.routing_key, resumed.domain, resumed.source_ip) == (KEY, "example.com", "127.0.0.2")
        assert resumed.policy == policy
        jobs = await spool.claim(KEY, time.time(), 10)
        assert [j.message_id for j in jobs] == ids
        assert [d.recipient for d in jobs[0].deliveries] == ["a@example.com", "b@example.com"]
        assert jobs[0].data == b"Subject: hi\r\n\r\nhello\r\n" and jobs[0].sender == "ann@sender.test"
    finally:
        await spool.close()


async def test_in_flight_mail_goes_back_to_the_queue_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    await spool.enqueue(KEY, [message("a@example.com"), message("b@example.com")])
    [job] = await spool.claim(KEY, time.time(), 1)
    assert await spool.counts(KEY) == Counts(queued=1, in_flight=1)
    await spool.close()  # the node dies with one message in flight

    spool = await Spool.open(path)
    try:
        assert await spool.counts(KEY) == Counts(queued=2)
        again = await spool.claim(KEY, time.time(), 10)
        assert job.message_id in {j.message_id for j in again}
    finally:
        await spool.close()


async def test_the_file_is_in_wal_mode_with_full_sync(spool: Spool) -> None:
    with sqlite3.connect(spool.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await spool._run(lambda: spool._db.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL


async def test_the_page_cache_is_32_mib(spool: Spool) -> None:
    # Not SQLite's 2 MiB: a batch of large mail would spill before it commits, and its bodies be
    # read back from the file when claimed.
    size = await spool._run(lambda: spool._db.execute("PRAGMA cache_size").fetchone()[0])
    assert size == -32 * 1024


async def test_a_batch_is_one_transaction(spool: Spool) -> None:
    statements: list[str] = []
    await spool._run(spool._db.set_trace_callback, statements.append)
    await spool.enqueue(KEY, [message(f"r{i}@example.com") for i in range(50)])
    await spool._run(spool._db.set_trace_callback, None)
    assert sum(s.strip().upper().startswith("COMMIT") for s in statements) == 1
    assert await spool.counts(KEY) == Counts(queued=50)


async def test_claim_takes_due_mail_oldest_first_up_to_the_limit(spool: Spool) -> None:
    first, second, third = [await spool.enqueue(KEY, [message(f"{n}@example.com")]) for n in "abc"]
    now = time.time()
    [job] = await spool.claim(KEY, now, 1)
    assert job.message_id == first[0]
    d = job.deliveries[0]
    await spool.record([Outcome(d.id, State.DEFERRED, 1, now + 3600, Reply.parse(451, "4.3.0 try later"))])
    assert await spool.counts(KEY) == Counts(queued=2, deferred=1)

    due = await spool.due(KEY, time.time(), up_to=10)
    assert due.count == 2 and due.next_at == now + 3600
    assert (await spool.due(KEY, time.time(), up_to=1)).count == 1  # counted up to what was asked
    jobs = await spool.claim(KEY, time.time(), 10)
    assert [j.message_id for j in jobs] == [second[0], third[0]]  # the deferred one is not due yet
    assert await spool.claim(KEY, now + 3601, 10) != []


async def test_outcomes_are_recorded_with_the_reply(spool: Spool) -> None:
    [mid] = await spool.enqueue(KEY, [message("a@example.com", "b@example.com")])
    [job] = await spool.claim(KEY, time.time(), 10)
    a, b = job.deliveries
    await spool.record(
        [
            Outcome(a.id, State.DELIVERED, 1, time.time(), Reply.parse(250, "2.0.0 OK")),
            Outcome(b.id, State.BOUNCED, 1, time.time(), Reply.parse(550, "5.1.1 no such user")),
        ]
    )
    rows = await spool.deliveries(mid)
    assert [(r.recipient, r.state, r.reply) for r in rows] == [
        ("a@example.com", State.DELIVERED, Reply(250, "2.0.0", "OK")),
        ("b@example.com", State.BOUNCED, Reply(550, "5.1.1", "no such user")),
    ]
    assert await spool.counts(KEY) == Counts(delivered=1, bounced=1)
    assert await spool.unfinished_keys() == set()
    assert await spool.pipelines_to_resume() == []


async def test_counts_are_per_routing_key(spool: Spool) -> None:
    await spool.enqueue(KEY, [message("a@example.com")])
    await spool.enqueue("example.org_127_0_0_3", [message("a@example.org", "b@example.org")])
    assert await spool.all_counts() == {KEY: Counts(queued=1), "example.org_127_0_0_3": Counts(queued=2)}
    assert await spool.counts("nothing.test_127_0_0_2") == Counts()


async def test_counts_are_read_without_waiting_for_the_spools_thread_as_of_the_last_commit(
    spool: Spool,
) -> None:
    await spool.enqueue(KEY, [message("a@example.com")])
    gate = threading.Event()
    held = asyncio.ensure_future(spool._run(gate.wait))  # the spool's thread is busy
    enqueue = asyncio.ensure_future(spool.enqueue(KEY, [message("b@example.com", "c@example.com")]))
    try:
        await asyncio.sleep(0.05)
        # Read at once; the enqueue waiting for the thread has not committed, so it is not counted.
        assert await asyncio.wait_for(spool.counts(KEY), 1) == Counts(queued=1)
        assert await asyncio.wait_for(spool.all_counts(), 1) == {KEY: Counts(queued=1)}
    finally:
        gate.set()
        await held
    await enqueue
    assert await spool.counts(KEY) == Counts(queued=3)
    [job] = await spool.claim(KEY, time.time(), 1)
    assert await spool.counts(KEY) == Counts(queued=2, in_flight=1)
    await spool.record(
        [Outcome(d.id, State.DELIVERED, 1, 0.0, Reply(250, "2.0.0", "OK")) for d in job.deliveries]
    )
    assert await spool.counts(KEY) == Counts(queued=2, delivered=1)


async def test_the_spools_thread_is_named_for_the_os(spool: Spool) -> None:
    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    assert await spool._run(comm) == "epoxi-spool"  # what top -H and /proc show
