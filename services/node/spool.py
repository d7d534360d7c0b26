"""The node's durable spool: SQLite in WAL mode with ``synchronous=FULL``.

Every write is one transaction, so a whole ``EnqueueBatch`` costs one fsync (group commit) and
is acknowledged only once it returns. A message is stored once (rendered RFC 5322 bytes and
envelope sender) with one delivery row per recipient. SQLite connections are bound to their
thread, so all spool work runs on one dedicated thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from epoxi.policy import Policy
from epoxi.v1 import pipeline_pb2

T = TypeVar("T")


class State(StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


UNFINISHED = (State.QUEUED, State.INFLIGHT, State.DEFERRED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    routing_key TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    policy BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    routing_key TEXT NOT NULL,
    sender TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id),
    routing_key TEXT NOT NULL,
    recipient TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'inflight', 'deferred', 'delivered', 'bounced')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    reply_code INTEGER,
    reply_text TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (routing_key, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries (message_id);
"""


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: Sequence[str]
    data: bytes


@dataclass(frozen=True)
class Delivery:
    id: int
    recipient: str
    attempts: int


@dataclass(frozen=True)
class Job:
    """One claimed message with its due recipients, now ``inflight``."""

    message_id: str
    sender: str
    data: bytes
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class Outcome:
    delivery_id: int
    state: State
    attempts: int
    next_attempt_at: float
    reply_code: int
    reply_text: str


@dataclass(frozen=True)
class Counts:
    queued: int = 0
    in_flight: int = 0
    deferred: int = 0
    delivered: int = 0
    bounced: int = 0

    @property
    def unfinished(self) -> int:
        return self.queued + self.in_flight + self.deferred

    def to_proto(self) -> pipeline_pb2.PipelineCounters:
        return pipeline_pb2.PipelineCounters(
            queued=self.queued,
            in_flight=self.in_flight,
            deferred=self.deferred,
            delivered=self.delivered,
            bounced=self.bounced,
        )


@dataclass(frozen=True)
class Due:
    """What a pipeline may send now, and when more becomes due."""

    count: int
    oldest: float | None
    next_at: float | None


@dataclass(frozen=True)
class PipelineRecord:
    routing_key: str
    domain: str
    source_ip: str
    policy: Policy


@dataclass(frozen=True)
class DeliveryRow:
    recipient: str
    state: State
    attempts: int
    next_attempt_at: float
    reply_code: int | None
    reply_text: str | None


