"""A delivery pipeline: one supervised asyncio task per routing key (recipient domain and source IP).

The task takes up to ``batch_size`` due messages from the spool — or, when fewer are due, what
arrived within ``batch_timeout`` — and sends them over up to ``max_connections`` reused SMTP
connections, never more than ``allowed_messages`` in any ``message_interval``. Each connection is
a lane pulling from one queue of claimed messages, and the next batch is claimed as soon as a lane
is idle with nothing claimed left to take: a slow server holds up its own lane, not the next batch. Each message's
outcome is: 2xx delivered; 5xx bounced with the reply; 4xx or a transport failure deferred with
exponential backoff and jitter, and bounced once ``max_retries`` retries are spent.

Outcomes are recorded in groups (``Recorder``), so many share one transaction and its fsync: a
group is committed when ``record_group`` outcomes are pending, when the oldest has waited
``record_delay`` seconds, before each claim, when every lane is idle, and before in-flight mail is
released (on stop, and after a crash). Until its group commits, a sent message stays ``inflight``
in the spool, which the spool requeues if the node dies: so a crash sends again at most the
pipeline's last claimed batch and the sends still under way when it was claimed, never loses a
message. A bounce spools a DSN to the sender
(``Bouncer``) before its outcome even joins a group, so a crash between the two repeats the DSN
rather than losing it. ``apply_policy`` changes the knobs while running: the next claim uses them (and lanes beyond
a lowered ``max_connections`` end after their message).
If the task crashes it is restarted after a growing delay, and the failure is reported meanwhile
(``on_failure``, ``status``, ``state_line``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from epoxi.policy import Policy
from epoxi.v1 import pipeline_pb2
from services.node.engine.delivery import Connection, Result, Sender, Status
from services.node.engine.dsn import Bouncer, Failure
from services.node.engine.spool import Counts, Delivery, Job, Outcome, Spool, State

log = logging.getLogger(__name__)

PipelineStatus: TypeAlias = pipeline_pb2.PipelineStatus.ValueType
STARTING = pipeline_pb2.PIPELINE_STATUS_STARTING
RUNNING = pipeline_pb2.PIPELINE_STATUS_RUNNING
STOPPING = pipeline_pb2.PIPELINE_STATUS_STOPPING
STOPPED = pipeline_pb2.PIPELINE_STATUS_STOPPED
FAILED = pipeline_pb2.PIPELINE_STATUS_FAILED

MAX_RESTART_DELAY = 30.0
# Outcomes per commit at most before a commit starts, and how long one may wait for its group.
RECORD_GROUP = 50
RECORD_DELAY = 0.05


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with equal jitter: attempt n waits between d/2 and d, d = base * 2^(n-1)."""

    base: float = 60.0
    cap: float = 3600.0

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        d = min(self.cap, self.base * 2.0 ** max(0, attempts - 1))
        return d / 2 + rng() * d / 2


