"""The node's durable spool: SQLite in WAL mode with ``synchronous=FULL``.

Every write is one transaction, so a whole ``EnqueueBatch`` costs one fsync and is acknowledged
only once it returns; batches (and outcome groups) asked for while the spool's thread is busy
share the next transaction, and so its fsync (group commit, ``_grouped``). A message is stored once (its envelope sender in
``messages``, its rendered RFC 5322 bytes in ``bodies``, in the same transaction) with one
delivery row per recipient. Queue scans, counts, ``due`` and the scans behind listings read
envelopes and deliveries only, so their cost does not grow with the size of the mail; a body is
read by primary key, for its own message, when that is claimed, handed over, listed or shown.
Each attempt's outcome updates the delivery, and an attempt that leaves it to be retried is
appended to its ``attempts`` history in the same transaction. The attempt that finishes a
delivery is not written twice: it is the delivery row itself (its reply, attempt count and, in
``next_attempt_at``, when it was made), and ``message`` reads it back as the history's last
row. Most mail is delivered at its first attempt, so that spares three b-tree inserts a message
(the row and its two indexes); a file whose history holds finished attempts (user_version 0)
has them folded into their deliveries when opened (``_migrate``). ``record`` takes
many outcomes at once so that a pipeline's outcomes share a commit too. SQLite connections are
bound to their thread, so all spool work runs on one dedicated thread, off the event loop, in the
order it was asked for.

Each outcome's ``Reply`` is stored as parsed: code, enhanced code and text, on the delivery and on
its attempt alike. A spool file from before deliveries had an enhanced code column gets it when
opened, its rows split once the way the reply was parsed (``_migrate``).

Each message keeps the W3C ``traceparent`` of the span that spooled it (``epoxi.observability.
tracing``), so its delivery attempts, whenever they happen, join the trace that submitted it; a
handed-over message keeps the one it came with. Spool files from before get the column when
opened (``_migrate``), empty for the mail already in them.

Every transaction that writes rows is one commit and so one fsync of the WAL, but a claim's:
mail in flight goes back to the queue when a node restarts, so a claim lost in a crash changes
nothing, and it commits without an fsync (the next synced commit covers its WAL frames). Each is
timed and counted through ``instruments`` (``engine.instruments``), on the spool's thread. A
transaction that changed nothing (a duplicate batch, a claim with nothing due) writes no WAL
frame and is not counted.

What is due is read in the order of the ``deliveries_due`` index, per state, and merged: a claim
and ``due`` read the messages they take or count, not the whole backlog of their key. Counts per
routing key and state (what every EnqueueBatch answers, health and stats read) are a tally: the
file is counted once when opened, and each transaction then moves what it changed, once it has
committed, so reading them costs nothing however much history retention keeps.

Retention (``purge``) deletes finished mail, a chunk per transaction, and adds what it deleted
to per-routing-key totals in the same transaction, so delivered and bounced counts are "since
the spool was created" and never drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar

from epoxi.policy import Policy
from epoxi.v1 import pipeline_pb2
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.reply import Reply

T = TypeVar("T")
_PR_SET_NAME = 15  # prctl(2)


class State(StrEnum):
    """A delivery's state in the spool."""

    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


