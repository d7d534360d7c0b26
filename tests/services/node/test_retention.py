"""Retention: finished mail leaves the spool with its history; counters keep counting it."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from devmesh.sink import Sink
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.engine.reply import Reply
from services.node.engine.spool import Counts, NewMessage, Outcome, Spool, State
from services.node.main import NodeConfig, RunningNode, parse_config, start_node
from services.node.retention import Retention
from tests.services.node.support import KEY, OTHER, Stub, email, start
from tests.support import eventually

DAY = 86400.0


def message(*recipients: str) -> NewMessage:
    return NewMessage("ann@sender.test", recipients, b"Subject: hi\r\n\r\nhello\r\n")


async def send(spool: Spool, key: str, results: dict[str, State]) -> str:
    """Spool one message to ``results``' recipients and record each one's outcome."""
    [mid] = await spool.enqueue(key, [message(*results)])
    jobs = await spool.claim(key, time.time() + 10 * DAY, 1000)
    [job] = [j for j in jobs if j.message_id == mid]
    replies = {State.DELIVERED: (250, "2.0.0 OK"), State.DEFERRED: (451, "4.3.0 later")}
    replies[State.BOUNCED] = (550, "5.1.1 no such user")
    await spool.record(
        Outcome(
            d.id, results[d.recipient], 1, time.time() + 3600, Reply.parse(*replies[results[d.recipient]])
        )
        for d in job.deliveries
    )
    await spool.release(key)  # other due mail the claim took goes back as it was
    return mid


async def age(spool: Spool, mid: str, seconds: float) -> None:
    """Make ``mid``'s deliveries look ``seconds`` older, as if the node had been up that long."""

    def run() -> None:
        with spool._db:
            spool._db.execute(
                "UPDATE deliveries SET updated_at = updated_at - ? WHERE message_id = ?", (seconds, mid)
            )

    await spool._run(run)


async def rows(spool: Spool, table: str, mid: str) -> int:
    column = "id" if table == "messages" else "message_id"
    [(n,)] = await spool._run(spool._query, f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (mid,))
    return int(n)


# Spool.purge


async def test_old_finished_mail_goes_with_its_attempts_and_the_rest_stays(spool: Spool) -> None:
    delivered = await send(spool, KEY, {"a@example.com": State.DELIVERED})
    bounced = await send(spool, KEY, {"b@example.com": State.BOUNCED})
    both = await send(spool, OTHER, {"c@example.org": State.DELIVERED, "d@example.org": State.BOUNCED})
    recent = await send(spool, KEY, {"e@example.com": State.DELIVERED})
    deferred = await send(spool, KEY, {"f@example.com": State.DEFERRED})
    [queued] = await spool.enqueue(KEY, [message("g@example.com")])
    for mid in (delivered, bounced, both, deferred, queued):
        await age(spool, mid, 30 * DAY)
    for mid in (delivered, bounced, both):
        found = await spool.message(mid)
        assert found is not None and found[1]  # each has its history

    assert await spool.purge(time.time() - DAY, limit=100) == 3

    for mid in (delivered, bounced, both):
        assert await spool.message(mid) is None
        assert [await rows(spool, t, mid) for t in ("messages", "deliveries", "attempts")] == [0, 0, 0]
    for mid in (recent, deferred, queued):
        assert await spool.message(mid) is not None
    found = await spool.message(deferred)
    assert found is not None and [a.result for a in found[1]] == [State.DEFERRED]
    assert await spool.purge(time.time() - DAY, limit=100) == 0


async def test_a_message_with_a_deferred_recipient_stays_until_it_is_finished(spool: Spool) -> None:
    mid = await send(spool, KEY, {"a@example.com": State.DELIVERED, "b@example.com": State.DEFERRED})
    await age(spool, mid, 30 * DAY)
    assert await spool.purge(time.time(), limit=100) == 0
    found = await spool.message(mid)
    assert found is not None and [d.state for d in found[0].deliveries] == [State.DELIVERED, State.DEFERRED]

    # b is delivered on a later retry: now the message is finished, as of that outcome.
    [job] = await spool.claim(KEY, time.time() + 10 * DAY, 10)
    [b] = job.deliveries
    await spool.record([Outcome(b.id, State.DELIVERED, 2, time.time(), Reply.parse(250, "2.0.0 OK"))])
    assert await spool.purge(time.time() - DAY, limit=100) == 0  # b finished just now
    await age(spool, mid, 2 * DAY)
    assert await spool.purge(time.time() - DAY, limit=100) == 1
    assert await spool.message(mid) is None
    assert await rows(spool, "attempts", mid) == 0  # b's deferral went with it


