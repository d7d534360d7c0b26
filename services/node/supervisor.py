"""The node's pipelines: started, stopped, resumed and fed mail, over one spool.

The servicer validates requests and calls these methods; ``services.node.main.start_node``
builds a ``PipelineSupervisor`` whole, with its hooks (the bouncer, the registrar), and wires it
to a gRPC server, the registry, its policy feed and its idle reaper. The supervisor tells its
hooks when a pipeline starts, stops or takes a new policy, and hands them to each pipeline,
which tells them when it crashed or bounced mail. Nothing it runs holds it.

Mail spooled by a hook (a DSN) arrives as its routing key on ``spooled``, a queue the supervisor
drains: it wakes that key's pipeline, or starts it. ``resume`` starts every routing key with
unfinished mail, so a DSN spooled just before a crash is sent after it too.

A pipeline stopped for being idle comes back when mail arrives for it (``pipeline_for_mail``).
Stopping one is safe against a concurrent ``enqueue``: the stop happens only if no enqueue
began since the spool was seen empty, and an enqueue that finds its pipeline gone restarts it.
An enqueue's commit and its wake-up run in a task of their own, so a caller cancelled mid-commit
never leaves committed mail asleep.

Per-key state lives as long as the key's pipeline runs, and a while after: ``forget_idle``
drops what the supervisor knows of a stopped key with no recent mail. The spool still holds the
key's pipeline record, so new mail for it starts it again all the same; only a key stopped on
request (``stop_pipeline``) waits for an explicit start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from google.protobuf import timestamp_pb2

from epoxi import envelope, rendering
from epoxi.envelope import recipients_in
from epoxi.policy import Policy
from epoxi.policy_store import PolicyTable
from epoxi.registry.services import pipeline_service_id
from epoxi.routing import routing_key, split_routing_key
from epoxi.tasks import cancel_and_wait
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2
from services.node.engine.hooks import HookChain, PipelineHooks
from services.node.engine.pipeline import FAILED, RUNNING, Pipeline
from services.node.engine.retry import Retry
from services.node.engine.smtp import Sender
from services.node.engine.spool import (
    AttemptRow,
    Counts,
    Cursor,
    KeyStats,
    MessageRow,
    NewMessage,
    PipelineRecord,
    Spool,
    State,
)
from services.node.registration import NodeSnapshot, PipelineState

log = logging.getLogger(__name__)


class PipelineSupervisor:
    def __init__(
        self,
        *,
        id: str,
        address: str,
        egress_ips: Sequence[str],
        ip_pool: str,
        spool: Spool,
        sender: Sender,
        hooks: Sequence[PipelineHooks] = (),
        spooled: asyncio.Queue[str] | None = None,
        policies: PolicyTable | None = None,
        retry: Retry | None = None,
        connection_idle_timeout: float = 0.0,
        restart_delay: float = 1.0,
        stop_grace: float = 5.0,
    ) -> None:
        self.id = id
        self.address = address  # where others dial the node
        self.egress_ips = [str(ipaddress.ip_address(ip)) for ip in egress_ips]
        self.ip_pool = ip_pool
        self.spool = spool
        self.sender = sender
        self.hooks = HookChain(hooks)
        # Routing keys that hooks spooled mail for (DSNs); drained by ``_take_spooled``.
        self.spooled: asyncio.Queue[str] = spooled if spooled is not None else asyncio.Queue()
        self.policies = policies or PolicyTable()
        self.retry = retry or Retry()
        self.connection_idle_timeout = connection_idle_timeout
        self.restart_delay = restart_delay
        self.stop_grace = stop_grace
        self.pipelines: dict[str, Pipeline] = {}
        # Pipelines stopped for being idle: new mail for them starts them again (``forget_idle``
        # drops them; the spool's record serves then).
        self.idle_stopped: dict[str, PipelineRecord] = {}
        # Pipelines stopped on request, until started again: new mail does not start them.
        self.stopped: set[str] = set()
        # Per routing key: when mail last arrived or was seen unfinished (time.monotonic()),
        # how many enqueues began, and how many are under way.
        self.last_active: dict[str, float] = {}
        self._enqueues_begun: Counter[str] = Counter()
        self._enqueuing: Counter[str] = Counter()
        # Commits under way (``enqueue_rendered``), each with its wake-up; awaited by ``close``.
        self._commits: set[asyncio.Task[list[str]]] = set()
        self._lock = asyncio.Lock()
        self._draining: asyncio.Task[None] | None = None
        self._closed = False

    def owns(self, ip: str) -> bool:
        try:
            return str(ipaddress.ip_address(ip)) in self.egress_ips
        except ValueError:
            return False

    def pipeline(self, key: str) -> Pipeline | None:
        """``key``'s running pipeline, if any."""
        return self.pipelines.get(key)

    def stored_policy(self, name: str) -> Policy | None:
        """The valid policy stored as ``name``, if any."""
        return self.policies.named(name)

    def routing_keys(self) -> list[str]:
        """The routing keys of the running pipelines."""
        return list(self.pipelines)

    async def start_pipeline(
        self, domain: str, source_ip: str, policy: Policy | None = None
    ) -> tuple[Pipeline, bool]:
        """The pipeline for (domain, source_ip), started now (True) or already running (False).

        Without ``policy`` it takes the stored policy assigned to its routing key, else the stored
        ``default``, else the built-in defaults (``epoxi.policy_store``)."""
        domain = domain.lower()
        source_ip = str(ipaddress.ip_address(source_ip))
        key = routing_key(domain, source_ip)
        async with self._lock:
            running = self.pipelines.get(key)
            if running is not None:
                return running, False
            policy = policy or self._new_policy(key)
            await self.spool.save_pipeline(key, domain, source_ip, policy)
            p = Pipeline(
                routing_key=key,
                domain=domain,
                source_ip=source_ip,
                policy=policy,
                spool=self.spool,
                sender=self.sender,
                retry=self.retry,
                idle_timeout=self.connection_idle_timeout,
                restart_delay=self.restart_delay,
                hooks=self.hooks,
            )
            self.pipelines[key] = p
            self.idle_stopped.pop(key, None)
            self.stopped.discard(key)
            self.last_active[key] = time.monotonic()
            p.start()
            if self._draining is None and not self._closed:
                self._draining = asyncio.create_task(
                    self._take_spooled(), name=f"node {self.id}: spooled mail"
                )
        log.info("pipeline %s started with policy %s", key, policy.name)
        await self.hooks.pipeline_started(p)
        return p, True

    def _new_policy(self, key: str) -> Policy:
        return self.policies.for_new_pipeline(key) or Policy(name=key)

    async def stop_pipeline(self, key: str) -> Pipeline | None:
        # Under the lock: a new pipeline for the key must not start before this one let go of its mail.
        async with self._lock:
            self.idle_stopped.pop(key, None)
            p = self.pipelines.pop(key, None)
            if p is None:
                return None
            self.stopped.add(key)
            self._forget(key)
            await p.stop(self.stop_grace)
        log.info("pipeline %s stopped", key)
        await self.hooks.pipeline_stopped(p)
        return p

    async def stop_if_idle(self, key: str, idle_for: float) -> bool:
        """Stop ``key``'s pipeline if it has had no unfinished mail and no new mail for ``idle_for``
        seconds; True when it stopped."""
        async with self._lock:
            p = self.pipelines.get(key)
            begun = self._enqueues_begun[key]
            if p is None or self._enqueuing[key]:
                return False
            counts = await self.spool.counts(key)
            now = time.monotonic()
            if counts.unfinished:
                self.last_active[key] = now
                return False
            # Nothing may have arrived while the spool was read: the check and the pop are atomic.
            if self._enqueuing[key] or self._enqueues_begun[key] != begun:
                return False
            if now - self.last_active.get(key, now) < idle_for:
                return False
            del self.pipelines[key]
            self.idle_stopped[key] = PipelineRecord(key, p.domain, p.source_ip, p.policy)
            await p.stop(self.stop_grace)
        log.info("pipeline %s stopped: no mail for %gs", key, idle_for)
        await self.hooks.pipeline_stopped(p)
        return True

    async def pipeline_for_mail(self, key: str) -> Pipeline | None:
        """The running pipeline for ``key``, started again if it stopped for being idle: with the
        policy it had, or, once forgotten (or run before the node restarted), as ``resume`` would
        from the spool's record. None for a key never run, or stopped on request."""
        p = self.pipelines.get(key)
        if p is not None:
            return p
        rec = self.idle_stopped.get(key)
        if rec is None and key not in self.stopped:
            saved = await self.spool.pipeline(key)
            if saved is not None and self.owns(saved.source_ip) and key not in self.stopped:
                rec = replace(saved, policy=self.policies.for_running_pipeline(key, saved.policy))
        if rec is None:
            return self.pipelines.get(key)
        p, started = await self.start_pipeline(rec.domain, rec.source_ip, rec.policy)
        if started:
            log.info("pipeline %s started again for new mail", key)
        return p

    def forget_idle(self, idle_for: float) -> list[str]:
        """Drop the per-key state of routing keys with no running pipeline, no enqueue under way
        and no mail for ``idle_for`` seconds; their keys."""
        now = time.monotonic()
        keys = self.last_active.keys() | self.idle_stopped.keys() | self._enqueues_begun.keys()
        forgotten = [
            key
            for key in keys
            if key not in self.pipelines
            and not self._enqueuing[key]
            and now - self.last_active.get(key, now - idle_for) >= idle_for
        ]
        for key in forgotten:
            self.idle_stopped.pop(key, None)
            self._forget(key)
        return sorted(forgotten)

    def _forget(self, key: str) -> None:
        """Drop ``key``'s activity and enqueue counts, unless an enqueue for it is under way."""
        if self._enqueuing[key]:
            return
        self.last_active.pop(key, None)
        self._enqueues_begun.pop(key, None)

    async def resume(self) -> list[Pipeline]:
        """Start a pipeline for each routing key with unfinished mail in the spool: with the policy
        it was last started with (or the stored policy it follows, when that changed meanwhile),
        or, for mail spooled for a key that never ran (a DSN, just before a crash), as a new one."""
        saved = {rec.routing_key: rec for rec in await self.spool.pipelines_to_resume()}
        resumed = []
        for key in sorted(saved.keys() | await self.spool.unfinished_keys()):
            rec = saved.get(key)
            if rec is None:
                try:
                    domain, source_ip = split_routing_key(key)
                except ValueError as e:
                    log.warning("not resuming %s: %s", key, e)
                    continue
                rec = PipelineRecord(key, domain, source_ip, self._new_policy(key))
            if not self.owns(rec.source_ip):
                log.warning("not resuming %s: this node no longer owns %s", key, rec.source_ip)
                continue
            policy = self.policies.for_running_pipeline(key, rec.policy)
            p, _ = await self.start_pipeline(rec.domain, rec.source_ip, policy)
            resumed.append(p)
        return resumed

    async def apply_policies(self, table: PolicyTable) -> list[str]:
        """Adopt ``table`` and give each running pipeline the policy it now follows; the routing
        keys whose policy changed. The new policy is saved, so a restart resumes with it."""
        self.policies = table
        changed = []
        async with self._lock:
            for key, p in list(self.pipelines.items()):
                policy = table.for_running_pipeline(key, p.policy)
                if policy == p.policy:
                    continue
                await self.spool.save_pipeline(key, p.domain, p.source_ip, policy)
                p.apply_policy(policy)
                changed.append(p)
                log.info("pipeline %s now follows policy %s: %s", key, policy.name, policy)
        await asyncio.gather(*(self.hooks.policy_changed(p) for p in changed))
        return [p.routing_key for p in changed]

    async def enqueue(self, p: Pipeline, emails: Sequence[email_pb2.Email]) -> list[str]:
        """Spool ``emails`` for ``p``'s routing key in one durable transaction; their spool IDs."""

        def render() -> list[NewMessage]:
            return [
                NewMessage(envelope.sender_address(e), recipients_in(e, p.domain), rendering.render(e))
                for e in emails
            ]

        return await self.enqueue_rendered(p, await asyncio.to_thread(render))

    async def enqueue_rendered(self, p: Pipeline, messages: Sequence[NewMessage]) -> list[str]:
        """Spool rendered ``messages`` for ``p``'s routing key, like ``enqueue``."""
        key = p.routing_key
        while self.pipelines.get(key) is not p:
            # It stopped for being idle meanwhile: start it again (an explicit stop also
            # lands here, and the mail is for a pipeline the caller just used).
            p, _ = await self.start_pipeline(p.domain, p.source_ip, p.policy)
        # No await between the check above and this: stop_if_idle sees the enqueue.
        self._enqueues_begun[key] += 1
        self._enqueuing[key] += 1
        # The commit and the wake-up run as one task of their own: a caller cancelled meanwhile
        # (a client's deadline or cancel) stops waiting for them, not them.
        commit = asyncio.create_task(self._commit(p, messages), name=f"node {self.id}: enqueue for {key}")
        self._commits.add(commit)
        commit.add_done_callback(self._committed)
        return await asyncio.shield(commit)

    async def _commit(self, p: Pipeline, messages: Sequence[NewMessage]) -> list[str]:
        """Spool ``messages`` and wake ``p``; ``enqueue_rendered`` counted it as under way."""
        key = p.routing_key
        try:
            ids = await self.spool.enqueue(key, messages)
        finally:
            self._enqueuing[key] -= 1
            if not self._enqueuing[key]:
                del self._enqueuing[key]
            self.last_active[key] = time.monotonic()
        p.wake()
        return ids

    def _committed(self, commit: asyncio.Task[list[str]]) -> None:
        self._commits.discard(commit)
        # Retrieved here too: when the caller was cancelled, nobody else looks.
        if not commit.cancelled() and (error := commit.exception()) is not None:
            log.warning("%s failed: %s", commit.get_name(), error)

    async def _take_spooled(self) -> None:
        """Drain ``spooled`` until closed: each key's mail is in the spool already."""
        while True:
            key = await self.spooled.get()
            try:
                await self._mail_spooled(key)
            except Exception:
                log.exception("starting the pipeline for mail spooled for %s failed", key)

    async def _mail_spooled(self, key: str) -> None:
        # Like an enqueue, before any await: stop_if_idle sees that mail arrived.
        self._enqueues_begun[key] += 1
        self.last_active[key] = time.monotonic()
        p = self.pipelines.get(key)
        if p is not None:
            p.wake()
            return
        domain, source_ip = split_routing_key(key)
        await self.start_pipeline(domain, source_ip)

    # Reading

    def pipeline_name(self, key: str) -> str:
        return pipeline_service_id(self.id, key)

    async def pipeline_info(self, p: Pipeline, counts: Counts | None = None) -> pipeline_pb2.PipelineInfo:
        counts = await p.counts() if counts is None else counts
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(round(p.started_at * 1e9))
        return pipeline_pb2.PipelineInfo(
            name=self.pipeline_name(p.routing_key),
            routing_key=p.routing_key,
            node=self.id,
            address=self.address,
            policy=p.policy.to_proto(),
            started_at=started,
            status=p.status,
            counters=counts.to_proto(),
            domain=p.domain,
            source_ip=p.source_ip,
            healthy=p.status == RUNNING,
        )

    async def node_info(self, counts: dict[str, Counts] | None = None) -> node_pb2.NodeInfo:
        counts = await self.spool.all_counts() if counts is None else counts
        return node_pb2.NodeInfo(
            id=self.id,
            address=self.address,
            egress_ips=self.egress_ips,
            pipeline_count=len(self.pipelines),
            load=sum(c.unfinished for c in counts.values()),
            ip_pool=self.ip_pool,
        )

    async def snapshot(self) -> NodeSnapshot:
        # One spool query for every pipeline's counts, not one each.
        all_counts = await self.spool.all_counts()
        states = []
        for p in list(self.pipelines.values()):
            counts = all_counts.get(p.routing_key) or Counts()
            info = await self.pipeline_info(p, counts)
            states.append(PipelineState(info, p.state_line(counts), p.status == FAILED))
        return NodeSnapshot(await self.node_info(all_counts), states)

    async def queue_stats(self, key: str | None = None) -> dict[str, KeyStats]:
        """Counts and next retry per routing key with mail or a running pipeline (only ``key``'s
        when given)."""
        stats = await self.spool.queue_stats(key)
        for k in self.pipelines:
            if key in (None, k):
                stats.setdefault(k, KeyStats(Counts(), None))
        return stats

    async def list_messages(
        self, key: str | None, state: State | None, after: Cursor | None, limit: int
    ) -> list[MessageRow]:
        """Spooled messages, oldest first (``Spool.list_messages``)."""
        return await self.spool.list_messages(key, state, after, limit)

    async def message(self, message_id: str) -> tuple[MessageRow, list[AttemptRow]] | None:
        """A spooled message with its deliveries and attempt history, or None when unknown."""
        return await self.spool.message(message_id)

    async def close(self) -> None:
        """Stop every pipeline; their mail stays spooled."""
        self._closed = True
        draining, self._draining = self._draining, None
        await cancel_and_wait(draining)
        # Mail being committed is spooled before the pipelines stop (their callers may be gone).
        await asyncio.gather(*self._commits, return_exceptions=True)
        async with self._lock:
            pipelines, self.pipelines = list(self.pipelines.values()), {}
            await asyncio.gather(*(p.stop(self.stop_grace) for p in pipelines))
        for p in pipelines:
            await self.hooks.pipeline_stopped(p)