UNFINISHED = (State.QUEUED, State.INFLIGHT, State.DEFERRED)
_FINISHED = frozenset((State.DELIVERED, State.BOUNCED))

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
    created_at REAL NOT NULL
);
-- Bodies apart from their envelopes, so that what scans messages (queue scans, counts, listings,
-- the backlog) never reads a body: one is read when its mail is claimed, handed over or shown.
CREATE TABLE IF NOT EXISTS bodies (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data BLOB NOT NULL
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
    enhanced_code TEXT,
    reply_text TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (routing_key, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries (message_id);
CREATE INDEX IF NOT EXISTS messages_listed ON messages (routing_key, created_at, id);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created_at, id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempted_at REAL NOT NULL,
    result TEXT NOT NULL CHECK (result IN ('delivered', 'deferred', 'bounced')),
    reply_code INTEGER,
    enhanced_code TEXT NOT NULL,
    reply_text TEXT
);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts (message_id, id);
-- Retention: finished deliveries by when they finished, to find what to purge; and attempts by
-- delivery, which the foreign key check needs when a delivery is deleted (else a full scan).
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (updated_at, message_id)
    WHERE state IN ('delivered', 'bounced');
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
-- Batches by idempotency key: what EnqueueBatch and TakeMessages deduplicate by, kept for
-- ``forget_batches``' window whatever happens to the messages.
CREATE TABLE IF NOT EXISTS batches (
    batch_key TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (batch_key, batch_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_created ON batches (created_at);
-- Per routing key, the delivered and bounced deliveries that retention deleted.
CREATE TABLE IF NOT EXISTS purged (
    routing_key TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    bounced INTEGER NOT NULL DEFAULT 0
);
"""

# Bytes of a message read to find its Subject and Message-ID when listing.
HEAD_BYTES = 8192
# Most bodies one query reads (SQLite binds at most 32,766 parameters).
BODIES_PER_QUERY = 500
# Most finished deliveries a purge looks at (and so messages it deletes) in one transaction.
PURGE_CHUNK = 1000
# SQLite's page cache, KiB (its default is 2 MiB). A batch of large mail outgrows the default:
# its transaction spills pages to the WAL before it commits, and its bodies are read back from
# the file when claimed moments later. With 32 MiB the spool's thread spends a fifth less CPU on
# 100 KB messages alone, a ninth less in the mesh (docs/performance.md); 2 KB mail does not notice.
CACHE_KIB = 32 * 1024


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: Sequence[str]
    data: bytes


@dataclass(frozen=True)
class Spooled:
    """A batch in the spool: its message IDs in order, and whether it was there already."""

    ids: list[str]
    duplicate: bool = False


@dataclass(frozen=True)
class Pending:
    """A recipient still to deliver, as it moves to another node."""

    recipient: str
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class Handed:
    """A spooled message with what is left to deliver: what ``take_queued`` reads and
    ``receive`` stores on another node."""

    id: str
    sender: str
    data: bytes
    accepted_at: float
    batch_key: str
    batch_index: int
    pending: tuple[Pending, ...]
    # The W3C traceparent it was spooled under ("": none).
    traceparent: str = ""


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
    # When the mesh accepted it (epoch seconds), and the W3C traceparent it was spooled under.
    accepted_at: float = 0.0
    traceparent: str = ""


@dataclass(frozen=True)
class Outcome:
    """What one attempt recorded for a delivery: its new state and the reply that decided it."""

    delivery_id: int
    state: State
    attempts: int
    next_attempt_at: float
    reply: Reply
    # When the attempt was made; None: when it is recorded. Outcomes recorded in groups carry it,
    # so the history says when each attempt happened, not when its group was committed.
    attempted_at: float | None = None

    @property
    def text(self) -> str:
        """The reply's text as recorded: a bounce on a temporary reply (its retries ran out) says so."""
        if self.state is not State.BOUNCED or not self.reply.temporary:
            return self.reply.text
        note = f"(gave up after {self.attempts} attempts)"
        # As if appended to the reply as the server sent it, enhanced code and all.
        return note if self.reply.enhanced and not self.reply.text else f"{self.reply.text} {note}"


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

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.queued + other.queued,
            self.in_flight + other.in_flight,
            self.deferred + other.deferred,
            self.delivered + other.delivered,
            self.bounced + other.bounced,
        )

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
class Backlog:
    """A routing key's deliveries in one unfinished state, and when the message of the first of
    them to reach this spool was accepted (the oldest, but for mail handed over later with an
    older acceptance time)."""

    routing_key: str
    state: State
    deliveries: int
    oldest_accepted_at: float


@dataclass(frozen=True)
class PipelineRecord:
    routing_key: str
    domain: str
    source_ip: str
    policy: Policy


@dataclass(frozen=True)
class DeliveryRow:
    """A recipient of a spooled message: its state and its last attempt's reply (None: no attempt yet)."""

    recipient: str
    state: State
    attempts: int
    next_attempt_at: float
    reply: Reply | None


@dataclass(frozen=True)
class KeyStats:
    counts: Counts
    # Earliest retry among deferred deliveries.
    next_attempt_at: float | None


@dataclass(frozen=True)
class MessageRow:
    id: str
    routing_key: str
    sender: str
    created_at: float
    size: int
    # The first HEAD_BYTES of the message: enough for its header fields.
    head: bytes
    deliveries: tuple[DeliveryRow, ...]


@dataclass(frozen=True)
class AttemptRow:
    recipient: str
    attempt: int
    attempted_at: float
    result: State
    reply: Reply


# Where a listing page ends: the (created_at, id) of its last message.
Cursor = tuple[float, str]


class Spool:
    """Use ``await Spool.open(path)``; every method runs on the spool's own thread."""

    def __init__(self, executor: ThreadPoolExecutor, db: sqlite3.Connection, path: Path) -> None:
        self._executor = executor
        self._db = db
        self.path = path
        self.instruments: Instruments = NO_INSTRUMENTS
        # (routing key, state) -> deliveries, purged ones included: what ``_COUNTS`` would read,
        # counted once when opened and then moved by each transaction as it commits (``_moved``).
        self._tally: Counter[tuple[str, str]] = Counter()
        self._moved: Counter[tuple[str, str]] = Counter()
        # Routing key -> its Counts as of the last commit, written by the spool's thread one key
        # at a time (a whole Counts each), so the loop reads counts without a trip to that thread.
        self._counts_view: dict[str, Counts] = {}
        # Operation -> the calls waiting to be done together in its next transaction.
        self._groups: dict[str, list[tuple[Callable[..., Any], tuple[object, ...], asyncio.Future[Any]]]] = {}
        self._groups_lock = threading.Lock()

    @classmethod
    async def open(cls, path: str | Path, instruments: Instruments | None = None) -> Self:
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool", initializer=_name_os_thread)
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        spool = cls(executor, db, path)
        await spool._run(spool._count_all)
        if instruments is not None:
            spool.instruments = instruments
        return spool

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _grouped(self, operation: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in one transaction with every other ``operation`` asked for before the
        spool's thread gets to it (group commit: one fsync for them all, as concurrent
        EnqueueBatch calls and pipelines' outcome groups arrive). Each runs in a savepoint of its
        own, so one that fails fails alone; none returns before the commit is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._groups_lock:
            group = self._groups.setdefault(operation, [])
            group.append((fn, args, future))
            first = len(group) == 1
        if first:
            try:
                self._executor.submit(self._commit_group, operation, loop)
            except RuntimeError:  # the spool is closed
                with self._groups_lock:
                    self._groups.pop(operation, None)
                raise
        return await future

    def _commit_group(self, operation: str, loop: asyncio.AbstractEventLoop) -> None:
        with self._groups_lock:
            group = self._groups.pop(operation)
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            with self._writing(operation):
                self._db.execute("BEGIN IMMEDIATE")  # lookups and inserts are one transaction
                for fn, args, future in group:
                    moved = self._moved.copy()
                    self._db.execute("SAVEPOINT one")
                    try:
                        settled.append((future, fn(*args), None))
                    except Exception as e:
                        self._db.execute("ROLLBACK TO one")
                        self._moved = moved
                        settled.append((future, None, e))
                    self._db.execute("RELEASE one")
        except BaseException as e:  # the commit failed: nothing of the group is durable
            settled = [(future, None, e) for _, _, future in group]
        loop.call_soon_threadsafe(_settle, settled)

    @contextlib.contextmanager
    def _writing(self, operation: str, *, synced: bool = True) -> Iterator[None]:
        """One transaction (``with self._db``), measured as a commit when it wrote rows; one that
        need not survive a crash (``synced=False``) commits without an fsync of the WAL. What it
        adds to ``_moved`` joins the tally once it has committed."""
        changes = self._db.total_changes
        started = time.perf_counter()
        self._moved.clear()
        if not synced:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._db:
                yield
        finally:
            if not synced:
                self._db.execute("PRAGMA synchronous=FULL")
        if self._moved:  # committed: the deliveries it moved are counted
            self._tally.update(self._moved)
            self._publish({k for k, _ in self._moved})
        if self._db.total_changes != changes:
            self.instruments.committed(operation, time.perf_counter() - started, synced=synced)

    # Pipelines

    async def save_pipeline(self, routing_key: str, domain: str, source_ip: str, policy: Policy) -> None:
        await self._run(
            self._tx,
            "save_pipeline",
            _SAVE_PIPELINE,
            [(routing_key, domain, source_ip, _policy_blob(policy))],
        )

    async def pipelines_to_resume(self) -> list[PipelineRecord]:
        """Pipelines with unfinished mail, with the policy each was last started with."""
        rows = await self._run(self._query, _RESUME, ())
        return [PipelineRecord(k, d, ip, _policy_from_blob(blob, k)) for k, d, ip, blob in rows]

    async def pipeline(self, routing_key: str) -> PipelineRecord | None:
        """How ``routing_key``'s pipeline was last started, if it ever was."""
        rows = await self._run(self._query, _PIPELINE, (routing_key,))
        return next((PipelineRecord(k, d, ip, _policy_from_blob(blob, k)) for k, d, ip, blob in rows), None)

    async def unfinished_keys(self) -> set[str]:
        rows = await self._run(self._query, _UNFINISHED_KEYS, ())
        return {k for (k,) in rows}

    # Mail

    async def enqueue(
        self, routing_key: str, messages: Sequence[NewMessage], traceparent: str = ""
    ) -> list[str]:
        """Store ``messages`` in one transaction and return their spool IDs once it is durable;
        each keeps ``traceparent`` (the span that spooled them)."""
        return (await self.enqueue_batch(routing_key, messages, traceparent=traceparent)).ids

    async def enqueue_batch(
        self, routing_key: str, messages: Sequence[NewMessage], batch_key: str = "", traceparent: str = ""
    ) -> Spooled:
        """Like ``enqueue``; a ``batch_key`` the spool knows stores nothing and answers the IDs
        it was stored under (an ID the spool never held, e.g. still being handed over, is "")."""
        ids = new_ids(len(messages))
        return await self._grouped(
            "enqueue", self._enqueue, routing_key, ids, messages, batch_key, traceparent or None, time.time()
        )

    def _enqueue(
        self,
        routing_key: str,
        ids: list[str],
        messages: Sequence[NewMessage],
        batch_key: str,
        traceparent: str | None,
        now: float,
    ) -> Spooled:
        """One batch, inside its group's transaction (``_grouped``)."""
        if batch_key:
            known = dict(self._db.execute(_BATCH, (batch_key,)).fetchall())
            if known:
                return Spooled([known.get(i, "") for i in range(len(messages))], duplicate=True)
            self._db.executemany(
                "INSERT INTO batches (batch_key, batch_index, message_id, created_at) VALUES (?, ?, ?, ?)",
                [(batch_key, n, i, now) for n, i in enumerate(ids)],
            )
        self._db.executemany(
            "INSERT INTO messages (id, routing_key, sender, created_at, batch_key, batch_index,"
            " traceparent) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (i, routing_key, m.sender, now, batch_key or None, n if batch_key else None, traceparent)
                for n, (i, m) in enumerate(zip(ids, messages, strict=True))
            ],
        )
        self._db.executemany(_ADD_BODY, [(i, m.data) for i, m in zip(ids, messages, strict=True)])
        deliveries = [
            (i, routing_key, r, now, now)
            for i, m in zip(ids, messages, strict=True)
            for r in dict.fromkeys(m.recipients)
        ]
        self._db.executemany(
            "INSERT INTO deliveries (message_id, routing_key, recipient, state, next_attempt_at, updated_at)"
            " VALUES (?, ?, ?, 'queued', ?, ?)",
            deliveries,
        )
        self._moved[routing_key, State.QUEUED] += len(deliveries)
        return Spooled(ids)

    # Hand-over between nodes

    async def take_queued(self, routing_key: str, limit: int, after: Cursor | None = None) -> list[Handed]:
        """Up to ``limit`` messages of ``routing_key`` with recipients queued or deferred (not in
        flight), oldest first after ``after``, with those recipients."""
        return await self._run(self._take_queued, routing_key, limit, after or (float("-inf"), ""))

    def _take_queued(self, routing_key: str, limit: int, after: Cursor) -> list[Handed]:
        rows = self._db.execute(_TAKE_QUEUED, (routing_key, *after, limit)).fetchall()
        ids = [r[0] for r in rows]
        pending: dict[str, list[Pending]] = {}
        for message_id, recipient, attempts, next_at in self._db.execute(
            _PENDING_OF.format(",".join("?" * len(ids))), ids
        ):
            pending.setdefault(message_id, []).append(Pending(recipient, attempts, next_at))
        bodies = self._bodies(ids)
        return [
            Handed(
                i,
                sender,
                bodies[i],
                created,
                batch_key or "",
                batch_index or 0,
                tuple(pending.get(i, ())),
                tp or "",
            )
            for i, sender, created, batch_key, batch_index, tp in rows
        ]

    def _bodies(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The bodies of ``ids``, by message ID: one primary-key lookup each, a chunk per query."""
        bodies: dict[str, bytes] = {}
        for start in range(0, len(ids), BODIES_PER_QUERY):
            chunk = ids[start : start + BODIES_PER_QUERY]
            bodies.update(self._db.execute(_BODIES_OF.format(",".join("?" * len(chunk))), chunk).fetchall())
        return bodies

    async def receive(self, routing_key: str, messages: Sequence[Handed]) -> list[str]:
        """Store ``messages`` handed over by another node, in one transaction, under their own
        IDs; the ID each one has here. A message held already (same ID, or its batch slot taken
        by a retried EnqueueBatch) is not stored again."""
        return await self._run(self._receive, routing_key, list(messages), time.time())

    def _receive(self, routing_key: str, messages: list[Handed], now: float) -> list[str]:
        ids = []
        bodies: list[tuple[str, bytes]] = []
        with self._writing("receive"):
            self._db.execute("BEGIN IMMEDIATE")
            for m in messages:
                if m.batch_key:
                    row = self._db.execute(_BATCH_SLOT, (m.batch_key, m.batch_index)).fetchone()
                    if row is not None and row[0] != m.id:
                        ids.append(row[0])
                        continue
                ids.append(m.id)
                if self._db.execute("SELECT 1 FROM messages WHERE id = ?", (m.id,)).fetchone():
                    continue
                self._db.execute(
                    "INSERT INTO messages (id, routing_key, sender, created_at, batch_key, batch_index,"
                    " traceparent) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        m.id,
                        routing_key,
                        m.sender,
                        m.accepted_at,
                        m.batch_key or None,
                        m.batch_index if m.batch_key else None,
                        m.traceparent or None,
                    ),
                )
                pending = [
                    (
                        m.id,
                        routing_key,
                        d.recipient,
                        State.DEFERRED if d.attempts else State.QUEUED,
                        d.attempts,
                        d.next_attempt_at,
                        now,
                    )
                    for d in m.pending
                ]
                self._db.executemany(
                    "INSERT INTO deliveries (message_id, routing_key, recipient, state, attempts,"
                    " next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    pending,
                )
                self._moved.update((routing_key, state) for _, _, _, state, *_ in pending)
                if m.batch_key:
                    self._db.execute(
                        "INSERT OR IGNORE INTO batches (batch_key, batch_index, message_id, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (m.batch_key, m.batch_index, m.id, now),
                    )
                bodies.append((m.id, m.data))
            self._db.executemany(_ADD_BODY, bodies)
        return ids

    async def remove_handed(self, message_ids: Sequence[str]) -> None:
        """Forget the queued and deferred recipients of messages another node now holds; a
        message left with no recipient goes too. One transaction."""
        await self._run(self._remove_handed, [(i,) for i in message_ids])

    def _remove_handed(self, ids: list[tuple[str]]) -> None:
        with self._writing("remove_handed"):
            for start in range(0, len(ids), BODIES_PER_QUERY):
                chunk = [i for (i,) in ids[start : start + BODIES_PER_QUERY]]
                query = _PENDING_COUNTS.format(",".join("?" * len(chunk)))
                self._moved.subtract({(k, state): n for k, state, n in self._db.execute(query, chunk)})
            self._db.executemany(_DELETE_PENDING_ATTEMPTS, ids)
            self._db.executemany(
                "DELETE FROM deliveries WHERE message_id = ? AND state IN ('queued', 'deferred')", ids
            )
            self._db.executemany(_DELETE_IF_EMPTY, ids)

    async def forget_batches(self, before: float) -> int:
        """Forget the idempotency keys of batches spooled before ``before`` (epoch seconds)."""
        return await self._run(self._forget_batches, before)

    def _forget_batches(self, before: float) -> int:
        with self._writing("forget_batches"):
            return self._db.execute("DELETE FROM batches WHERE created_at < ?", (before,)).rowcount

    async def due(self, routing_key: str, now: float, up_to: int = 1) -> Due:
        """Whether mail is due: the due messages counted up to ``up_to`` (a pipeline asks for its
        batch size, not for the whole backlog), the oldest's due time, and the next time due."""
        return await self._run(self._due, routing_key, now, max(1, up_to))

    def _due(self, routing_key: str, now: float, up_to: int) -> Due:
        picked = self._first_due(routing_key, now, up_to)
        later = [
            t for state in _DUE_STATES for (t,) in self._db.execute(_NEXT_DUE, (routing_key, state, now))
        ]
        return Due(len(picked), min(picked.values(), default=None), min(later, default=None))

    def _first_due(self, routing_key: str, now: float, limit: int) -> dict[str, float]:
        """The first ``limit`` messages due by ``now``, oldest first, each with its due time.

        Each state's due deliveries are read in the order of the deliveries_due index (due time,
        then id) and merged, stopping at the ``limit``-th message: a claim reads what it takes,
        however long the backlog is."""
        cursors = [self._db.execute(_DUE_IN_STATE, (routing_key, state, now)) for state in _DUE_STATES]
        picked: dict[str, float] = {}
        try:
            for due_at, _, message_id in heapq.merge(*cursors):
                if message_id not in picked:
                    picked[message_id] = due_at
                    if len(picked) == limit:
                        break
        finally:
            for c in cursors:
                c.close()
        return picked

    async def claim(self, routing_key: str, now: float, limit: int, due_by: float | None = None) -> list[Job]:
        """Mark up to ``limit`` messages due by ``due_by`` (default ``now``) ``inflight`` and
        return them, oldest first."""
        return await self._run(self._claim, routing_key, now, limit, now if due_by is None else due_by)

    def _claim(self, routing_key: str, now: float, limit: int, due_by: float) -> list[Job]:
        # Not synced: a claim lost in a crash leaves its mail queued, as restarting makes it anyway
        # (``_RELEASE_ALL``); the next synced commit makes the WAL durable up to it.
        with self._writing("claim", synced=False):
            picked = list(self._first_due(routing_key, due_by, limit))
            rows: list[Any] = []
            for start in range(0, len(picked), BODIES_PER_QUERY):
                chunk = picked[start : start + BODIES_PER_QUERY]
                query = _CLAIM.format(",".join("?" * len(chunk)))
                rows += self._db.execute(query, (*chunk, routing_key, due_by)).fetchall()
            order = {m: n for n, m in enumerate(picked)}
            rows.sort(key=lambda r: order[r[0]])  # oldest message first, its deliveries by id
            self._db.executemany(
                "UPDATE deliveries SET state = 'inflight', updated_at = ? WHERE id = ?",
                [(now, r[2]) for r in rows],
            )
            self._moved.subtract((routing_key, r[7]) for r in rows)
            self._moved[routing_key, State.INFLIGHT] += len(rows)
        heads: dict[str, tuple[str, float, str]] = {}
        deliveries: dict[str, list[Delivery]] = {}
        for message_id, sender, delivery_id, recipient, attempts, created, tp, _ in rows:
            if message_id not in heads:
                heads[message_id] = (sender, created, tp or "")
                deliveries[message_id] = []
            deliveries[message_id].append(Delivery(delivery_id, recipient, attempts))
        # Each body once, however many of its recipients are due (a join would read it per row).
        bodies = self._bodies(list(heads))
        return [
            Job(i, sender, bodies[i], tuple(deliveries[i]), created, tp)
            for i, (sender, created, tp) in heads.items()
        ]

    async def record(self, outcomes: Iterable[Outcome]) -> None:
        """Update the deliveries and append the attempts that leave them to be retried to their
        history (a finishing attempt is its delivery row), all in one transaction
        (one fsync however many outcomes there are); returns once it is durable."""
        await self._grouped("record", self._record, list(outcomes), time.time())

    def _record(self, outcomes: list[Outcome], now: float) -> None:
        """One group of outcomes, inside its group's transaction (``_grouped``). A finished
        delivery keeps when its last attempt was made as its ``next_attempt_at``."""
        self._move(outcomes)
        updates: list[tuple[object, ...]] = []
        history: list[tuple[object, ...]] = []
        for o in outcomes:
            at = now if o.attempted_at is None else o.attempted_at
            reply, text, finished = o.reply, o.text, o.state in _FINISHED
            next_at = at if finished else o.next_attempt_at
            updates.append(
                (o.state.value, o.attempts, next_at, reply.code, reply.enhanced, text, now, o.delivery_id)
            )
            if not finished:
                history.append(
                    (o.attempts, at, o.state.value, reply.code, reply.enhanced, text, o.delivery_id)
                )
        self._db.executemany(_RECORD, updates)
        if history:
            self._db.executemany(_ATTEMPT, history)

    def _move(self, outcomes: list[Outcome]) -> None:
        """Count the deliveries ``outcomes`` move, from the state each is in to its outcome's (the
        last, for a delivery with several)."""
        final = {o.delivery_id: o.state for o in outcomes}
        ids = list(final)
        for start in range(0, len(ids), BODIES_PER_QUERY):
            chunk = ids[start : start + BODIES_PER_QUERY]
            for delivery_id, key, state in self._db.execute(
                _STATES_OF.format(",".join("?" * len(chunk))), chunk
            ):
                self._moved[key, state] -= 1
                self._moved[key, final[delivery_id]] += 1

    async def purge(self, finished_before: float, limit: int, *, chunk: int = PURGE_CHUNK) -> int:
        """Delete up to ``limit`` finished messages (every recipient delivered or bounced, the last
        outcome before ``finished_before``, epoch seconds) with their deliveries and attempts; how
        many were deleted. A message with a queued, in-flight or deferred recipient stays.

        Each chunk of at most ``chunk`` messages is one transaction and one job on the spool
        thread, so other spool work runs between chunks. The deleted deliveries are added to the
        ``purged`` totals in the same transaction: counts do not change."""
        if limit <= 0 or chunk <= 0:
            raise ValueError(f"limit {limit} and chunk {chunk} must be positive")
        removed = 0
        after: Cursor | None = (float("-inf"), "")
        while after is not None and removed < limit:
            n, after = await self._run(self._purge_chunk, finished_before, after, min(chunk, limit - removed))
            removed += n
        return removed

    def _purge_chunk(self, finished_before: float, after: Cursor, n: int) -> tuple[int, Cursor | None]:
        """Look at the next ``n`` finished deliveries after ``after`` and delete the messages that
        are finished and old enough; (messages deleted, where to go on from or None at the end)."""
        with self._writing("purge"):
            # The check and the deletes are one transaction, whoever else writes to the file.
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(_PURGEABLE, (finished_before, *after, n)).fetchall()
            ids = [(m,) for m in dict.fromkeys(m for _, m, finished in rows if finished)]
            self._db.executemany(_ADD_PURGED, ids)
            self._db.executemany("DELETE FROM attempts WHERE message_id = ?", ids)
            self._db.executemany("DELETE FROM deliveries WHERE message_id = ?", ids)
            self._db.executemany("DELETE FROM messages WHERE id = ?", ids)
        return len(ids), (rows[-1][0], rows[-1][1]) if len(rows) == n else None

    async def release(self, routing_key: str) -> None:
        """Put ``routing_key``'s in-flight deliveries back in the queue (after a stop or a crash)."""
        await self._run(self._release, routing_key, time.time())

    def _release(self, routing_key: str, now: float) -> None:
        with self._writing("release"):
            released = self._db.execute(_RELEASE, (now, routing_key)).rowcount
            self._moved[routing_key, State.INFLIGHT] -= released
            self._moved[routing_key, State.QUEUED] += released

    # Reading

    async def counts(self, routing_key: str) -> Counts:
        """``routing_key``'s deliveries by state, as of the last commit."""
        return self._counts_view.get(routing_key) or Counts()

    async def all_counts(self) -> dict[str, Counts]:
        return dict(self._counts_view)  # one C-level copy: a consistent view of every key

    def _publish(self, keys: Iterable[str]) -> None:
        """Make ``keys``' counts in the tally what ``counts`` reads (on the spool's thread)."""
        t = self._tally
        for key in keys:
            c = Counts(
                queued=t[key, State.QUEUED],
                in_flight=t[key, State.INFLIGHT],
                deferred=t[key, State.DEFERRED],
                delivered=t[key, State.DELIVERED],
                bounced=t[key, State.BOUNCED],
            )
            if c == _NONE_COUNTED:
                self._counts_view.pop(key, None)
            else:
                self._counts_view[key] = c

    def _counted(self, routing_key: str | None) -> dict[str, Counts]:
        """The tally (on the spool's thread, so as of the last commit), for one key or all."""
        rows = [(k, state, n) for (k, state), n in self._tally.items() if n and routing_key in (None, k)]
        return _counts(rows)

    def _count_all(self) -> None:
        """Count every routing key's deliveries in the file: once, when it is opened."""
        self._tally = Counter()
        for k, state, n in self._db.execute(_COUNTS):  # a state twice: in the file and purged
            self._tally[k, state] += n
        self._counts_view = {}
        self._publish({k for k, _ in self._tally})

    async def backlog(self) -> list[Backlog]:
        """Per routing key and unfinished state, its deliveries and the oldest one's accepted
        time (``Backlog``): one grouped index scan and one lookup per group (what a metrics
        scrape reads)."""
        return await self._run(self._backlog)

    def _backlog(self) -> list[Backlog]:
        # Counted on the deliveries_due index alone; the oldest is the first delivery to arrive
        # here (lowest id) in each group, whose message alone is read, not every unfinished one's.
        groups = self._db.execute(_BACKLOG).fetchall()
        firsts = [first for _, _, _, first in groups]
        accepted = (
            dict(
                self._db.execute(_ACCEPTED_OF_DELIVERY.format(",".join("?" * len(firsts))), firsts).fetchall()
            )
            if firsts
            else {}
        )
        return [Backlog(k, State(state), n, accepted.get(first, 0.0)) for k, state, n, first in groups]

    async def deliveries(self, message_id: str) -> list[DeliveryRow]:
        rows = await self._run(self._query, _DELIVERIES, (message_id,))
        return [_delivery_row(*r) for r in rows]

    # Queue inspection

    async def queue_stats(self, routing_key: str | None = None) -> dict[str, KeyStats]:
        """Counts and next retry per routing key (only ``routing_key``'s when given)."""
        return await self._run(self._queue_stats, routing_key)

    def _queue_stats(self, routing_key: str | None) -> dict[str, KeyStats]:
        counts = self._counted(routing_key)
        if routing_key is None:
            nexts = dict(self._db.execute(_NEXT_DEFERRED).fetchall())
        else:
            nexts = dict(self._db.execute(_NEXT_DEFERRED_OF_KEY, (routing_key,)).fetchall())
        return {k: KeyStats(c, nexts.get(k)) for k, c in counts.items()}

    async def list_messages(
        self, routing_key: str | None, state: State | None, after: Cursor | None, limit: int
    ) -> list[MessageRow]:
        """Up to ``limit`` messages, oldest first, after ``after``; with ``state``, only those
        with a delivery in that state."""
        return await self._run(self._list_messages, routing_key, state, after, limit)

    def _list_messages(
        self, routing_key: str | None, state: State | None, after: Cursor | None, limit: int
    ) -> list[MessageRow]:
        where: list[str] = []
        params: list[object] = []
        if routing_key is not None:
            where.append("m.routing_key = ?")
            params.append(routing_key)
        if after is not None:
            where.append("(m.created_at, m.id) > (?, ?)")
            params += after
        if state is not None:
            where.append("EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id AND d.state = ?)")
            params.append(state.value)
        sql = _LIST.format(where=" AND ".join(where) or "1")
        rows = self._db.execute(sql, (HEAD_BYTES, *params, limit)).fetchall()
        return [self._message_row(*r) for r in rows]

    async def message(self, message_id: str) -> tuple[MessageRow, list[AttemptRow]] | None:
        """A message with its deliveries and its attempt history, or None when unknown."""
        return await self._run(self._message, message_id)

    def _message(self, message_id: str) -> tuple[MessageRow, list[AttemptRow]] | None:
        row = self._db.execute(_MESSAGE, (HEAD_BYTES, message_id)).fetchone()
        if row is None:
            return None
        attempts = [
            AttemptRow(r, n, at, State(res), Reply(c or 0, e, t or ""))
            for r, n, at, res, c, e, t in self._db.execute(_ATTEMPTS, (message_id,))
        ]
        return self._message_row(*row), attempts

    def _message_row(
        self, id: str, key: str, sender: str, created_at: float, size: int, head: bytes
    ) -> MessageRow:
        deliveries = tuple(_delivery_row(*r) for r in self._db.execute(_DELIVERIES, (id,)))
        return MessageRow(id, key, sender, created_at, size, head, deliveries)

    def _tx(self, operation: str, sql: str, rows: list[tuple[object, ...]]) -> None:
        with self._writing(operation):
            self._db.executemany(sql, rows)

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        return self._db.execute(sql, params).fetchall()


def _delivery_row(
    recipient: str,
    state: str,
    attempts: int,
    next_at: float,
    code: int | None,
    enhanced: str | None,
    text: str | None,
) -> DeliveryRow:
    reply = None if code is None else Reply(code, enhanced or "", text or "")
    return DeliveryRow(recipient, State(state), attempts, next_at, reply)


_NONE_COUNTED = Counts()


def _counts(rows: list[Any]) -> dict[str, Counts]:
    by_key: dict[str, dict[str, int]] = {}
    for key, state, n in rows:
        c = by_key.setdefault(key, {})
        c[state] = c.get(state, 0) + n
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


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the event loop: each grouped call's result (a caller that stopped waiting has none)."""
    for future, result, error in settled:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def new_ids(n: int) -> list[str]:
    """``n`` spool IDs: UUIDv7 (RFC 9562) in 32 hex digits, a millisecond timestamp first.

    Time-ordered keys land at the right edge of the B-trees they index (messages, bodies,
    deliveries by message, batches) instead of at random pages, which makes a commit write fewer
    pages (an eighth less spool CPU per message than UUIDv4, by benchmark)."""
    prefix = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    rand = bytearray(os.urandom(10 * n))  # one getrandom call for the batch, not one per ID
    ids = []
    for i in range(0, 10 * n, 10):
        rand[i] = 0x70 | rand[i] & 0x0F  # version 7, then 12 random bits
        rand[i + 2] = 0x80 | rand[i + 2] & 0x3F  # variant 0b10, then 62 random bits
        ids.append((prefix + rand[i : i + 10]).hex())
    return ids


def _name_os_thread() -> None:
    """Name the spool's thread for the OS too, so ``top -H`` and /proc show where CPU goes."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, b"epoxi-spool", 0, 0, 0)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED")
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL journal mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # negative: KiB, not pages
        with db:
            db.executescript(_SCHEMA)
        with db:
            _migrate(db)
        with db:
            # Whatever was in flight when the node stopped goes back to the queue.
            db.execute(_RELEASE_ALL, (time.time(),))
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a spool file from an older node up to date (in the caller's transaction).

    Messages get the batch columns and the traceparent column, NULL for the mail already there.
    Messages once held their bodies: each moves to ``bodies`` and the column goes (the file
    keeps its size until a VACUUM; its free pages are reused). Deliveries once kept the reply's
    text whole: they get an enhanced code column, and each row's text is split into enhanced
    code and the rest, as the reply was parsed. Files before ``user_version``
    ``_FINISHED_IN_DELIVERIES`` wrote the attempt that finished a delivery to its history too:
    its time moves to the delivery's ``next_attempt_at`` and the row goes, as a newer node keeps it."""
    db.execute("BEGIN IMMEDIATE")  # DDL included: the column and its rows appear together
    message_columns = {name for _, name, *_ in db.execute("PRAGMA table_info(messages)")}
    if "batch_key" not in message_columns:
        db.execute("ALTER TABLE messages ADD COLUMN batch_key TEXT")
        db.execute("ALTER TABLE messages ADD COLUMN batch_index INTEGER")
    if "traceparent" not in message_columns:
        db.execute("ALTER TABLE messages ADD COLUMN traceparent TEXT")
    if "data" in message_columns:
        db.execute("INSERT INTO bodies (message_id, data) SELECT id, data FROM messages")
        db.execute("ALTER TABLE messages DROP COLUMN data")
    columns = {name for _, name, *_ in db.execute("PRAGMA table_info(deliveries)")}
    if "enhanced_code" not in columns:
        db.execute("ALTER TABLE deliveries ADD COLUMN enhanced_code TEXT")
        rows = db.execute("SELECT id, reply_code, reply_text FROM deliveries WHERE reply_text IS NOT NULL")
        split = [(r.enhanced, r.text, i) for i, code, text in rows for r in [Reply.parse(code or 0, text)]]
        db.executemany("UPDATE deliveries SET enhanced_code = ?, reply_text = ? WHERE id = ?", split)
    if db.execute("PRAGMA user_version").fetchone()[0] < _FINISHED_IN_DELIVERIES:
        db.execute(_FINISHED_AT_OF_LAST_ATTEMPT)
        db.execute(_DELETE_LAST_FINISHED_ATTEMPTS)
        db.execute(f"PRAGMA user_version = {_FINISHED_IN_DELIVERIES}")


_FINISHED_IN_DELIVERIES = 1  # the user_version from which a finished attempt is its delivery row
# A finished delivery's last history row, from a file before that: its time goes to the
# delivery, and the row goes.
_FINISHED_AT_OF_LAST_ATTEMPT = """
UPDATE deliveries SET next_attempt_at = (
    SELECT attempted_at FROM attempts WHERE id = (SELECT MAX(id) FROM attempts WHERE delivery_id = deliveries.id))
WHERE state IN ('delivered', 'bounced') AND EXISTS (SELECT 1 FROM attempts WHERE delivery_id = deliveries.id)
"""
_DELETE_LAST_FINISHED_ATTEMPTS = """
DELETE FROM attempts WHERE id IN (
    SELECT MAX(a.id) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
    WHERE d.state IN ('delivered', 'bounced') GROUP BY a.delivery_id)
"""


# A policy's SQLite form: its protobuf, serialized.


def _policy_blob(policy: Policy) -> bytes:
    return policy.to_proto().SerializeToString()


def _policy_from_blob(blob: bytes, routing_key: str) -> Policy:
    proto = pipeline_pb2.PipelinePolicy()
    proto.ParseFromString(blob)
    return Policy.from_proto(proto, routing_key)


_SAVE_PIPELINE = """
INSERT INTO pipelines (routing_key, domain, source_ip, policy) VALUES (?, ?, ?, ?)
ON CONFLICT (routing_key) DO UPDATE SET domain = excluded.domain, source_ip = excluded.source_ip,
    policy = excluded.policy
"""
_PIPELINE = "SELECT routing_key, domain, source_ip, policy FROM pipelines WHERE routing_key = ?"
_BATCH = "SELECT batch_index, message_id FROM batches WHERE batch_key = ?"
_BATCH_SLOT = "SELECT message_id FROM batches WHERE batch_key = ? AND batch_index = ?"
_TAKE_QUEUED = """
SELECT m.id, m.sender, m.created_at, m.batch_key, m.batch_index, m.traceparent FROM messages m
WHERE m.routing_key = ? AND (m.created_at, m.id) > (?, ?) AND EXISTS (
    SELECT 1 FROM deliveries d WHERE d.message_id = m.id AND d.state IN ('queued', 'deferred'))
ORDER BY m.created_at, m.id LIMIT ?
"""
_PENDING_OF = """
SELECT message_id, recipient, attempts, next_attempt_at FROM deliveries
WHERE message_id IN ({}) AND state IN ('queued', 'deferred') ORDER BY id
"""
_DELETE_PENDING_ATTEMPTS = """
DELETE FROM attempts WHERE delivery_id IN (
    SELECT id FROM deliveries WHERE message_id = ? AND state IN ('queued', 'deferred'))
"""
_DELETE_IF_EMPTY = """
DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message_id = ?1)
"""
_UNFINISHED_KEYS = """
SELECT DISTINCT routing_key FROM deliveries WHERE state IN ('queued', 'inflight', 'deferred')
"""
_RESUME = f"""
SELECT p.routing_key, p.domain, p.source_ip, p.policy FROM pipelines p
WHERE p.routing_key IN ({_UNFINISHED_KEYS}) ORDER BY p.routing_key
"""
_DUE_STATES = ("queued", "deferred")
# One state's due deliveries in the deliveries_due index's order (its rowid is the id).
_DUE_IN_STATE = """
SELECT next_attempt_at, id, message_id FROM deliveries
WHERE routing_key = ? AND state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id
"""
_STATES_OF = "SELECT id, routing_key, state FROM deliveries WHERE id IN ({})"
_PENDING_COUNTS = """
SELECT routing_key, state, COUNT(*) FROM deliveries
WHERE message_id IN ({}) AND state IN ('queued', 'deferred') GROUP BY routing_key, state
"""
_NEXT_DUE = """
SELECT next_attempt_at FROM deliveries WHERE routing_key = ? AND state = ? AND next_attempt_at > ?
ORDER BY next_attempt_at LIMIT 1
"""
# The due deliveries of the messages a claim picked, with their envelopes: by message (the
# planner would otherwise walk the key's whole due range on deliveries_due).
_CLAIM = """
SELECT m.id, m.sender, d.id, d.recipient, d.attempts, m.created_at, m.traceparent, d.state
FROM deliveries d INDEXED BY deliveries_message JOIN messages m ON m.id = d.message_id
WHERE d.message_id IN ({}) AND d.routing_key = ? AND d.state IN ('queued', 'deferred')
    AND d.next_attempt_at <= ?
ORDER BY d.id
"""
_RECORD = """
UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, reply_code = ?, enhanced_code = ?,
    reply_text = ?, updated_at = ? WHERE id = ?
"""
_RELEASE = (
    "UPDATE deliveries SET state = 'queued', updated_at = ? WHERE routing_key = ? AND state = 'inflight'"
)
_RELEASE_ALL = "UPDATE deliveries SET state = 'queued', updated_at = ? WHERE state = 'inflight'"
# Counts per (routing key, state): the spool's deliveries plus those retention purged.
_COUNTS = """
SELECT routing_key, state, COUNT(*) FROM deliveries GROUP BY routing_key, state
UNION ALL SELECT routing_key, 'delivered', delivered FROM purged
UNION ALL SELECT routing_key, 'bounced', bounced FROM purged
"""
# Finished deliveries that finished before ?1, after the cursor (?2, ?3), in the order of the
# deliveries_finished index; each with whether its whole message is finished before ?1.
_PURGEABLE = """
SELECT d.updated_at, d.message_id, NOT EXISTS (
    SELECT 1 FROM deliveries o WHERE o.message_id = d.message_id
    AND (o.state NOT IN ('delivered', 'bounced') OR o.updated_at >= ?1)
) FROM deliveries d
WHERE d.state IN ('delivered', 'bounced') AND d.updated_at < ?1 AND (d.updated_at, d.message_id) > (?2, ?3)
ORDER BY d.updated_at, d.message_id LIMIT ?4
"""
_ADD_PURGED = """
INSERT INTO purged (routing_key, delivered, bounced)
SELECT routing_key, SUM(state = 'delivered'), SUM(state = 'bounced') FROM deliveries
WHERE message_id = ? GROUP BY routing_key
ON CONFLICT (routing_key) DO UPDATE SET delivered = delivered + excluded.delivered,
    bounced = bounced + excluded.bounced
"""
_BACKLOG = """
SELECT routing_key, state, COUNT(*), MIN(id) FROM deliveries
WHERE state IN ('queued', 'inflight', 'deferred') GROUP BY routing_key, state
"""
_ACCEPTED_OF_DELIVERY = """
SELECT d.id, m.created_at FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE d.id IN ({})
"""
_DELIVERIES = """
SELECT recipient, state, attempts, next_attempt_at, reply_code, enhanced_code, reply_text FROM deliveries
WHERE message_id = ? ORDER BY id
"""
_ATTEMPT = """
INSERT INTO attempts (delivery_id, message_id, recipient, attempt, attempted_at, result, reply_code,
    enhanced_code, reply_text)
SELECT id, message_id, recipient, ?, ?, ?, ?, ?, ? FROM deliveries WHERE id = ?
"""
# A message's history: the attempts that left a delivery to be retried, and each finished
# delivery's last attempt (the delivery row), in the order they were made.
_ATTEMPTS = """
SELECT recipient, attempt, attempted_at, result, reply_code, enhanced_code, reply_text FROM (
    SELECT recipient, attempt, attempted_at, result, reply_code, enhanced_code, reply_text,
        delivery_id, 0 AS last, id AS n FROM attempts WHERE message_id = ?1
    UNION ALL
    SELECT recipient, attempts, next_attempt_at, state, reply_code, enhanced_code, reply_text, id, 1, 0
    FROM deliveries WHERE message_id = ?1 AND state IN ('delivered', 'bounced')
) ORDER BY attempted_at, last, delivery_id, n
"""
_NEXT_DEFERRED = """
SELECT routing_key, MIN(next_attempt_at) FROM deliveries WHERE state = 'deferred' GROUP BY routing_key
"""
_NEXT_DEFERRED_OF_KEY = """
SELECT routing_key, MIN(next_attempt_at) FROM deliveries WHERE routing_key = ? AND state = 'deferred'
"""
# A listed message's size and head come from its body, looked up (by primary key) for the rows
# listed only: the listing's scan and order are the messages table's.
_MESSAGE_COLUMNS = "m.id, m.routing_key, m.sender, m.created_at, length(b.data), substr(b.data, 1, ?)"
_LIST = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN bodies b ON b.message_id = m.id
WHERE {{where}} ORDER BY m.created_at, m.id LIMIT ?
"""
_MESSAGE = f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN bodies b ON b.message_id = m.id WHERE m.id = ?"
_ADD_BODY = "INSERT INTO bodies (message_id, data) VALUES (?, ?)"
_BODIES_OF = "SELECT message_id, data FROM bodies WHERE message_id IN ({})"
