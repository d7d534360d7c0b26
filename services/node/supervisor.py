"""The node's pipelines: started, stopped, resumed and fed mail, over one spool.

The servicer validates requests and calls these methods; ``services.node.main.start_node``
builds a ``PipelineSupervisor`` whole, with its hooks (the bouncer, the registrar), and wires it
to a gRPC server, the registry, its policy feed and its idle reaper. The supervisor tells its
hooks when a pipeline starts, stops or takes a new policy, and hands them to each pipeline,
which tells them when it crashed or bounced mail. Nothing it runs holds it.

Mail spooled by a hook (a DSN) arrives as its routing key on ``spooled``, a queue the supervisor
drains: it wakes that key's pipeline, or starts it. ``resume`` starts every routing key with
unfinished mail, so a DSN spooled just before a crash is sent after it too.

One pipeline per routing key in the cluster: a pipeline starts only once this node holds the
key's placement record (``ownership``, ``epoxi.registry.ownership``), and a key another node
holds raises ``OwnedElsewhere`` naming it. Stopping a pipeline (``stop_pipeline``) refuses new
mail for the key, lets deliveries under way finish, frees the record and hands the queued mail
to the key's next owner (``peers``, ``services.node.handoff``); with no other node able to send
from the key's IP, the mail stays and the pipeline starts again here. ``reconcile`` (every
registry round, and at startup as ``resume``) starts or hands off every key with unfinished
mail and no pipeline, and gives up the keys whose record another node took while this node's
registry session was lost.

Keys that share a shaping budget run on one node: before it claims a key, the node looks up the
key's MX site (``Shaper.site_of``) and claims (site, source IP)'s record as well
(``Ownership.claim_site``); another node holding it is named in the refusal, which routers and
monitors follow. The record is released when the last key of that (site, IP) leaves the node, and
a stop moves the whole group: ``stop_pipeline`` stops every key of the site here and hands them
all to one node.

A pipeline stopped for being idle comes back when mail arrives for it (``pipeline_for_mail``).
Stopping one is safe against a concurrent ``enqueue``: the stop happens only if no enqueue
began since the spool was seen empty, and an enqueue that finds its pipeline gone restarts it.
An enqueue's commit and its wake-up run in a task of their own, so a caller cancelled mid-commit
never leaves committed mail asleep.

Per-key state lives as long as the key's pipeline runs, and a while after: ``forget_idle``
drops what the supervisor knows of a stopped key with no recent mail. The spool still holds the
key's pipeline record, so new mail for it starts it again all the same.

A batch is spooled under the context of the call that brought it (EnqueueBatch's span): each
message keeps that ``traceparent``, and while tracing is on the commit is a ``spool commit``
span. Accepted messages are counted through ``instruments`` (``engine.instruments``), which
each pipeline gets too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from epoxi import envelope, proto_time, raw_message, rendering
from epoxi.envelope import recipients_in
from epoxi.excerpt import shown
from epoxi.observability import tracing
from epoxi.policy import Policy
from epoxi.policy_store import PolicyTable
from epoxi.registry.ownership import ClaimError, LocalOwnership, Owner, Ownership
from epoxi.registry.services import pipeline_service_id
from epoxi.routing import routing_key, split_routing_key
from epoxi.tasks import cancel_and_wait
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2
from services.node.engine.hooks import HookChain, PipelineHooks
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.pipeline import FAILED, RUNNING, Pipeline
from services.node.engine.retry import Retry
from services.node.engine.shaping import Shaper
from services.node.engine.smtp import Sender
from services.node.engine.spool import (
    AttemptRow,
    Counts,
    Cursor,
    Handed,
    KeyStats,
    MessageRow,
    NewMessage,
    PipelineRecord,
    Spool,
    Spooled,
    State,
)
from services.node.engine.trace_context import outside_spans
from services.node.handoff import CHUNK, HandOffError, NoPeers, OwnedBy, Peers
from services.node.registration import NodeSnapshot, PipelineState

log = logging.getLogger(__name__)

# Owners a hand-off follows (each refusal naming the next) before it gives up for this round.
MAX_HOPS = 3


class OwnedElsewhere(Exception):
    """Another node runs the routing key, or its site's keys (``owner``; None while this node
    hands it over)."""

    def __init__(self, key: str, owner: Owner | None, site: str = "") -> None:
        where = f"node {owner.node} at {owner.address}" if owner else "the node it is being handed to"
        if site:
            _, source_ip = split_routing_key(key)
            message = (
                f"routing key {key!r} shares MX site {site!r} from {source_ip} with the pipelines on "
                f"{where}, and keys of one site and IP run on one node (one shaping budget)"
            )
        else:
            message = f"routing key {key!r} is run by {where}"
        super().__init__(message)
        self.owner = owner


@dataclass
class Stopped:
    """A routing key stopped here: its pipeline (None when none ran), and where its mail went.
    ``moved_with``: the other keys of its (site, source IP) that stopped and moved with it."""

    key: str
    pipeline: Pipeline | None
    handed: HandOff
    moved_with: list[Stopped] = field(default_factory=list)


class Unrenderable(Exception):
    """Emails of a batch that passed validation and still cannot be rendered: ``problems`` names
    each one (``emails[i]``) and what rendering raised."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# Batches up to this size (their emails' protobuf bytes) are rendered on the event loop: about
