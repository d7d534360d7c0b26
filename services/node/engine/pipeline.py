"""A delivery pipeline: one supervised asyncio task per routing key (recipient domain and source IP).

The task claims due messages from the spool in batches of at most ``batch_size`` and sends them
over up to ``max_connections`` reused SMTP connections, never more than ``allowed_messages`` in
any ``message_interval``. Each connection is a lane pulling from one queue of claimed messages;
a claim is considered only when a lane is idle with nothing claimed left to take, so a slow
server holds up its own lane, not the next batch. When to claim:

- *Idle* (no lane sending, nothing claimed): claim what is due at once, up to ``batch_size``. One
  message on an idle pipeline leaves without waiting for company.
- *Busy* (some lane still sending): claim once ``batch_size`` messages are due, or once the
  oldest due one has waited ``batch_timeout``; until then wait, and when the last busy lane goes
  idle the pipeline is idle again and claims what came meanwhile.

So ``batch_size`` and ``batch_timeout`` bound batching only while lanes are busy, as Broadway's
batchers do under demand: at a low rate each message goes at once (a claim and an outcome commit
each), and as the rate rises the mail that arrives during one batch's sends makes the next
batch, so claims and outcome commits stay shared by up to ``batch_size`` messages at full load.
Each message's outcome is: 2xx delivered; 5xx bounced with the reply; 4xx or a transport failure deferred
(``Retry``), and bounced once ``max_retries`` retries are spent.

Outcomes are recorded in groups (``Recorder``), so many share one transaction and its fsync: a
group is committed when ``record_group`` outcomes are pending, when the oldest has waited
``record_delay`` seconds, before each claim, when every lane is idle, and before in-flight mail is
released (on stop, and after a crash). Until its group commits, a sent message stays ``inflight``
in the spool, which the spool requeues if the node dies: so a crash sends again at most the
pipeline's last claimed batch and the sends still under way when it was claimed, never loses a
message. Bounces go to the hooks (``PipelineHooks.bounced``: the bouncer spools a DSN) before
their outcomes even join a group, so a crash between the two repeats the DSN rather than losing
it. ``apply_policy`` changes the knobs while running: the next claim uses them (and lanes beyond
a lowered ``max_connections`` end after their message). If the task crashes it is restarted
after a growing delay (``epoxi.backoff``), and the failure is reported meanwhile
(``PipelineHooks.pipeline_failed``, ``status``, ``state_line``).

With a ``shaper`` (``engine.shaping``) the pipeline looks up its MX site when it starts and
shares that (site, source IP)'s budget with the node's other pipelines sending there: a
connection opens only within the site's cap, a send needs a slot of the site's rate as well as
its own, and each transaction's reply steers the budget. While the site is suspended the
pipeline claims nothing and defers what it had claimed to the suspension's end (attempts
unspent); while it blocks the source IP, claimed mail bounces unsent with the blocking reply.

Each attempt's outcomes are counted through ``instruments`` (``engine.instruments``), and
while tracing is on each attempt is a CLIENT span ``smtp send`` whose parent is the context the
message was spooled under, so an attempt hours later joins the trace that submitted the mail;
a bounce is a ``bounce`` span inside it, under which the DSN is spooled. A deferral or bounce is
logged at INFO with the routing key and message ID (a delivery is not: that is the hot path).
Whether tracing is on is asked once per attempt; off, no span or attribute is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from epoxi.backoff import Backoff
from epoxi.observability import tracing
from epoxi.policy import Policy
from epoxi.shaping import THROTTLE, action_name
from epoxi.v1 import pipeline_pb2
from services.node.engine.hooks import PipelineHooks
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.ratelimit import RateLimiter
from services.node.engine.recorder import RECORD_DELAY, RECORD_GROUP, Recorder
from services.node.engine.reply import Reply
from services.node.engine.retry import Retry
from services.node.engine.shaping import Adjustment, Budget, Shaper, decisive
from services.node.engine.smtp import Connection, Follow, Message, Sender
from services.node.engine.spool import Counts, Delivery, Job, Outcome, Spool, State
from services.node.engine.trace_context import outside_spans

log = logging.getLogger(__name__)

PipelineStatus: TypeAlias = pipeline_pb2.PipelineStatus.ValueType
STARTING = pipeline_pb2.PIPELINE_STATUS_STARTING
RUNNING = pipeline_pb2.PIPELINE_STATUS_RUNNING
STOPPING = pipeline_pb2.PIPELINE_STATUS_STOPPING
STOPPED = pipeline_pb2.PIPELINE_STATUS_STOPPED
FAILED = pipeline_pb2.PIPELINE_STATUS_FAILED

MAX_RESTART_DELAY = 30.0


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
        hooks: PipelineHooks | None = None,
        record_group: int = RECORD_GROUP,
        record_delay: float = RECORD_DELAY,
        node: str = "",
        instruments: Instruments = NO_INSTRUMENTS,
        shaper: Shaper | None = None,
        site: str = "",
    ) -> None:
        self.routing_key = routing_key
        self.node = node  # the node's ID, for spans
        self.domain = domain
        self.source_ip = source_ip
        self.policy = policy
        self.spool = spool
        self.sender = sender
        self.retry = retry or Retry()
        self.idle_timeout = idle_timeout
        self.restart_delay = restart_delay
        self.hooks = hooks or PipelineHooks()
        self.status: PipelineStatus = STARTING
        self.started_at = time.time()
        self.last_error = ""
        self.restarts = 0
        self._limiter = RateLimiter(policy.allowed_messages, policy.message_interval)
        self._recorder = Recorder(spool, record_group, record_delay)
        self._measures = instruments.key(routing_key)
        self._connections: list[Connection] = []  # open, at most max_connections
        self._busy: list[Connection] = []  # those a lane is sending on
        self._queue: deque[Job] = deque()  # claimed jobs no lane has taken yet
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._crashes = 0
        self._task: asyncio.Task[None] | None = None
        self.shaper = shaper
        self.site = site  # the MX site: given (the supervisor placed the key by it), or looked up
        self._budget: Budget | None = None
        self._next_site: str | None = None  # ``resite``: taken once the sends under way end

    def resite(self, site: str) -> None:
        """Send to ``site`` from now on (the domain's MX changed): once the sends under way end,
        the connections to the old hosts close and the new site's budget applies."""
        if site != (self._next_site or self.site):
            self._next_site = site
            self.wake()

    async def _take_site(self, site: str) -> None:
        self._next_site = None
        await self._close_connections()
        if self.shaper is not None and self._budget is not None:
            self.shaper.leave(self._budget, self.routing_key)
            self._budget = self.shaper.join(site, self.source_ip, self.routing_key, self.wake)
        log.info("pipeline %s sends to MX site %s now (was %s)", self.routing_key, site, self.site)
        self.site = site

    @property
    def budget(self) -> Budget | None:
        """The (site, source IP) budget this pipeline shares, once it has looked its site up."""
        return self._budget

    def start(self) -> None:
        if self._task is None:
            # Running from here on: a snapshot taken before the task's first step (another
            # pipeline's registry round) must not show it still starting.
            self.status = RUNNING
            self._task = asyncio.create_task(
                self._supervise(), name=f"pipeline {self.routing_key}", context=outside_spans()
            )

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
        if self.shaper is not None and self._budget is not None:
            self.shaper.leave(self._budget, self.routing_key)
            self._budget = None
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
        a = self._budget.adjustment if self._budget is not None else None
        if a is not None:
            until = time.strftime("%H:%M:%SZ", time.gmtime(a.ends))
            shaped = f"x{a.factor:g}" if a.rule.action == THROTTLE else action_name(a.rule.action)
            return f"{word}: {counts}; {self.site} {shaped} by rule {a.rule.name} until {until}"
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
            await self.hooks.pipeline_failed(self)
        except Exception:
            log.exception("pipeline %s: cleaning up after the crash failed", self.routing_key)
        await self._stop_within(Backoff(self.restart_delay, MAX_RESTART_DELAY).delay(self._crashes))

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
        at most ``max_connections`` at once. A lane runs while the queue holds jobs, so a claim is
        considered as soon as a lane is idle and the queue is empty, however long the slowest lane
        of the previous batch still takes: at once when no lane is sending, else once a full batch
        is due or the oldest due message has waited ``batch_timeout`` (see the module's docstring)."""
        self._queue.clear()
        self._busy.clear()
        if self.shaper is not None and self._budget is None:
            self.site = self.site or await self.shaper.site_of(self.domain)
            self._budget = self.shaper.join(self.site, self.source_ip, self.routing_key, self.wake)
        async with asyncio.TaskGroup() as lanes:
            while not self._stopping:
                policy = self.policy  # apply_policy may change it between claims
                self._wake.clear()  # set by new mail, a new policy, stop, and a lane going idle
                if self._next_site is not None:
                    if self._busy:
                        await self._wait(None)  # a new site waits for the sends under way
                        continue
                    await self._take_site(self._next_site)
                await self._close_surplus(policy)
                self._start_lanes(lanes, policy)
                if not self._busy:
                    # A batch is done: its last group commits, and counts are then exact.
                    await self._recorder.flush()
                if self._queue or len(self._busy) >= policy.max_connections:
                    await self._wait(None)  # every lane has work: wait for one to go idle
                    continue
                now = time.time()
                held = self._budget.holding(now) if self._budget is not None else None
                if held is not None and held.suspends(now):
                    await self._wait(held.suspended_until)  # the site said wait: claim nothing
                    continue
                # While the site blocks the IP, all of the key's mail bounces, deferred mail too.
                blocked = held is not None and held.blocks(now)
                due_by = math.inf if blocked else now
                due = await self.spool.due(self.routing_key, due_by, policy.batch_size)
                if due.count == 0 or due.oldest is None:
                    await self._idle(due.next_at)
                    continue
                fill_until = due.oldest + policy.batch_timeout
                if not blocked and self._busy and due.count < policy.batch_size and now < fill_until:
                    # Lanes are sending: let the batch fill. The last lane going idle wakes us.
                    await self._wait(fill_until)
                    continue
                # Outcomes so far commit before the next claim, so a crash sends again at most
                # this batch and the sends that were still under way.
                await self._recorder.flush()
                if self._stopping:
                    break
                self._queue.extend(await self.spool.claim(self.routing_key, now, policy.batch_size, due_by))

    def _start_lanes(self, lanes: asyncio.TaskGroup, policy: Policy) -> None:
        """Start a lane for each queued job, up to ``max_connections`` lanes."""
        idle = self._idle_connections()
        while self._queue and len(self._busy) < policy.max_connections:
            if idle:
                conn = idle.pop()
            elif len(self._connections) < policy.max_connections:
                if self._budget is not None and not self._budget.try_open(self.wake):
                    return  # the site's connections are all taken: woken when one closes
                conn = self.sender.connection(self.domain, self.source_ip)
                self._connections.append(conn)
            else:
                return
            self._busy.append(conn)
            lanes.create_task(self._lane(conn, self._queue.popleft()))

    async def _close_surplus(self, policy: Policy) -> None:
        """Close idle connections beyond a lowered ``max_connections``; busy ones finish first."""
        idle = self._idle_connections()
        over = len(self._connections) - policy.max_connections
        b = self._budget
        if b is not None and (b.adjustment is not None or b.site.max_connections or b.wanted()):
            # Beyond a throttled site's limit; or idle while another pipeline of the site waits.
            over = max(over, b.surplus(), len(idle) if b.wanted() and not self._queue else 0)
        surplus = idle[: max(0, over)]
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
        return await _set_within(self._wake, timeout)

    async def _stop_within(self, seconds: float) -> bool:
        return await _set_within(self._stop_requested, seconds)

    async def _lane(self, conn: Connection, job: Job) -> None:
        """Send ``job``, then queued jobs while there are any; a lane beyond a lowered
        ``max_connections`` ends after its message. The lane's next job is taken as a message's
        content goes out, where the connection can send its envelope with it (``_follow_up``)."""
        ahead: list[Job] = []

        def follow() -> Message | None:
            nxt = self._follow_up()
            if nxt is None:
                return None
            ahead.append(nxt)
            return Message(nxt.sender, [d.recipient for d in nxt.deliveries], nxt.data)

        announced = False
        try:
            while True:
                await self._send(conn, job, follow, announced)
                self._crashes = 0
                if ahead:
                    job, announced = ahead.pop(), True
                    continue
                announced = False
                if not self._goes_on():
                    return
                job = self._queue.popleft()
        finally:
            if ahead:  # taken but never sent (the lane failed): its slot is free again
                self._slot_done()
            self._busy = [b for b in self._busy if b is not conn]
            self._wake.set()

    def _goes_on(self) -> bool:
        """Whether a lane that has sent a message goes on to a queued one."""
        if not self._queue or self._stopping or len(self._busy) > self.policy.max_connections:
            return False
        return self._budget is None or not self._budget.surplus()

    def _follow_up(self) -> Job | None:
        """The lane's next job, with its send slot, when the lane would go on to one anyway and
        the slot is free at once."""
        if not self._goes_on():
            return None
        budget = self._budget
        if budget is not None and budget.holding(time.time()) is not None:
            return None
        if self._limiter.take() != 0.0:
            return None
        if budget is not None and budget.take(self._slot_freed) != 0.0:
            self._limiter.give_back()
            return None
        return self._queue.popleft()

    async def _send(self, conn: Connection, job: Job, follow: Follow, announced: bool = False) -> None:
        """Send ``job`` on ``conn``; ``announced``: its envelope went with the previous message's
        content and its slot was taken then."""
        budget = self._budget
        if budget is not None and budget.adjustment is not None:
            held = budget.holding(time.time())
            if held is not None:
                if announced:
                    self._slot_done()
                    await conn.close()  # its DATA is open: closing is what aborts it
                await self._withhold(job, held)
                return
        if not announced and not await self._take_slot():
            return  # stopping: the job stays in flight until stop() releases it
        if not tracing.enabled():
            await self._attempt(conn, job, follow, None)
            return
        with tracing.child_of(
            job.traceparent,
            "smtp send",
            SpanKind.CLIENT,
            # The node is the resource's service.instance.id; the connection adds its addresses.
            lambda: {
                "epoxi.routing_key": self.routing_key,
                "epoxi.message_id": job.message_id,
                "epoxi.attempt": _attempt_number(job),
                "epoxi.recipients": len(job.deliveries),
            },
        ) as span:
            await self._attempt(conn, job, follow, span)

    async def _attempt(self, conn: Connection, job: Job, follow: Follow, span: trace.Span | None) -> None:
        """One SMTP transaction for ``job`` (its rate-limit slot taken), its outcomes counted,
        bounces told to the hooks, and the outcomes added to the next group."""
        try:
            results = await conn.send(job.sender, [d.recipient for d in job.deliveries], job.data, follow)
        finally:
            self._slot_done()
        now = time.time()
        missing = Reply.local("no result from the sender")
        outcomes = [self._outcome(d, results.get(d.recipient, missing), now) for d in job.deliveries]
        self._measures.attempted(job, outcomes, now)
        failed = [o for o in outcomes if o.state is not State.DELIVERED]
        if span is not None:
            _describe(span, failed[0] if failed else outcomes[0])
        budget = self._budget
        # A clean transaction tells a budget something only while a rule is in force (recovery).
        if budget is not None and self.shaper is not None and (failed or budget.adjustment is not None):
            budget.observe(decisive(results), self.shaper.rules, now)
        if failed:
            self._log_failures(job, failed)
        bounced = [o for o in failed if o.state is State.BOUNCED]
        if bounced:
            # A DSN is durable before its bounce joins a group, so a group never records a
            # bounce whose DSN is not spooled (and flushing never waits on the hooks).
            if span is None:
                await self.hooks.bounced(self, job, bounced)
            else:
                with tracing.span(
                    "bounce",
                    attributes={
                        "epoxi.routing_key": self.routing_key,
                        "epoxi.node": self.node,
                        "epoxi.message_id": job.message_id,
                        "epoxi.recipients": len(bounced),
                    },
                ):
                    await self.hooks.bounced(self, job, bounced)
        self._recorder.add(outcomes)

    def _log_failures(self, job: Job, failed: Sequence[Outcome]) -> None:
        recipients = {d.id: d.recipient for d in job.deliveries}
        fields = {"routing_key": self.routing_key, "message_id": job.message_id}
        for o in failed:
            reply = f"{o.reply.code} {o.text}" if o.reply.code else o.text
            if o.state is State.BOUNCED:
                log.info(
                    "message %s to %s bounced after %d attempts: %s",
                    job.message_id,
                    recipients.get(o.delivery_id, "?"),
                    o.attempts,
                    reply,
                    extra=fields,
                )
            else:
                log.info(
                    "message %s to %s deferred (attempt %d, next in %.0fs): %s",
                    job.message_id,
                    recipients.get(o.delivery_id, "?"),
                    o.attempts,
                    max(0.0, o.next_attempt_at - (o.attempted_at or o.next_attempt_at)),
                    reply,
                    extra=fields,
                )

    def _slot_done(self) -> None:
        self._limiter.release()
        if self._budget is not None:
            self._budget.release()
        self._slot_freed.set()

    async def _take_slot(self) -> bool:
        """Wait until the rate limit, and the site's, allow one more send; False when the
        pipeline is stopping."""
        while not self._stopping:
            self._slot_freed.clear()
            wait = self._limiter.take()
            if wait == 0.0:
                if self._budget is None:
                    return True
                wait = self._budget.take(self._slot_freed)  # it sets _slot_freed when a slot frees
                if wait == 0.0:
                    return True
                self._limiter.give_back()
            await _set_within(self._slot_freed, wait)
        return False

    async def _withhold(self, job: Job, held: Adjustment) -> None:
        """Not sent while the site is held: deferred to the suspension's end, attempts unspent;
        bounced with the blocking reply while the site blocks the source IP."""
        now = time.time()
        rule = held.rule.name
        if held.blocks(now) and held.blocked_by is not None:
            r = held.blocked_by
            note = f"not sent: {self.site} blocks {self.source_ip} (rule {rule})"
            reply = Reply(r.code, r.enhanced, f"{r.text} ({note})" if r.text else note, r.host)
            outcomes = [Outcome(d.id, State.BOUNCED, d.attempts, now, reply, now) for d in job.deliveries]
            self._log_failures(job, outcomes)
            await self.hooks.bounced(self, job, outcomes)
        else:
            until = held.suspended_until
            said = " ".join(filter(None, (str(held.reply.code), held.reply.line)))
            reply = Reply.local(
                f"not sent: {self.site} suspended for {until - now:.0f}s by rule {rule} after {said!r}",
                "4.7.0",
            )
            outcomes = [Outcome(d.id, State.DEFERRED, d.attempts, until, reply, now) for d in job.deliveries]
        self._recorder.add(outcomes)

    def _outcome(self, d: Delivery, r: Reply, now: float) -> Outcome:
        """Delivered on a 2xx; bounced on a 5xx, or a temporary failure past ``max_retries``
        (``Outcome.text`` says so); else deferred for a retry."""
        attempts = d.attempts + 1
        if r.accepted:
            return Outcome(d.id, State.DELIVERED, attempts, now, r, now)
        if r.permanent or attempts > self.policy.max_retries:
            return Outcome(d.id, State.BOUNCED, attempts, now, r, now)
        return Outcome(d.id, State.DEFERRED, attempts, now + self.retry.delay(attempts), r, now)

    async def _close_connections(self) -> None:
        conns, self._connections = self._connections, []
        await self._close(conns)

    async def _close(self, conns: list[Connection]) -> None:
        if self._budget is not None:
            self._budget.closed(len(conns))  # at once, so other pipelines see the room now
        for conn in conns:
            try:
                await conn.close()
            except Exception:
                log.exception("pipeline %s: closing a connection failed", self.routing_key)


async def _set_within(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait at most ``seconds`` (None: forever) for ``event``; whether it was set. A timeout
    around the wait, not ``wait_for``, which runs the wait as a task of its own."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _attempt_number(job: Job) -> int:
    """The number of the attempt about to be made: its most tried recipient's next."""
    deliveries = job.deliveries
    if len(deliveries) == 1:
        return deliveries[0].attempts + 1
    return max(d.attempts for d in deliveries) + 1


def _describe(span: trace.Span, decisive: Outcome) -> None:
    """The attempt's result on its span: the reply that decided it (the first recipient's that
    was not delivered, else the first's), and an error status unless every recipient was."""
    if not span.is_recording():  # an unsampled trace: nothing to describe
        return
    reply = decisive.reply
    described: dict[str, str | int] = {"epoxi.outcome": decisive.state.value}
    if reply.code:
        described["epoxi.smtp.reply_code"] = reply.code
    if reply.enhanced:
        described["epoxi.smtp.enhanced_code"] = reply.enhanced
    span.set_attributes(described)
    if decisive.state is not State.DELIVERED:
        span.set_status(
            Status(StatusCode.ERROR, f"{decisive.state.value}: {reply.code or ''} {reply.line}".strip())
        )