async def test_counts_do_not_change_when_mail_is_purged(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        for _ in range(3):
            await send(spool, KEY, {"a@example.com": State.DELIVERED, "b@example.com": State.BOUNCED})
        await send(spool, KEY, {"c@example.com": State.DEFERRED})
        await send(spool, OTHER, {"x@example.org": State.BOUNCED})
        await spool.enqueue(KEY, [message("q@example.com")])
        stats, counts = await spool.queue_stats(), await spool.all_counts()
        assert counts == {
            KEY: Counts(queued=1, deferred=1, delivered=3, bounced=3),
            OTHER: Counts(bounced=1),
        }

        assert await spool.purge(time.time() + DAY, limit=100) == 4
        assert await spool.queue_stats() == stats
        assert await spool.queue_stats(OTHER) == {OTHER: stats[OTHER]}
        assert await spool.all_counts() == counts
        assert await spool.counts(KEY) == counts[KEY]
        assert await spool.list_messages(OTHER, None, None, 10) == []

        # New outcomes add to what was purged.
        await send(spool, OTHER, {"y@example.org": State.DELIVERED})
        assert await spool.counts(OTHER) == Counts(delivered=1, bounced=1)
    finally:
        await spool.close()
    spool = await Spool.open(tmp_path / "spool.db")  # the totals are in the file
    try:
        assert await spool.all_counts() == {**counts, OTHER: Counts(delivered=1, bounced=1)}
    finally:
        await spool.close()


async def test_each_chunk_is_a_transaction_and_the_limit_holds(spool: Spool) -> None:
    # The oldest finished delivery belongs to a message still waiting on a retry: purge goes past it.
    waiting = await send(spool, KEY, {"w@example.com": State.DELIVERED, "x@example.com": State.DEFERRED})
    await age(spool, waiting, 40 * DAY)
    old = [await send(spool, KEY, {f"r{i}@example.com": State.DELIVERED}) for i in range(5)]
    for i, mid in enumerate(old):
        await age(spool, mid, (30 - i) * DAY)

    statements: list[str] = []
    await spool._run(spool._db.set_trace_callback, statements.append)
    # Chunk 1 looks at the waiting message's delivery and old[0]; chunk 2, cut to the limit, at old[1].
    assert await spool.purge(time.time() - DAY, limit=2, chunk=2) == 2
    await spool._run(spool._db.set_trace_callback, None)
    assert sum(s.strip().upper().startswith("COMMIT") for s in statements) == 2
    assert [await spool.message(m) is None for m in old] == [True, True, False, False, False]

    assert await spool.purge(time.time() - DAY, limit=100, chunk=1) == 3
    assert await spool.message(waiting) is not None


async def test_purging_uses_indexes_in_a_spool_file_from_before_retention(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(path)
    mids = [await send(spool, KEY, {"a@example.com": State.DELIVERED, "b@example.com": State.BOUNCED})]
    mids.append(await send(spool, KEY, {"c@example.com": State.DELIVERED, "d@example.com": State.DEFERRED}))
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older node left it
        db.executescript("DROP INDEX deliveries_finished; DROP INDEX attempts_delivery; DROP TABLE purged;")

    spool = await Spool.open(path)
    try:
        statements: list[str] = []
        await spool._run(spool._db.set_trace_callback, statements.append)
        assert await spool.purge(time.time() + DAY, limit=100) == 1
        await spool.counts(KEY)
        await spool._run(spool._db.set_trace_callback, None)
        queries = [s for s in statements if s.split()[0].upper() in ("SELECT", "INSERT", "DELETE")]
        assert len(queries) >= 5
        for sql in queries:
            assert await spool._run(full_scans, spool._db, sql) == set(), sql
        assert await spool.counts(KEY) == Counts(deferred=1, delivered=2, bounced=1)
    finally:
        await spool.close()


def full_scans(db: sqlite3.Connection, sql: str) -> set[str]:
    """The tables and indexes that ``sql`` reads from end to end, foreign key checks included."""
    names = dict(db.execute("SELECT rootpage, name FROM sqlite_master WHERE rootpage > 0").fetchall())
    cursors: dict[int, str] = {}
    scanned = set()
    sql = sql.replace("-Inf", "-9e999")  # how the trace prints the first cursor, -infinity
    for _, op, p1, p2, *_ in db.execute("EXPLAIN " + sql):
        if op in ("OpenRead", "OpenWrite") and p2 in names:
            cursors[p1] = names[p2]
        elif op == "Rewind" and p1 in cursors:
            scanned.add(cursors[p1])
    return scanned


def test_the_full_scan_probe_sees_a_full_scan() -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript("CREATE TABLE t (a INTEGER, b TEXT); CREATE INDEX t_a ON t (a);")
        assert full_scans(db, "SELECT * FROM t WHERE b = 'x'") == {"t"}
        assert full_scans(db, "SELECT * FROM t WHERE a = 1") == set()


# The periodic task


async def test_a_sweep_purges_what_finished_more_than_the_retention_ago(spool: Spool) -> None:
    old = [await send(spool, KEY, {f"r{i}@example.com": State.DELIVERED}) for i in range(5)]
    recent = await send(spool, KEY, {"new@example.com": State.BOUNCED})
    for mid in old:
        await age(spool, mid, 3 * DAY)
    retention = Retention(spool, retention=2 * DAY, interval=600, limit=2)  # more than one call's worth
    assert await retention.sweep() == 5
    assert await spool.message(recent) is not None
    assert await retention.sweep(now=time.time() + 3 * DAY) == 1
    assert await spool.message(recent) is None
    with pytest.raises(ValueError):
        Retention(spool, retention=-1, interval=600)
    with pytest.raises(ValueError):
        Retention(spool, retention=DAY, interval=0)


async def test_purged_mail_is_not_found_and_the_counters_stay(
    node: RunningNode, stub: Stub, sink: Sink
) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    await start(stub)
    reply = await stub.EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com", "gone@example.com")]),
        timeout=5,
    )
    [mid] = reply.message_ids

    async def finished() -> node_pb2.GetQueueStatsResponse | None:
        s: node_pb2.GetQueueStatsResponse = await stub.GetQueueStats(
            node_pb2.GetQueueStatsRequest(), timeout=5
        )
        return s if (s.totals.delivered, s.totals.bounced) == (1, 1) else None

    stats = await eventually(finished)
    await stub.GetMessage(node_pb2.GetMessageRequest(message_id=mid), timeout=5)
    info = (await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)).pipelines
    line = [p.line for p in (await node.supervisor.snapshot()).pipelines]
    assert line == ["running: 0 queued, 0 in flight, 0 deferred, 1 delivered, 1 bounced"]

    assert node.retention is not None  # a week (the default): the node purges nothing on its own here
    assert await node.retention.sweep(now=time.time() + 7 * DAY + 3600) == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetMessage(node_pb2.GetMessageRequest(message_id=mid), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5) == stats
    assert await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(routing_key=KEY), timeout=5) == stats
    after = (await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)).pipelines
    assert [p.counters for p in after] == [p.counters for p in info]
    assert [p.line for p in (await node.supervisor.snapshot()).pipelines] == line