# 3 ms for 120 emails of 2 KB. Rendering holds the GIL, so a thread gives it no parallelism (the
# loop waits for the GIL as long), only a hand-off each way; a larger batch still goes to one,
# which gives the GIL back to the loop every switch interval.
RENDER_INLINE_BYTES = 256 * 1024


def _rendered(domain: str, emails: Sequence[email_pb2.Email]) -> list[NewMessage]:
    """The spool's messages for ``emails``, to their recipients in ``domain`` (a raw email's
    content as it came, with CRLF line ends: ``epoxi.raw_message``); raises
    ``Unrenderable`` naming every email that rendering failed on."""
    messages, problems = [], []
    for i, e in enumerate(emails):
        if e.HasField("raw"):  # relayed as its author wrote it, never rendered
            data = raw_message.canonical(e.raw.content)
            messages.append(NewMessage(envelope.sender_address(e), recipients_in(e, domain), data))
            continue
        try:
            data = rendering.render(e)
        except Exception as error:  # the renderer's defect, or validation's: the email is refused
            problems.append(f"emails[{i}] cannot be rendered ({type(error).__name__}: {shown(str(error))})")
            continue
        messages.append(NewMessage(envelope.sender_address(e), recipients_in(e, domain), data))
    if problems:
        raise Unrenderable(problems)
    return messages


