"""Sending many emails: batches through RouteEmails, a few in flight, every email accounted for.

A batch holds at most ``batch_size`` emails and ``epoxi.runtime.limits.batch_bytes`` of them,
what one request may carry.

Each batch is one RouteEmails call carrying an ``idempotency-key`` (``services.router.raw``):
the SHA-256 of the request, so the same batch always carries the same key. A call that fails
UNAVAILABLE or DEADLINE_EXCEEDED is made again, with the same key, after ``epoxi.backoff``'s
delay: a router that spooled the batch before the reply was lost spools nothing twice.

An email fails when it cannot be sent (``cli.inputs``: its reason), when its call failed
(the gRPC code and message), or when a batch the router made of it was not ACCEPTED (the
batch's status and error). Each failure keeps the call's idempotency key, so that a retry of
the failed emails (``--only-indexes``) sends those of one call together with the key that call
had: for a batch that ended UNKNOWN the router then makes the same batch key again
(``services.router.batching``), and a node that spooled it spools nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cli import exits
from cli.inputs import Item
from cli.progress import Progress
from epoxi.backoff import Backoff
from epoxi.runtime import limits
from epoxi.v1 import router_pb2, router_pb2_grpc

IDEMPOTENCY_KEY = "idempotency-key"
KEY_PREFIX = "epoxi-send-"
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ATTEMPTS = 4
BACKOFF = Backoff(base=0.2, cap=2.0, jitter=0.5)


@dataclass(frozen=True)
class Failure:
    index: int
    file: str
    reason: str
    # The idempotency key of the call that carried it; "" when it was never sent.
    idempotency_key: str = ""

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"index": self.index, "reason": self.reason}
        if self.file:
            found["file"] = self.file
        if self.idempotency_key:
            found["idempotencyKey"] = self.idempotency_key
        return found


@dataclass
class Outcome:
    total: int = 0
    accepted: int = 0
    failures: list[Failure] = field(default_factory=list)
    batches: int = 0
    failed_batches: int = 0
    # Calls answered by the router, and the exit codes of calls that failed (cli.exits).
    answered: int = 0
    call_failures: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Retry:
    """What ``--only-indexes FILE`` says: which emails to send, and the key of the call that
    carried each before."""

    keys: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Retry:
        """A failed file (JSON lines of ``Failure.to_json``); ValueError says what is wrong."""
        keys: dict[str, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = str(entry["file"]) if entry.get("file") else str(int(entry["index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise ValueError(
                    f'{path} line {number} is not a failed-file entry ({{"index": N, ...}})'
                ) from None
            keys[name] = str(entry.get("idempotencyKey") or "")
        return cls(keys)


def call_key(request: router_pb2.RouteEmailsRequest) -> str:
    return KEY_PREFIX + hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class BulkSender:
    def __init__(
        self,
        stub: router_pb2_grpc.RouterServiceStub,
        progress: Progress,
        batch_size: int,
        concurrency: int,
        ip_pool: str = "",
        timeout: float = 60.0,
    ) -> None:
        self._stub = stub
        self._progress = progress
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._ip_pool = ip_pool
        self._timeout = timeout
        # What one RouteEmails may carry (the router's default max_email_bytes).
        self._batch_bytes = limits.batch_bytes()
        self.outcome = Outcome()

    async def run(self, items: Iterable[Item], retry: Retry | None = None) -> Outcome:
        tasks: set[asyncio.Task[None]] = set()
        # Emails a failed file names by an earlier call's key travel together under that key.
        keyed: dict[str, list[Item]] = {}
        batch: list[Item] = []
        size = 0
        for item in items:
            self.outcome.total += 1
            if item.email is None:
                self._fail([item], item.problem, "")
                continue
            earlier = retry.keys.get(item.key, "") if retry is not None else ""
            if earlier:
                keyed.setdefault(earlier, []).append(item)
                continue
            item_size = limits.encoded_size(item.email)
            if batch and size + item_size > self._batch_bytes:
                await self._start(tasks, batch, "")
                batch, size = [], 0
            batch.append(item)
            size += item_size
            if len(batch) >= self._batch_size:
                await self._start(tasks, batch, "")
                batch, size = [], 0
        if batch:
            await self._start(tasks, batch, "")
        for key, group in keyed.items():
            await self._start(tasks, group, key)
        await asyncio.gather(*tasks)
        return self.outcome

    async def _start(self, tasks: set[asyncio.Task[None]], batch: list[Item], key: str) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._send(batch, key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _send(self, batch: list[Item], key: str) -> None:
        try:
            request = router_pb2.RouteEmailsRequest(
                emails=[i.email for i in batch if i.email is not None], ip_pool=self._ip_pool
            )
            key = key or call_key(request)
            self.outcome.batches += 1
            reply = await self._call(request, key)
            if isinstance(reply, grpc.aio.AioRpcError):
                self.outcome.failed_batches += 1
                self.outcome.call_failures.append(exits.for_code(reply.code()))
                self._fail(batch, f"{reply.code().name}: {reply.details()}", key)
                return
            self.outcome.answered += 1
            failed: dict[int, str] = {}
            for b in reply.batches:
                if not b.ok:
                    status = router_pb2.BatchStatus.Name(b.status).removeprefix("BATCH_STATUS_")
                    for i in b.email_indexes:
                        failed.setdefault(i, f"batch {b.routing_key} {status}: {b.error}")
            if failed:
                self.outcome.failed_batches += 1
            for position, item in enumerate(batch):
                if position in failed:
                    self.outcome.failures.append(Failure(item.index, item.file, failed[position], key))
            self.outcome.accepted += len(batch) - len(failed)
            self._progress.advance(len(batch), len(failed))
        finally:
            self._slots.release()

    async def _call(
        self, request: router_pb2.RouteEmailsRequest, key: str
    ) -> router_pb2.RouteEmailsResponse | grpc.aio.AioRpcError:
        """The router's answer, or the error of the last attempt."""
        attempt = 1
        while True:
            try:
                reply: router_pb2.RouteEmailsResponse = await self._stub.RouteEmails(
                    request, timeout=self._timeout, metadata=((IDEMPOTENCY_KEY, key),)
                )
                return reply
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRIED or attempt >= ATTEMPTS:
                    return e
            await asyncio.sleep(BACKOFF.delay(attempt))
            attempt += 1

    def _fail(self, items: list[Item], reason: str, key: str) -> None:
        for item in items:
            self.outcome.failures.append(Failure(item.index, item.file, reason, key))
        self._progress.advance(len(items), len(items))
