"""What the spool's hot path reads does not grow with the backlog, and its IDs are time-ordered.

Work is counted in SQLite virtual-machine steps (a progress handler called on every step), so the
tests assert how much is read, never how long it took."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.node.engine.instruments import Instruments
from services.node.engine.reply import Reply
from services.node.engine.spool import (
    _COUNTS,
    Counts,
    NewMessage,
    Outcome,
    Spool,
    Spooled,
    State,
    _counts,
    new_ids,
)

KEY = "example.com_127_0_0_2"


def messages(n: int, start: int = 0) -> list[NewMessage]:
    return [
        NewMessage("ann@sender.test", [f"r{start + i}@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
        for i in range(n)
    ]


async def steps(spool: Spool, call: Callable[[], Awaitable[object]]) -> int:
    """SQLite VM steps that ``call`` runs on the spool's connection."""
    count = [0]

    def step() -> int:
        count[0] += 1
        return 0

    await spool._run(spool._db.set_progress_handler, step, 1)
    try:
        await call()
    finally:
        await spool._run(spool._db.set_progress_handler, None, 1)
    return count[0]


async def test_claim_and_due_read_what_they_take_not_the_backlog(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        await spool.enqueue(KEY, messages(40))
        now = time.time()
        small = (
            await steps(spool, lambda: spool.due(KEY, now, 5)),
            await steps(spool, lambda: spool.claim(KEY, now, 5)),
        )
        for start in range(40, 4040, 500):  # a backlog a hundred times longer
            await spool.enqueue(KEY, messages(500, start))
        now = time.time()
        large = (
            await steps(spool, lambda: spool.due(KEY, now, 5)),
            await steps(spool, lambda: spool.claim(KEY, now, 5)),
        )
        assert large[0] < 2 * small[0] and large[1] < 2 * small[1], (small, large)
        # And what they answer is still exact: the count up to what was asked, the oldest first.
        assert (await spool.due(KEY, now, 10_000)).count == 4040 - 10
        [job] = await spool.claim(KEY, now, 1)
        assert job.deliveries[0].recipient == "r10@example.com"
    finally:
        await spool.close()


async def test_a_claim_merges_queued_and_deferred_mail_by_when_it_is_due(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        [early, late] = await spool.enqueue(KEY, messages(2))
        jobs = await spool.claim(KEY, time.time(), 2)
        retry = Reply.parse(451, "4.3.0 try later")
        d = {j.message_id: j.deliveries[0].id for j in jobs}
        await spool.record(
            [
                Outcome(d[early], State.DEFERRED, 1, time.time() - 60, retry),  # due before any queued
                Outcome(d[late], State.DEFERRED, 1, time.time() + 1.0, retry),  # due after the queued
            ]
        )
        [queued] = await spool.enqueue(KEY, messages(1, 2))
        now = time.time() + 1.5
        assert (await spool.due(KEY, now, 10)).count == 3
        assert [j.message_id for j in await spool.claim(KEY, now, 10)] == [early, queued, late]
    finally:
        await spool.close()


def test_spool_ids_are_uuid7_in_time_order() -> None:
    first = new_ids(100)
    time.sleep(0.002)
    second = new_ids(100)
    ids = first + second
    assert len(set(ids)) == 200 and all(len(i) == 32 for i in ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert max(first) < min(second)  # a later millisecond sorts after
    assert all(i[:12] == first[0][:12] for i in first)  # one timestamp for one batch


async def test_counts_kept_as_mail_moves_equal_a_fresh_count_of_the_file(tmp_path: Path) -> None:
    """Counts are a tally kept by each transaction, not a scan of every delivery ever recorded:
    after every kind of write, in random order, they equal what counting the file says."""
    rng = random.Random(11)
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    peer = await Spool.open(tmp_path / "peer.db")
    keys = [KEY, "example.org_127_0_0_2"]
    replies = {
        State.DELIVERED: Reply.parse(250, "2.0.0 OK"),
        State.DEFERRED: Reply.parse(451, "4.3.0 later"),
        State.BOUNCED: Reply.parse(550, "5.1.1 no such user"),
    }
    n = 0

    async def fresh(s: Spool) -> dict[str, Counts]:
        counted = await s._run(lambda: _counts(s._db.execute(_COUNTS).fetchall()))
        return {k: c for k, c in counted.items() if c != Counts()}

    try:
        for _ in range(150):
            key = rng.choice(keys)
            op = rng.choice(["enqueue", "enqueue", "claim", "record", "record", "release", "hand", "purge"])
            if op == "enqueue":
                k = rng.randint(1, 4)
                batch = [
                    NewMessage(
                        "a@sender.test",
                        [f"r{n + i}@x.test", f"s{n + i}@x.test"][: rng.randint(1, 2)],
                        b"hi\r\n",
                    )
                    for i in range(k)
                ]
                n += k
                await spool.enqueue_batch(key, batch, batch_key=rng.choice(["", f"b{n}", "b-dup"]))
            elif op in ("claim", "record"):
                jobs = await spool.claim(key, time.time() + 7200, rng.randint(1, 5))
                if op == "record":
                    outcomes = [
                        Outcome(d.id, state, d.attempts + 1, time.time() - 1, replies[state])
                        for j in jobs
                        for d in j.deliveries
                        for state in [rng.choice(list(replies))]
                    ]
                    await spool.record(outcomes + outcomes[:1])  # a delivery twice: its last one counts
            elif op == "release":
                await spool.release(key)
            elif op == "hand":
                taken = await spool.take_queued(key, rng.randint(1, 3))
                await peer.receive(key, taken)
                await spool.remove_handed([m.id for m in taken])
            else:
                await spool.purge(time.time() + 7200, rng.randint(1, 10))
            assert await spool.all_counts() == await fresh(spool), op
            assert await peer.all_counts() == await fresh(peer)
        await spool.close()
        spool = await Spool.open(path)  # counted afresh when opened: in flight is queued again
        assert await spool.all_counts() == await fresh(spool)
        assert all(c.in_flight == 0 for c in (await spool.all_counts()).values())
        assert sum(c.delivered + c.bounced for c in (await spool.all_counts()).values()) > 0
    finally:
        await spool.close()
        await peer.close()


async def test_batches_asked_for_while_the_spool_is_busy_share_one_commit(tmp_path: Path) -> None:
    commits: list[str] = []

    class Commits(Instruments):
        def committed(self, operation: str, seconds: float, *, synced: bool = True) -> None:
            commits.append(operation)

    spool = await Spool.open(tmp_path / "spool.db", Commits())
    busy = threading.Event()
    try:
        hold = asyncio.create_task(spool._run(busy.wait, 10))  # the spool's thread is busy
        good = [spool.enqueue_batch(KEY, messages(2, 10 * i), batch_key=f"b{i}") for i in range(5)]
        again = spool.enqueue_batch(KEY, messages(2), batch_key="b0")  # a retried batch, same group
        bad = spool.enqueue_batch(KEY, [NewMessage("a@sender.test", [object()], b"hi")])  # type: ignore[list-item]
        calls = asyncio.gather(*good, again, bad, return_exceptions=True)
        await asyncio.sleep(0.05)
        busy.set()
        await hold
        *spooled, retried, failed = await calls
        assert commits == ["enqueue"]  # seven batches, one commit (one fsync)
        ok = [s for s in spooled if isinstance(s, Spooled)]
        assert len(ok) == 5 and all(len(s.ids) == 2 and not s.duplicate for s in ok)
        assert isinstance(retried, Spooled) and retried.duplicate and retried.ids == ok[0].ids
        assert isinstance(failed, sqlite3.Error)  # it failed alone: its savepoint rolled back
        assert await spool.counts(KEY) == Counts(queued=10)
        for table in ("messages", "bodies"):  # nothing of the failed batch is left
            assert await spool._run(spool._query, f"SELECT COUNT(*) FROM {table}", ()) == [(10,)]
        assert len(await spool.claim(KEY, time.time(), 100)) == 10
    finally:
        busy.set()
        await spool.close()