@dataclass(frozen=True)
class HandOff:
    """Where a routing key's queued mail went: ``moved`` messages to ``to`` (a node ID), and
    ``kept`` still here, for ``reason``."""

    moved: int = 0
    to: str = ""
    kept: int = 0
    reason: str = ""


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
        ownership: Ownership | None = None,
        peers: Peers | None = None,
        instruments: Instruments = NO_INSTRUMENTS,
        shaper: Shaper | None = None,
    ) -> None:
        self.id = id
        self.instruments = instruments
        self.address = address  # where others dial the node
        self.egress_ips = [str(ipaddress.ip_address(ip)) for ip in egress_ips]
        self.ip_pool = ip_pool
        self.spool = spool
        self.sender = sender
        self.hooks = HookChain(hooks)
        # Routing keys that hooks spooled mail for (DSNs); drained by ``_take_spooled``.
        self.spooled: asyncio.Queue[str] = spooled if spooled is not None else asyncio.Queue()
        self.policies = policies or PolicyTable()
        self.shaper = shaper if shaper is not None else Shaper(table=self.policies.shaping, node=id)
        self.retry = retry or Retry()
        self.connection_idle_timeout = connection_idle_timeout
        self.restart_delay = restart_delay
        self.stop_grace = stop_grace
        self.ownership: Ownership = ownership or LocalOwnership(id, address)
        self.peers: Peers = peers or NoPeers()
        self.pipelines: dict[str, Pipeline] = {}
        # Pipelines stopped for being idle: new mail for them starts them again (``forget_idle``
        # drops them; the spool's record serves then).
        self.idle_stopped: dict[str, PipelineRecord] = {}
        # Keys being stopped or handed over, with where their mail goes (once known): new mail
        # for them is refused, naming that node.
        self.leaving: dict[str, Owner | None] = {}
        # The MX site of each routing key running or starting here (``_join_site``).
        self.sites: dict[str, str] = {}
        self._site_lock = asyncio.Lock()
        # Per routing key: when mail last arrived or was seen unfinished (time.monotonic()),
        # how many enqueues began, and how many are under way.
        self.last_active: dict[str, float] = {}
        self._enqueues_begun: Counter[str] = Counter()
        self._enqueuing: Counter[str] = Counter()
        # Commits under way (``enqueue_rendered``), each with its wake-up; awaited by ``close``.
        self._commits: set[asyncio.Task[Spooled]] = set()
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
        ``default``, else the built-in defaults (``epoxi.policy_store``). It starts only once this
        node holds the key (``OwnedElsewhere``, ``ClaimError`` otherwise)."""
        domain = domain.lower()
        source_ip = str(ipaddress.ip_address(source_ip))
        key = routing_key(domain, source_ip)
        site = await self._claim(key)
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
                node=self.id,
                instruments=self.instruments,
                shaper=self.shaper,
                site=site,
            )
            self.pipelines[key] = p
            self.idle_stopped.pop(key, None)
            self.last_active[key] = time.monotonic()
            p.start()
            if self._draining is None and not self._closed:
                self._draining = asyncio.create_task(
                    self._take_spooled(), name=f"node {self.id}: spooled mail", context=outside_spans()
                )
        log.info("pipeline %s started with policy %s", key, policy.name)
        await self.hooks.pipeline_started(p)
        return p, True

    async def _claim(self, key: str) -> str:
        """Hold ``key``'s placement record and its site's; the key's MX site. Raises
        ``OwnedElsewhere`` / ``ClaimError`` when this node may not run it."""
        if self._closed:
            raise ClaimError(f"node {self.id} is shutting down")
        if key in self.leaving:
            raise OwnedElsewhere(key, self.leaving[key])
        if self.ownership.holds(key) and key in self.sites:
            return self.sites[key]
        site = await self._join_site(key)
        try:
            holder = await self.ownership.claim(key)
        except ClaimError:
            await self._leave_site(key)
            raise
        if holder is not None:
            await self._leave_site(key)
            raise OwnedElsewhere(key, holder)
        if key in self.leaving:  # a stop began while the claim was under way
            await self.ownership.release(key)
            await self._leave_site(key)
            raise OwnedElsewhere(key, self.leaving[key])
        return site

    async def _join_site(self, key: str) -> str:
        """Count ``key`` among its (site, source IP)'s keys here, holding that record; its site.
        Raises ``OwnedElsewhere`` naming the node that runs the site's keys."""
        domain, source_ip = split_routing_key(key)
        site = self.sites.get(key) or await self.shaper.site_of(domain)
        async with self._site_lock:  # a join and the last key's leave never interleave
            self.sites[key] = site
            try:
                holder = await self.ownership.claim_site(site, source_ip)
            except ClaimError:
                self.sites.pop(key, None)
                raise
            if holder is not None:
                self.sites.pop(key, None)
        if holder is not None:
            # Say which it is: the key itself runs there, or only keys of its site do.
            try:
                runs_key = await self.ownership.owner(key) == holder
            except ClaimError:
                runs_key = False
            raise OwnedElsewhere(key, holder, "" if runs_key else site)
        return site

    async def _leave_site(self, key: str) -> None:
        """``key`` no longer runs here: the last key of its (site, source IP) releases the record."""
        async with self._site_lock:
            if key in self.pipelines or self.ownership.holds(key):
                return  # another start of the key won meanwhile
            site = self.sites.pop(key, None)
            if site is None:
                return
            _, source_ip = split_routing_key(key)
            if not self._site_keys(site, source_ip):
                await self.ownership.release_site(site, source_ip)

    def _site_keys(self, site: str, source_ip: str) -> list[str]:
        """The keys of (site, source IP) running or starting here, sorted."""
        return sorted(k for k, s in self.sites.items() if s == site and _source_ip(k) == source_ip)

    def site_group(self, key: str) -> list[str]:
        """``key`` and the other running keys here of its (site, source IP)."""
        site = self.sites.get(key)
        if site is None:
            return [key]
        others = [k for k in self._site_keys(site, _source_ip(key)) if k != key and k in self.pipelines]
        return [key, *others]

    def _new_policy(self, key: str) -> Policy:
        return self.policies.for_new_pipeline(key) or Policy(name=key)

    async def stop_pipeline(self, key: str, hand_to: Owner | None = None) -> Stopped:
        """Stop ``key``'s pipeline and hand its queued mail to ``hand_to`` (default: the best
        other node that owns the key's IP). With nowhere to hand it, the mail stays and the
        pipeline starts again. The other keys of its (site, source IP) here stop and go to the
        same node (``Stopped.moved_with``): they share a budget, so they move together."""
        group = self.site_group(key)
        for k in group:
            if k in self.leaving:
                raise OwnedElsewhere(k, self.leaving[k])
        if hand_to is None and len(group) > 1:
            found = await self.peers.candidates(_source_ip(key))
            hand_to = found[0] if found else None
        for k in group:
            self.leaving[k] = hand_to
        try:
            # Mail being committed for the keys is in the spool before the hand-off reads it.
            await asyncio.gather(*(c for k in group for c in self._commits_for(k)), return_exceptions=True)
            async with self._lock:
                stopped = [self.pipelines.pop(k, None) for k in group]
                for k in group:
                    self.idle_stopped.pop(k, None)
                await asyncio.gather(*(p.stop(self.stop_grace) for p in stopped if p is not None))
            for p in stopped:
                if p is not None:
                    log.info("pipeline %s stopped", p.routing_key)
                    await self.hooks.pipeline_stopped(p)
            for k in group:
                await self.ownership.release(k)
                await self._leave_site(k)
            handed = [await self.hand_off(k, hand_to) for k in group]
        finally:
            for k in group:
                self.leaving.pop(k, None)
                self._forget(k)
        results = [Stopped(k, p, h) for k, p, h in zip(group, stopped, handed, strict=True)]
        for r in results:
            if r.handed.kept and not r.handed.to:
                domain, source_ip = split_routing_key(r.key)
                try:
                    await self.start_pipeline(domain, source_ip, r.pipeline.policy if r.pipeline else None)
                except (OwnedElsewhere, ClaimError) as e:
                    log.warning("pipeline %s keeps %d messages for later: %s", r.key, r.handed.kept, e)
        first, *rest = results
        first.moved_with = rest
        return first

    def _commits_for(self, key: str) -> list[asyncio.Task[Spooled]]:
        return [c for c in self._commits if c.get_name().endswith(f" {key}")]

    async def hand_off(self, key: str, to: Owner | None = None) -> HandOff:
        """Give ``key``'s queued and deferred mail (none of it in flight: no pipeline runs it here)
        to ``to``, or to the best other node that owns the key's IP, following refusals that name
        the key's owner; each chunk is deleted here once the receiver has it durably."""
        leaving = key in self.leaving
        try:
            return await self._hand_off(key, to)
        finally:
            if not leaving:  # a stop keeps refusing mail for the key until it is done
                self.leaving.pop(key, None)

    async def _hand_off(self, key: str, to: Owner | None) -> HandOff:
        counts = await self.spool.counts(key)
        if not counts.unfinished:
            return HandOff()
        targets = [to] if to is not None else await self.peers.candidates(_source_ip(key))
        if not targets:
            reason = f"no other passing node sends from {_source_ip(key)}"
            return HandOff(kept=counts.unfinished, reason=reason)
        running = self.pipelines.get(key)
        policy = running.policy if running is not None else None
        if policy is None and (saved := await self.spool.pipeline(key)) is not None:
            policy = saved.policy
        target, moved, hops = targets[0], 0, 0
        self.leaving[key] = target
        while True:
            chunk = await self.spool.take_queued(key, CHUNK)
            if not chunk:
                break
            try:
                await self.peers.take(target, key, chunk, policy)
            except OwnedBy as e:
                hops += 1
                if hops > MAX_HOPS or e.owner == target:
                    return await self._kept(key, target, moved, f"node {target.node} refused: {e}")
                target = self.leaving[key] = e.owner
                continue
            except HandOffError as e:
                return await self._kept(key, target, moved, str(e))
            await self.spool.remove_handed([m.id for m in chunk])
            moved += len(chunk)
        log.info("handed %d messages of %s to node %s", moved, key, target.node)
        return HandOff(moved=moved, to=target.node)

    async def _kept(self, key: str, target: Owner, moved: int, reason: str) -> HandOff:
        log.warning("handing %s to node %s stopped after %d messages: %s", key, target.node, moved, reason)
        kept = (await self.spool.counts(key)).unfinished
        return HandOff(moved=moved, to=target.node if moved else "", kept=kept, reason=reason)

    async def receive(
        self, key: str, messages: Sequence[Handed], policy: Policy | None = None
    ) -> tuple[Pipeline, list[str]]:
        """Take ``messages`` handed over by another node: claim and start ``key``'s pipeline
        (with ``policy``, when it starts now), spool them durably, wake it."""
        p, _ = await self.pipeline_for_mail(key, policy)

        async def write(key: str) -> Spooled:
            if not tracing.enabled():
                return Spooled(await self.spool.receive(key, messages))
            # Each message keeps the traceparent it came with; this span is TakeMessages' part.
            with self._spool_span(key, len(messages), "receive"):
                return Spooled(await self.spool.receive(key, messages))

        spooled = await self._spool_for(p, write)
        return self.pipelines.get(key) or p, spooled.ids

    async def reconcile(self) -> None:
        """Give up the running keys another node took (this node's session was lost meanwhile),
        then start or hand off every key with unfinished mail and no pipeline."""
        for key in await self.ownership.verify(list(self.pipelines)):
            log.warning("routing key %s was taken by another node: handing its mail over", key)
            try:
                owner = await self.ownership.owner(key)
            except ClaimError:
                owner = None
            if owner is not None and owner.node != self.id and key in self.pipelines:
                await self.stop_pipeline(key, owner)
        await self._reclaim_sites()
        await self.resite()
        await self.resume()

    async def resite(self) -> list[str]:
        """Look each running key's MX site up again (the MX cache follows the records' TTLs): a
        key whose site changed takes the new site's budget and record, or, when another node runs
        the new site's keys, goes to that node alone. The keys whose site changed."""
        changed = []
        for key in sorted(self.pipelines):
            p = self.pipelines.get(key)
            old = self.sites.get(key)
            if p is None or old is None or key in self.leaving:
                continue
            new = await self.shaper.looked_up_site(p.domain)
            if new is None or new == old:
                continue  # a failed lookup changes nothing
            try:
                holder = await self._change_site(key, old, new)
            except ClaimError as e:
                log.warning("routing key %s stays with MX site %s for now: %s", key, old, e)
                continue
            changed.append(key)
            if holder is None:
                log.info("routing key %s: its MX site is %s now (was %s)", key, new, old)
                p.resite(new)
            else:
                log.info(
                    "routing key %s: its MX site %s runs on node %s: handing it over", key, new, holder.node
                )
                await self.stop_pipeline(key, holder)
        return changed

    async def _change_site(self, key: str, old: str, new: str) -> Owner | None:
        """Count ``key`` under site ``new``, taking its record (or naming the node that holds
        it), and free ``old``'s when ``key`` was its last key here."""
        source_ip = _source_ip(key)
        async with self._site_lock:
            holder = await self.ownership.claim_site(new, source_ip)
            self.sites[key] = new
            if not self._site_keys(old, source_ip):
                await self.ownership.release_site(old, source_ip)
        return holder

    async def _reclaim_sites(self) -> None:
        """Hold the site records of the running keys again (a lost session freed them); a site
        another node took meanwhile takes this node's keys of it."""
        groups = {(s, _source_ip(k)): k for k, s in sorted(self.sites.items()) if k in self.pipelines}
        for (site, source_ip), key in groups.items():
            try:
                holder = await self.ownership.claim_site(site, source_ip)
            except ClaimError as e:
                log.warning("site %s from %s: %s", site, source_ip, e)
                continue
            if holder is not None and holder.node != self.id and key in self.pipelines:
                log.warning(
                    "site %s from %s was taken by node %s: handing its keys over",
                    site,
                    source_ip,
                    holder.node,
                )
                await self.stop_pipeline(key, holder)

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
            # Counts are as of the last commit: mail being committed is `_enqueuing`. Nothing may
            # have begun since the check either (counts does not wait today; if it ever does).
            if self._enqueuing[key] or self._enqueues_begun[key] != begun:
                return False
            if now - self.last_active.get(key, now) < idle_for:
                return False
            del self.pipelines[key]
            self.idle_stopped[key] = PipelineRecord(key, p.domain, p.source_ip, p.policy)
            await p.stop(self.stop_grace)
        await self.ownership.release(key)
        await self._leave_site(key)
        log.info("pipeline %s stopped: no mail for %gs", key, idle_for)
        await self.hooks.pipeline_stopped(p)
        return True

    async def pipeline_for_mail(self, key: str, policy: Policy | None = None) -> tuple[Pipeline, bool]:
        """The pipeline for ``key``, and whether it started for this mail: the running one, or
        one started again with the policy it had when it stopped for being idle, or as ``resume``
        would from the spool's record, or new. Raises ``ValueError`` for a key this node cannot
        send from, ``OwnedElsewhere`` / ``ClaimError`` when it may not run it. A ``policy`` given
        is the one a pipeline started now runs with."""
        p = self.pipelines.get(key)
        if p is not None and self.ownership.holds(key) and key not in self.leaving:
            return p, False
        domain, source_ip = split_routing_key(key)
        if not self.owns(source_ip):
            owned = ", ".join(self.egress_ips) or "none"
            raise ValueError(f"node {self.id} cannot send from {source_ip}; it owns: {owned}")
        rec = self.idle_stopped.get(key)
        if rec is None:
            saved = await self.spool.pipeline(key)
            if saved is not None:
                rec = replace(saved, policy=self.policies.for_running_pipeline(key, saved.policy))
        if policy is None and rec is not None:
            policy = rec.policy
        p, started = await self.start_pipeline(domain, source_ip, policy)
        if started:
            log.info("pipeline %s started for new mail", key)
        return p, started

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
            if key in self.pipelines or key in self.leaving:
                continue
            if not self.owns(rec.source_ip):
                log.warning("not resuming %s: this node no longer owns %s", key, rec.source_ip)
                continue
            policy = self.policies.for_running_pipeline(key, rec.policy)
            try:
                p, _ = await self.start_pipeline(rec.domain, rec.source_ip, policy)
            except OwnedElsewhere as e:
                await self.hand_off(key, e.owner)
                continue
            except ClaimError as e:
                log.warning("not resuming %s yet: %s", key, e)
                continue
            resumed.append(p)
        return resumed

    async def apply_policies(self, table: PolicyTable) -> list[str]:
        """Adopt ``table`` and give each running pipeline the policy it now follows; the routing
        keys whose policy changed. The new policy is saved, so a restart resumes with it."""
        self.policies = table
        if table.shaping != self.shaper.table:
            self.shaper.apply_table(table.shaping)
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
        return (await self.enqueue_batch(p, emails)).ids

    async def enqueue_batch(
        self, p: Pipeline, emails: Sequence[email_pb2.Email], batch_key: str = ""
    ) -> Spooled:
        """Like ``enqueue``; a ``batch_key`` spooled before spools nothing and answers the IDs
        it had (``Spool.enqueue_batch``). Raises ``Unrenderable``, spooling nothing, when an
        email cannot be rendered."""
        if sum(e.ByteSize() for e in emails) <= RENDER_INLINE_BYTES:
            messages = _rendered(p.domain, emails)
        else:
            messages = await asyncio.to_thread(_rendered, p.domain, emails)
        return await self._spool_for(p, lambda key: self._spool_batch(key, messages, batch_key))

    async def enqueue_rendered(self, p: Pipeline, messages: Sequence[NewMessage]) -> list[str]:
        """Spool rendered ``messages`` for ``p``'s routing key, like ``enqueue``."""
        return (await self._spool_for(p, lambda key: self._spool_batch(key, messages, ""))).ids

    async def _spool_batch(self, key: str, messages: Sequence[NewMessage], batch_key: str) -> Spooled:
        """One spool transaction for a batch, under the current context; counted when new."""
        if not tracing.enabled():
            spooled = await self.spool.enqueue_batch(key, messages, batch_key)
        else:
            traceparent = tracing.traceparent()  # the caller's span: the messages' attempts join it
            with self._spool_span(key, len(messages), "enqueue") as span:
                spooled = await self.spool.enqueue_batch(key, messages, batch_key, traceparent)
                span.set_attribute("epoxi.duplicate", spooled.duplicate)
        if not spooled.duplicate:
            self.instruments.key(key).accepted(len(spooled.ids))
        return spooled

    def _spool_span(self, key: str, messages: int, operation: str) -> AbstractContextManager[trace.Span]:
        """The ``spool commit`` span of one spool transaction (tracing on)."""
        return tracing.span(
            "spool commit",
            attributes={
                "epoxi.routing_key": key,
                "epoxi.node": self.id,
                "epoxi.messages": messages,
                "db.system.name": "sqlite",
                "db.operation.name": operation,
            },
        )

    async def _spool_for(self, p: Pipeline, write: Callable[[str], Awaitable[Spooled]]) -> Spooled:
        """Run ``write`` (a spool transaction for ``p``'s key), then wake the key's pipeline."""
        key = p.routing_key
        while self.pipelines.get(key) is not p or key in self.leaving:
            # It stopped meanwhile: for being idle (start it again), or for a hand-off
            # (``OwnedElsewhere``: the caller sends the mail to the new owner).
            p, _ = await self.start_pipeline(p.domain, p.source_ip, p.policy)
        # No await between the check above and this: stop_if_idle sees the enqueue.
        self._enqueues_begun[key] += 1
        self._enqueuing[key] += 1
        # The commit and the wake-up run as one task of their own: a caller cancelled meanwhile
        # (a client's deadline or cancel) stops waiting for them, not them.
        commit = asyncio.create_task(self._commit(p, write), name=f"node {self.id}: enqueue for {key}")
        self._commits.add(commit)
        commit.add_done_callback(self._committed)
        return await asyncio.shield(commit)

    async def _commit(self, p: Pipeline, write: Callable[[str], Awaitable[Spooled]]) -> Spooled:
        """Write and wake ``p``; ``_spool_for`` counted it as under way."""
        key = p.routing_key
        try:
            ids = await write(key)
        finally:
            self._enqueuing[key] -= 1
            if not self._enqueuing[key]:
                del self._enqueuing[key]
            self.last_active[key] = time.monotonic()
        p.wake()
        return ids

    def _committed(self, commit: asyncio.Task[Spooled]) -> None:
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
        if p is not None and key not in self.leaving:
            p.wake()
            return
        domain, source_ip = split_routing_key(key)
        try:
            await self.start_pipeline(domain, source_ip)
        except OwnedElsewhere as e:
            await self.hand_off(key, e.owner)
        except ClaimError as e:
            log.warning("mail spooled for %s waits for the next reconcile: %s", key, e)

    # Reading

    def pipeline_name(self, key: str) -> str:
        return pipeline_service_id(self.id, key)

    async def pipeline_info(self, p: Pipeline, counts: Counts | None = None) -> pipeline_pb2.PipelineInfo:
        counts = await p.counts() if counts is None else counts
        started = proto_time.timestamp(p.started_at)
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
            site=p.site,
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


def _source_ip(key: str) -> str:
    return split_routing_key(key)[1]