class Spool:
    """Use ``await Spool.open(path)``; every method runs on the spool's own thread."""

    def __init__(self, executor: ThreadPoolExecutor, db: sqlite3.Connection, path: Path) -> None:
        self._executor = executor
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> Spool:
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, db, path)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Pipelines

    async def save_pipeline(self, routing_key: str, domain: str, source_ip: str, policy: Policy) -> None:
        blob = policy.to_proto().SerializeToString()
        await self._run(self._tx, _SAVE_PIPELINE, [(routing_key, domain, source_ip, blob)])

    async def pipelines_to_resume(self) -> list[PipelineRecord]:
        """Pipelines with unfinished mail, with the policy each was last started with."""
        rows = await self._run(self._query, _RESUME, ())
        return [PipelineRecord(k, d, ip, _policy(blob, k)) for k, d, ip, blob in rows]

    async def unfinished_keys(self) -> set[str]:
        rows = await self._run(self._query, _UNFINISHED_KEYS, ())
        return {k for (k,) in rows}

    # Mail

    async def enqueue(self, routing_key: str, messages: Sequence[NewMessage]) -> list[str]:
        """Store ``messages`` in one transaction and return their spool IDs once it is durable."""
        ids = [uuid.uuid4().hex for _ in messages]
        await self._run(self._enqueue, routing_key, ids, messages, time.time())
        return ids

    def _enqueue(self, routing_key: str, ids: list[str], messages: Sequence[NewMessage], now: float) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO messages (id, routing_key, sender, data, created_at) VALUES (?, ?, ?, ?, ?)",
                [(i, routing_key, m.sender, m.data, now) for i, m in zip(ids, messages, strict=True)],
            )
            self._db.executemany(
                "INSERT INTO deliveries (message_id, routing_key, recipient, state, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?)",
                [
                    (i, routing_key, r, now, now)
                    for i, m in zip(ids, messages, strict=True)
                    for r in dict.fromkeys(m.recipients)
                ],
            )

    async def due(self, routing_key: str, now: float) -> Due:
        return await self._run(self._due, routing_key, now)

    def _due(self, routing_key: str, now: float) -> Due:
        count, oldest = self._db.execute(_DUE_NOW, (routing_key, now)).fetchone()
        (next_at,) = self._db.execute(_DUE_LATER, (routing_key, now)).fetchone()
        return Due(count, oldest, next_at)

    async def claim(self, routing_key: str, now: float, limit: int) -> list[Job]:
        """Mark up to ``limit`` due messages ``inflight`` and return them, oldest first."""
        return await self._run(self._claim, routing_key, now, limit)

    def _claim(self, routing_key: str, now: float, limit: int) -> list[Job]:
        with self._db:
            rows = self._db.execute(_CLAIM, (routing_key, now, limit, routing_key, now)).fetchall()
            self._db.executemany(
                "UPDATE deliveries SET state = 'inflight', updated_at = ? WHERE id = ?",
                [(now, r[3]) for r in rows],
            )
        jobs: dict[str, Job] = {}
        for message_id, sender, data, delivery_id, recipient, attempts in rows:
            job = jobs.get(message_id) or Job(message_id, sender, data, ())
            d = Delivery(delivery_id, recipient, attempts)
            jobs[message_id] = Job(message_id, sender, data, (*job.deliveries, d))
        return list(jobs.values())

    async def record(self, outcomes: Iterable[Outcome]) -> None:
        rows = [
            (
                o.state.value,
                o.attempts,
                o.next_attempt_at,
                o.reply_code,
                o.reply_text,
                time.time(),
                o.delivery_id,
            )
            for o in outcomes
        ]
        await self._run(self._tx, _RECORD, rows)

    async def release(self, routing_key: str) -> None:
        """Put ``routing_key``'s in-flight deliveries back in the queue (after a stop or a crash)."""
        await self._run(self._tx, _RELEASE, [(time.time(), routing_key)])

    # Reading

    async def counts(self, routing_key: str) -> Counts:
        rows = await self._run(self._query, _COUNTS_OF_KEY, (routing_key,))
        return _counts(rows).get(routing_key, Counts())

    async def all_counts(self) -> dict[str, Counts]:
        return _counts(await self._run(self._query, _COUNTS, ()))

    async def deliveries(self, message_id: str) -> list[DeliveryRow]:
        rows = await self._run(self._query, _DELIVERIES, (message_id,))
        return [DeliveryRow(r, State(s), a, n, c, t) for r, s, a, n, c, t in rows]

    def _tx(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        with self._db:
            self._db.executemany(sql, rows)

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        return self._db.execute(sql, params).fetchall()


def _counts(rows: list[Any]) -> dict[str, Counts]:
    by_key: dict[str, dict[str, int]] = {}
    for key, state, n in rows:
        by_key.setdefault(key, {})[state] = n
    return {
        k: Counts(
            queued=c.get(State.QUEUED, 0),
            in_flight=c.get(State.INFLIGHT, 0),
            deferred=c.get(State.DEFERRED, 0),
            delivered=c.get(State.DELIVERED, 0),
            bounced=c.get(State.BOUNCED, 0),
        )
        for k, c in by_key.items()
    }


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED")
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL journal mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        with db:
            db.executescript(_SCHEMA)
        with db:
            # Whatever was in flight when the node stopped goes back to the queue.
            db.execute(_RELEASE_ALL, (time.time(),))
    except BaseException:
        db.close()
        raise
    return db


def _policy(blob: bytes, routing_key: str) -> Policy:
    proto = pipeline_pb2.PipelinePolicy()
    proto.ParseFromString(blob)
    return Policy.from_proto(proto, routing_key)


_SAVE_PIPELINE = """
INSERT INTO pipelines (routing_key, domain, source_ip, policy) VALUES (?, ?, ?, ?)
ON CONFLICT (routing_key) DO UPDATE SET domain = excluded.domain, source_ip = excluded.source_ip,
    policy = excluded.policy
"""
_UNFINISHED_KEYS = """
SELECT DISTINCT routing_key FROM deliveries WHERE state IN ('queued', 'inflight', 'deferred')
"""
_RESUME = f"""
SELECT p.routing_key, p.domain, p.source_ip, p.policy FROM pipelines p
WHERE p.routing_key IN ({_UNFINISHED_KEYS}) ORDER BY p.routing_key
"""
_DUE_NOW = """
SELECT COUNT(DISTINCT message_id), MIN(next_attempt_at) FROM deliveries
WHERE routing_key = ? AND state IN ('queued', 'deferred') AND next_attempt_at <= ?
"""
_DUE_LATER = """
SELECT MIN(next_attempt_at) FROM deliveries
WHERE routing_key = ? AND state IN ('queued', 'deferred') AND next_attempt_at > ?
"""
_CLAIM = """
WITH picked AS (
    SELECT message_id, MIN(next_attempt_at) AS due, MIN(id) AS first FROM deliveries
    WHERE routing_key = ? AND state IN ('queued', 'deferred') AND next_attempt_at <= ?
    GROUP BY message_id ORDER BY due, first LIMIT ?
)
SELECT m.id, m.sender, m.data, d.id, d.recipient, d.attempts
FROM picked JOIN messages m ON m.id = picked.message_id JOIN deliveries d ON d.message_id = m.id
WHERE d.routing_key = ? AND d.state IN ('queued', 'deferred') AND d.next_attempt_at <= ?
ORDER BY picked.due, picked.first, d.id
"""
_RECORD = """
UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, reply_code = ?, reply_text = ?,
    updated_at = ? WHERE id = ?
"""
_RELEASE = (
    "UPDATE deliveries SET state = 'queued', updated_at = ? WHERE routing_key = ? AND state = 'inflight'"
)
_RELEASE_ALL = "UPDATE deliveries SET state = 'queued', updated_at = ? WHERE state = 'inflight'"
_COUNTS = "SELECT routing_key, state, COUNT(*) FROM deliveries GROUP BY routing_key, state"
_COUNTS_OF_KEY = "SELECT routing_key, state, COUNT(*) FROM deliveries WHERE routing_key = ? GROUP BY state"
_DELIVERIES = """
SELECT recipient, state, attempts, next_attempt_at, reply_code, reply_text FROM deliveries
WHERE message_id = ? ORDER BY id
"""