class RateLimiter:
    """Never more than ``allowed`` sends in any window of ``interval`` seconds; bursts of ``allowed``.

    A sliding-window log: a send holds its slot until it completes, and the slot is free again
    ``interval`` seconds after that. So any two sends through one slot are at least ``interval``
    apart however long each took, and a receiver sees at most ``allowed`` arrivals in any window.
    (GCRA would smooth the rate, but with a burst of ``allowed`` it lets up to 2 x allowed - 1 sends
    into one window.)
    """

    def __init__(self, allowed: int, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = max(1, allowed)
        self.interval = interval
        self._clock = clock
        self._held = 0
        self._done: deque[float] = deque()  # when recent sends completed, oldest first

    def take(self) -> float | None:
        """Take a slot (0.0), or say how long until one frees (None: not before a send completes)."""
        now = self._clock()
        while self._done and self._done[0] + self.interval <= now:
            self._done.popleft()
        used = self._held + len(self._done)
        if used < self.allowed:
            self._held += 1
            return 0.0
        if self._held >= self.allowed:
            return None
        return self._done[used - self.allowed] + self.interval - now

    def release(self) -> None:
        """The send that took a slot is done."""
        self._held = max(0, self._held - 1)
        self._done.append(self._clock())

    def resized(self, allowed: int, interval: float) -> RateLimiter:
        """A limiter with new limits that remembers the sends of this one (in flight and recent)."""
        new = RateLimiter(allowed, interval, self._clock)
        new._held = self._held
        new._done = deque(self._done)
        return new


class Recorder:
    """A pipeline's outcomes, recorded in groups: one spool transaction (one fsync) for many.

    ``add`` keeps outcomes pending. A recording starts once ``group`` are pending or the oldest
    has waited ``delay`` seconds, and commits everything pending when it starts; outcomes added
    meanwhile go in the next one. ``flush`` commits the rest at once and returns when every
    outcome added before it is durable. A recording runs in a task of its own, so cancelling
    whoever waits for it (a pipeline stopped past its grace) does not lose the group: it commits,
    or, if the spool fails, its deliveries stay ``inflight`` and are sent again once released.
    A failed recording is raised once, by the next ``add`` or ``flush``.
    """

    def __init__(self, spool: Spool, group: int = RECORD_GROUP, delay: float = RECORD_DELAY) -> None:
        self.spool = spool
        self.group = max(1, group)
        self.delay = delay
        self._pending: list[Outcome] = []
        self._oldest = 0.0  # the event loop's time when the oldest pending outcome was added
        self._timer: asyncio.TimerHandle | None = None
        self._recording: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    def add(self, outcomes: Sequence[Outcome]) -> None:
        self._raise()
        if not outcomes:
            return
        if not self._pending:
            self._oldest = asyncio.get_running_loop().time()
        self._pending.extend(outcomes)
        if len(self._pending) >= self.group:
            self._start()
        else:
            self._arm()

    async def flush(self) -> None:
        """Record every pending outcome now; return once they, and any recording under way, are durable."""
        while self._recording is not None or self._pending:
            self._start()
            if self._recording is not None:
                await asyncio.wait({self._recording})  # not cancelled with the caller
            self._raise()
        self._raise()

    def discard(self) -> int:
        """Forget the pending outcomes and any failure (after a failed flush: their deliveries stay
        in flight for the spool to release); how many were pending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        n, self._pending, self._error = len(self._pending), [], None
        return n

    def _start(self) -> None:
        """Start recording what is pending, unless a recording is under way: it takes them next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._recording is None and self._pending:
            self._recording = asyncio.create_task(self._record())

    def _arm(self) -> None:
        """See that pending outcomes start recording at most ``delay`` after the oldest was added."""
        if self._pending and self._timer is None and self._recording is None:
            self._timer = asyncio.get_running_loop().call_at(self._oldest + self.delay, self._start)

    def _due(self) -> bool:
        return len(self._pending) >= self.group or (
            bool(self._pending) and asyncio.get_running_loop().time() >= self._oldest + self.delay
        )

    async def _record(self) -> None:
        try:
            while True:
                taken, self._pending = self._pending, []
                await self.spool.record(taken)
                if not self._due():
                    break
        except Exception as e:
            self._error = e
        finally:
            self._recording = None
            self._arm()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e


OnFailure = Callable[["Pipeline"], Awaitable[None]]


class Pipeline:
    def __init__(
        self,
        *,
        routing_key: str,
        domain: str,
        source_ip: str,
        policy: Policy,
        spool: Spool,
        sender: Sender,
        retry: Retry | None = None,
        idle_timeout: float = 0.0,
        restart_delay: float = 1.0,
        on_failure: OnFailure | None = None,
        bouncer: Bouncer | None = None,
        record_group: int = RECORD_GROUP,
        record_delay: float = RECORD_DELAY,
    ) -> None:
        self.routing_key = routing_key
        self.domain = domain
        self.source_ip = source_ip
        self.policy = policy
        self.spool = spool
        self.sender = sender
        self.retry = retry or Retry()
        self.idle_timeout = idle_timeout
        self.restart_delay = restart_delay
        self.on_failure = on_failure
        self.bouncer = bouncer
        self.status: PipelineStatus = STARTING
        self.started_at = time.time()
        self.last_error = ""
        self.restarts = 0
        self._limiter = RateLimiter(policy.allowed_messages, policy.message_interval)
        self._recorder = Recorder(spool, record_group, record_delay)
        self._connections: list[Connection] = []  # open, at most max_connections
        self._busy: list[Connection] = []  # those a lane is sending on
        self._queue: deque[Job] = deque()  # claimed jobs no lane has taken yet
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._crashes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"pipeline {self.routing_key}")

    def wake(self) -> None:
        """New mail is in the spool."""
        self._wake.set()

    def apply_policy(self, policy: Policy) -> None:
        """Follow ``policy`` from now on: messages already claimed are sent, the next claim uses the
        new batching, lanes beyond a lowered ``max_connections`` end after their message, and the
        rate limit keeps counting the sends already made."""
        self.policy = policy
        self._limiter = self._limiter.resized(policy.allowed_messages, policy.message_interval)
        self._slot_freed.set()
        self._wake.set()  # a batch waiting to fill is measured against the new size and timeout

    async def stop(self, grace: float = 5.0) -> None:
        """Finish the message in hand (up to ``grace`` seconds) and record every outcome known;
        undelivered mail stays spooled."""
        self._stopping = True
        self.status = STOPPING
        self._stop_requested.set()
        self._wake.set()
        self._slot_freed.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._record_pending()
        await self._close_connections()
        await self.spool.release(self.routing_key)
        self.status = STOPPED

    async def counts(self) -> Counts:
        return await self.spool.counts(self.routing_key)

    def state_line(self, c: Counts) -> str:
        """e.g. ``running: 3 queued, 0 in flight, 1 deferred, 12 delivered, 0 bounced``."""
        word = pipeline_pb2.PipelineStatus.Name(self.status).removeprefix("PIPELINE_STATUS_").lower()
        counts = (
            f"{c.queued} queued, {c.in_flight} in flight, {c.deferred} deferred,"
            f" {c.delivered} delivered, {c.bounced} bounced"
        )
        if self.status == FAILED:
            return f"{word} ({self.last_error}), restarting: {counts}"
        return f"{word}: {counts}"

    # Supervision

    async def _supervise(self) -> None:
        while not self._stopping:
            self.status = RUNNING
            try:
                await self._run()
                return
            except Exception as e:
                await self._crashed(e)

    async def _crashed(self, e: Exception) -> None:
        self._crashes += 1
        self.restarts += 1
        self.status = FAILED
        cause: BaseException = e
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        self.last_error = f"{type(cause).__name__}: {cause}"
        log.exception("pipeline %s crashed; restarting", self.routing_key)
        await self._record_pending()
        try:
            await self._close_connections()
            await self.spool.release(self.routing_key)
            if self.on_failure is not None:
                await self.on_failure(self)
        except Exception:
            log.exception("pipeline %s: cleaning up after the crash failed", self.routing_key)
        await self._stop_within(min(MAX_RESTART_DELAY, self.restart_delay * 2.0 ** (self._crashes - 1)))

    async def _record_pending(self) -> None:
        """Record the outcomes still pending before in-flight mail is released, so what was sent is
        not sent again. If the spool fails, their mail goes back to the queue with the rest."""
        try:
            await self._recorder.flush()
        except Exception:
            dropped = self._recorder.discard()
            log.exception(
                "pipeline %s: recording outcomes failed; their mail will be sent again (%d more pending)",
                self.routing_key,
                dropped,
            )

    # Work

    async def _run(self) -> None:
        """Claim batches and feed them to lanes that pull from one queue: one lane per connection,
        at most ``max_connections`` at once. A lane runs while the queue holds jobs, so the next
        batch is claimed as soon as a lane is idle and the queue is empty, however long the
        slowest lane of the previous batch still takes."""
        self._queue.clear()
        self._busy.clear()
        async with asyncio.TaskGroup() as lanes:
            while not self._stopping:
                policy = self.policy  # apply_policy may change it between claims
                self._wake.clear()  # set by new mail, a new policy, stop, and a lane going idle
                await self._close_surplus(policy)
                self._start_lanes(lanes, policy)
                if not self._busy:
                    # A batch is done: its last group commits, and counts are then exact.
                    await self._recorder.flush()
                if self._queue or len(self._busy) >= policy.max_connections:
                    await self._wait(None)  # every lane has work: wait for one to go idle
                    continue
                now = time.time()
                due = await self.spool.due(self.routing_key, now)
                if due.count == 0 or due.oldest is None:
                    await self._idle(due.next_at)
                    continue
                fill_until = due.oldest + policy.batch_timeout
                if due.count < policy.batch_size and now < fill_until:
                    await self._wait(fill_until)
                    continue
                # Outcomes so far commit before the next claim, so a crash sends again at most
                # this batch and the sends that were still under way.
                await self._recorder.flush()
                if self._stopping:
                    break
                self._queue.extend(await self.spool.claim(self.routing_key, now, policy.batch_size))

    def _start_lanes(self, lanes: asyncio.TaskGroup, policy: Policy) -> None:
        """Start a lane for each queued job, up to ``max_connections`` lanes."""
        idle = self._idle_connections()
        while self._queue and len(self._busy) < policy.max_connections:
            if idle:
                conn = idle.pop()
            elif len(self._connections) < policy.max_connections:
                conn = self.sender.connection(self.domain, self.source_ip)
                self._connections.append(conn)
            else:
                return
            self._busy.append(conn)
            lanes.create_task(self._lane(conn, self._queue.popleft()))

    async def _close_surplus(self, policy: Policy) -> None:
        """Close idle connections beyond a lowered ``max_connections``; busy ones finish first."""
        idle = self._idle_connections()
        surplus = idle[: max(0, len(self._connections) - policy.max_connections)]
        if surplus:
            self._connections = [c for c in self._connections if not any(c is s for s in surplus)]
            await self._close(surplus)

    async def _idle(self, next_at: float | None) -> None:
        """Wait for new mail, the next retry, or a lane going idle; close idle connections after
        ``idle_timeout``."""
        if self._idle_connections():
            close_at = time.time() + self.idle_timeout
            if next_at is None or close_at < next_at:
                if not await self._wait(close_at):
                    idle = self._idle_connections()
                    self._connections = [c for c in self._connections if not any(c is i for i in idle)]
                    await self._close(idle)
                return
        await self._wait(next_at)

    def _idle_connections(self) -> list[Connection]:
        return [c for c in self._connections if not any(c is b for b in self._busy)]

    async def _wait(self, deadline: float | None) -> bool:
        """Sleep until ``deadline`` (None: forever); True when woken early."""
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _stop_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _lane(self, conn: Connection, job: Job) -> None:
        """Send ``job``, then queued jobs while there are any; a lane beyond a lowered
        ``max_connections`` ends after its message."""
        try:
            while True:
                await self._send(conn, job)
                self._crashes = 0
                if not self._queue or self._stopping or len(self._busy) > self.policy.max_connections:
                    return
                job = self._queue.popleft()
        finally:
            self._busy = [b for b in self._busy if b is not conn]
            self._wake.set()

    async def _send(self, conn: Connection, job: Job) -> None:
        if not await self._take_slot():
            return  # stopping: the job stays in flight until stop() releases it
        try:
            results = await conn.send(job.sender, [d.recipient for d in job.deliveries], job.data)
        finally:
            self._limiter.release()
            self._slot_freed.set()
        now = time.time()
        missing = Result.transient("no result from the sender")
        outcomes = [(d, results.get(d.recipient, missing)) for d in job.deliveries]
        recorded = [self._outcome(d, r, now) for d, r in outcomes]
        bounced = [
            Failure(d.recipient, r, now)
            for (d, r), o in zip(outcomes, recorded, strict=True)
            if o.state is State.BOUNCED
        ]
        if bounced and self.bouncer is not None:
            # The DSN is durable before its bounce joins a group, so a group never records a
            # bounce whose DSN is not spooled (and flushing never waits on the node).
            await self.bouncer.bounced(self.source_ip, job, bounced)
        self._recorder.add(recorded)

    async def _take_slot(self) -> bool:
        """Wait until the rate limit allows one more send; False when the pipeline is stopping."""
        while not self._stopping:
            self._slot_freed.clear()
            wait = self._limiter.take()
            if wait == 0.0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), wait)
        return False

    def _outcome(self, d: Delivery, r: Result, now: float) -> Outcome:
        attempts = d.attempts + 1
        if r.status is Status.ACCEPTED:
            return Outcome(d.id, State.DELIVERED, attempts, now, r.code, r.text, now)
        if r.status is Status.PERMANENT:
            return Outcome(d.id, State.BOUNCED, attempts, now, r.code, r.text, now)
        if attempts > self.policy.max_retries:
            text = f"{r.text} (gave up after {attempts} attempts)"
            return Outcome(d.id, State.BOUNCED, attempts, now, r.code, text, now)
        return Outcome(d.id, State.DEFERRED, attempts, now + self.retry.delay(attempts), r.code, r.text, now)

    async def _close_connections(self) -> None:
        conns, self._connections = self._connections, []
        await self._close(conns)

    async def _close(self, conns: list[Connection]) -> None:
        for conn in conns:
            try:
                await conn.close()
            except Exception:
                log.exception("pipeline %s: closing a connection failed", self.routing_key)