async def test_the_node_purges_on_its_own_every_interval(node_config: NodeConfig) -> None:
    async with await start_node(replace(node_config, retention=0.001, purge_interval=0.05)) as node:
        async with channel(node.address) as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            await start(stub)
            request = node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com")])
            [mid] = (await stub.EnqueueBatch(request, timeout=5)).message_ids

            async def purged() -> bool:
                return await node.spool.message(mid) is None

            await eventually(purged)
            assert await node.spool.counts(KEY) == Counts(delivered=1)


async def test_retention_zero_keeps_mail_forever(node_config: NodeConfig) -> None:
    async with await start_node(
        replace(node_config, retention=0.0, idempotency_window=0.0, purge_interval=0.05)
    ) as node:
        assert node.retention is None
        assert not [t for t in node._tasks if t.get_name().endswith(": retention")]
    async with await start_node(replace(node_config, retention=0.0)) as node:
        # Still sweeping the idempotency keys, never the mail.
        assert node.retention is not None and node.retention.retention == 0.0
        assert await node.retention.sweep(now=time.time() + 365 * DAY) == 0
    async with await start_node(node_config) as node:  # the default: a week
        assert node.retention is not None and node.retention.retention == 7 * DAY
        assert [t.get_name() for t in node._tasks if t.get_name().endswith(": retention")] == [
            "node n1: retention"
        ]


# Flags


def parse(argv: list[str]) -> NodeConfig:
    return parse_config(argv)


def test_retention_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EPOXI_NODE_RETENTION", "EPOXI_NODE_PURGE_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    c = parse([])
    assert (c.retention, c.purge_interval) == (7 * DAY, 600.0)
    c = parse(["--retention", "1d12h", "--purge-interval", "30s"])
    assert (c.retention, c.purge_interval) == (1.5 * DAY, 30.0)
    assert parse(["--retention", "0"]).retention == 0.0  # keep forever
    monkeypatch.setenv("EPOXI_NODE_RETENTION", "36h")
    monkeypatch.setenv("EPOXI_NODE_PURGE_INTERVAL", "1m")
    c = parse([])
    assert (c.retention, c.purge_interval) == (1.5 * DAY, 60.0)


@pytest.mark.parametrize(
    "argv", [["--purge-interval", "0"], ["--retention", "-1"], ["--retention", "7 days"]]
)
def test_bad_retention_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert f"argument {argv[0]}" in capsys.readouterr().err
