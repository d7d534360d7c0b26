"""One shaping budget per (MX site, source IP), shared by every pipeline of the node sending there.

A ``Budget`` holds the site's connection cap and message rate for one source IP, enforced across
its pipelines: a pipeline opens a connection only with the budget's leave (``try_open``) and
sends only with a slot of both its own rate limit and the budget's (``take``). Replies steer it
(``observe``), by the first rule that matches (``epoxi.shaping``):

- *throttle*: the limits are multiplied by the rule's factor at once (multiplicative decrease,
  at most once per ``recovery_interval`` however many lanes hear the same reply), and once the
  rule's ``duration`` has passed with no matching reply they climb back by ``recovery_step``
  each ``recovery_interval`` in which the replies are clean (additive increase), back to the
  site's own. A site with no limits of its own is throttled from what it was getting when the
  first rule fired: the connections open and the send rate of the last ``MEASURE_WINDOW``.
- *suspend*: nothing is sent to the site from the IP until the duration ends; pipelines claim
  nothing meanwhile, and mail they had claimed is deferred to the end with its attempts unspent.
- *bounce*: a permanent block; mail claimed for the site from the IP until the duration ends
  bounces unsent, with the reply that triggered the block.

The ``Shaper`` is the node's set of budgets, the rules and sites in force (``apply_table``, as
the KV store changes), what each domain's site is (from the MX cache), and the operator's view:
``adjustments`` and ``clear``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epoxi import proto_time, shaping
from epoxi.shaping import BOUNCE, SUSPEND, THROTTLE, Rule, ShapingTable, Site
from epoxi.v1 import shaping_pb2
from services.node.engine.mx import Destinations, DnsUnavailable, NoRoute
from services.node.engine.ratelimit import RateLimiter
from services.node.engine.reply import Reply

log = logging.getLogger(__name__)

# How far back a site with no limits of its own is measured when a rule first throttles it.
MEASURE_WINDOW = 10.0
MIN_FACTOR = 1 / 64
RECENT_SENDS = 1024
# No limit: a limiter that never refuses (its window is empty at once).
_UNLIMITED = (10**9, 0.0)


@dataclass
class Adjustment:
    """A rule in force for a budget: the last one that matched, and what it left."""

    rule: Rule
    reply: Reply
    triggered_at: float
    until: float
    # The limits the factor scales: the site's own, or what was measured when the first rule fired.
    base_connections: int
    base_rate: tuple[int, float]
    factor: float = 1.0
    decreased_at: float = -math.inf
    next_step_at: float = math.inf
    step: float = 0.0
    every: float = shaping.DEFAULT_RECOVERY_INTERVAL
    suspended_until: float = 0.0
    blocked_until: float = 0.0
    blocked_by: Reply | None = None

    def suspends(self, now: float) -> bool:
        return now < self.suspended_until

    def blocks(self, now: float) -> bool:
        return self.blocked_by is not None and now < self.blocked_until

    @property
    def ends(self) -> float:
        """When the last of it ends: the throttle's hold, the suspension or the block."""
        return max(self.until, self.suspended_until, self.blocked_until)


@dataclass
class Budget:
    site: Site
    source_ip: str
    clock: Callable[[], float] = time.time
    connections: int = 0
    adjustment: Adjustment | None = None
    # Routing key -> its pipeline's wake-up, called when the limits change or a hold ends.
    keys: dict[str, Callable[[], None]] = field(default_factory=dict)
    _limiter: RateLimiter = field(init=False)
    # When the latest sends started, to measure a site with no limits when a rule first fires.
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SENDS))
    _unlimited: bool = field(init=False, default=True)
    _open_waiters: dict[int, Callable[[], None]] = field(default_factory=dict)
    _slot_waiters: dict[int, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._limiter = RateLimiter(*self.rate(), clock=self.clock)
        self._unlimited = self.rate() == _UNLIMITED

    # The limits in force

    def connection_limit(self) -> int | None:
        a = self.adjustment
        if a is None:
            return self.site.max_connections or None
        return max(1, math.floor(a.base_connections * a.factor))

    def rate(self) -> tuple[int, float]:
        """(allowed, interval) in force now; ``_UNLIMITED`` when none."""
        a = self.adjustment
        if a is None:
            if self.site.allowed_messages:
                return self.site.allowed_messages, self.site.message_interval
            return _UNLIMITED
        allowed, interval = a.base_rate
        scaled = allowed * a.factor
        if scaled >= 1:
            return math.floor(scaled), interval
        return 1, interval / scaled  # fewer than one per interval: stretch the interval

    def resite(self, site: Site) -> None:
        """The site's stored limits changed."""
        self.site = site
        self._changed()

    # Connections and sends, across the budget's pipelines

    def try_open(self, wake: Callable[[], None]) -> bool:
        """Count one more connection, or refuse and call ``wake`` when one closes."""
        limit = self.connection_limit()
        if limit is not None and self.connections >= limit:
            self._open_waiters[id(wake)] = wake
            return False
        self.connections += 1
        return True

    def closed(self, n: int = 1) -> None:
        self.connections = max(0, self.connections - n)
        if n:
            self._wake_openers()

    def surplus(self) -> int:
        """Connections beyond the limit in force (after a throttle)."""
        limit = self.connection_limit()
        return 0 if limit is None else max(0, self.connections - limit)

    def wanted(self) -> bool:
        """Some pipeline waits for a connection."""
        return bool(self._open_waiters)

    def take(self, freed: asyncio.Event) -> float | None:
        """Like ``RateLimiter.take``; on a refusal ``freed`` is set when a slot may be free."""
        if self._unlimited:  # the common case: no limit and no rule in force
            self._recent.append(self.clock())
            return 0.0
        wait = self._limiter.take()
        if wait == 0.0:
            self._recent.append(self.clock())
        else:
            self._slot_waiters[id(freed)] = freed
        return wait

    def release(self) -> None:
        if self._unlimited:
            return
        self._limiter.release()
        if self._slot_waiters:
            self._release_waiters()

    # What replies do

    def holding(self, now: float) -> Adjustment | None:
        """The adjustment while it suspends or blocks sending; None when mail may be sent."""
        a = self.adjustment
        if a is not None and (a.suspends(now) or a.blocks(now)):
            return a
        return None

    def observe(self, reply: Reply | None, rules: list[Rule], now: float) -> Rule | None:
        """One transaction's reply (None: clean, every recipient accepted); the rule it triggered."""
        if reply is not None:
            rule = shaping.match(rules, reply.code, reply.enhanced, reply.text, self.site.name)
            if rule is not None:
                self._apply(rule, reply, now)
                return rule
        if self.adjustment is not None:
            self._recover(now)
        return None

    def _apply(self, rule: Rule, reply: Reply, now: float) -> None:
        a = self.adjustment
        if a is None:
            a = self.adjustment = Adjustment(
                rule,
                reply,
                now,
                now,
                self.site.max_connections or max(1, self.connections),
                self._base_rate(now),
            )
        a.rule, a.reply, a.triggered_at = rule, reply, now
        a.until = max(a.until, now + rule.duration)
        if rule.action == THROTTLE:
            if now - a.decreased_at >= rule.recovery_interval:
                a.factor = max(MIN_FACTOR, a.factor * rule.factor)
                a.decreased_at = now
            a.step, a.every = rule.recovery_step, rule.recovery_interval
            a.next_step_at = a.until
        elif rule.action == SUSPEND:
            a.suspended_until = max(a.suspended_until, now + rule.duration)
        elif rule.action == BOUNCE:
            a.blocked_until = max(a.blocked_until, now + rule.duration)
            a.blocked_by = reply
        self._changed()

    def _recover(self, now: float) -> None:
        a = self.adjustment
        assert a is not None
        if now < a.until:
            return
        if a.factor < 1 and now >= a.next_step_at:
            a.factor = min(1.0, a.factor + a.step) if a.step > 0 else 1.0
            a.next_step_at = now + a.every
            self._changed()
        if a.factor >= 1 and now >= a.suspended_until and now >= a.blocked_until:
            self.clear()

    def expired(self, now: float) -> bool:
        """Nothing left in force: a suspension or block that ended with no traffic since."""
        a = self.adjustment
        return a is not None and a.factor >= 1 and now >= a.until

    def clear(self) -> Adjustment | None:
        a, self.adjustment = self.adjustment, None
        if a is not None:
            self._changed()
        return a

    def _base_rate(self, now: float) -> tuple[int, float]:
        if self.site.allowed_messages:
            return self.site.allowed_messages, self.site.message_interval
        recent = [t for t in self._recent if t >= now - MEASURE_WINDOW]
        if len(recent) < 2:
            return 1, 1.0
        per_second = len(recent) / max(1.0, now - recent[0])
        return (max(1, round(per_second)), 1.0) if per_second >= 1 else (1, 1 / per_second)

    def _changed(self) -> None:
        rate = self.rate()
        self._unlimited = rate == _UNLIMITED
        # Unlimited sends skip the limiter, so it starts afresh: none it counts goes unreleased.
        self._limiter = RateLimiter(*rate, self.clock) if self._unlimited else self._limiter.resized(*rate)
        self._wake_openers()
        self._release_waiters()
        for wake in list(self.keys.values()):
            wake()

    def _release_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, {}
        for event in waiters.values():
            event.set()

    def _wake_openers(self) -> None:
        if self._open_waiters:
            waiters, self._open_waiters = self._open_waiters, {}
            for wake in waiters.values():
                wake()

    def to_proto(self, node: str) -> shaping_pb2.ShapingAdjustment:
        a = self.adjustment
        assert a is not None
        allowed, interval = self.rate()
        p = shaping_pb2.ShapingAdjustment(
            site=self.site.name,
            source_ip=self.source_ip,
            node=node,
            rule=a.rule.name,
            action=a.rule.action,  # type: ignore[arg-type]
            reply=" ".join(filter(None, (str(a.reply.code), a.reply.line))),
            triggered_at=proto_time.timestamp(a.triggered_at),
            until=proto_time.timestamp(a.ends),
            factor=a.factor,
            max_connections=self.connection_limit() or 0,
            routing_keys=sorted(self.keys),
        )
        if (allowed, interval) != _UNLIMITED:
            p.allowed_messages = allowed
            p.message_interval.CopyFrom(proto_time.duration(interval))
        return p


class Shaper:
    """The node's budgets by (site, source IP), and the rules and sites in force."""

    def __init__(
        self,
        destinations: Destinations | None = None,
        table: ShapingTable | None = None,
        node: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._destinations = destinations
        self.node = node
        self.clock = clock
        self.table = table or ShapingTable()
        self.rules = self.table.ordered_rules()
        self._budgets: dict[tuple[str, str], Budget] = {}

    def apply_table(self, table: ShapingTable) -> None:
        self.table = table
        self.rules = table.ordered_rules()
        for (name, _), budget in self._budgets.items():
            site = table.site_named(name)
            if site != budget.site:
                budget.resite(site)

    async def site_of(self, domain: str) -> str:
        """The MX site ``domain``'s mail goes to (a domain that has none yet is its own, and so is
        one sent by the catch-all ``*`` route: that stands for every other domain, the dev sink or a
        smarthost, and rolling them all into one site would pin every key of an IP to one node)."""
        return await self.looked_up_site(domain) or domain.lower()

    async def looked_up_site(self, domain: str) -> str | None:
        """``site_of``, or None when the lookup failed (DNS unavailable): nothing is known."""
        if self._destinations is None or self._destinations.by_catch_all(domain):
            return domain.lower()
        try:
            hosts = await self._destinations.hosts(domain)
        except NoRoute:
            return domain.lower()
        except DnsUnavailable:
            return None
        except Exception:  # a lookup that fails oddly must not stop the pipeline
            log.exception("looking up the MX site of %s failed", domain)
            return None
        return self.table.site_for([h.host if h.resolve else f"{h.host}:{h.port}" for h in hosts])

    def join(self, site: str, source_ip: str, key: str, wake: Callable[[], None]) -> Budget:
        budget = self._budgets.get((site, source_ip))
        if budget is None:
            budget = Budget(self.table.site_named(site), source_ip, self.clock)
            self._budgets[site, source_ip] = budget
        budget.keys[key] = wake
        return budget

    def leave(self, budget: Budget, key: str) -> None:
        budget.keys.pop(key, None)
        if not budget.keys and budget.adjustment is None and budget.connections == 0:
            self._budgets.pop((budget.site.name, budget.source_ip), None)

    def budget(self, site: str, source_ip: str) -> Budget | None:
        return self._budgets.get((site, source_ip))

    def adjustments(self) -> list[shaping_pb2.ShapingAdjustment]:
        """What is in force, by site and source IP; ones that ended unnoticed are dropped."""
        now = self.clock()
        found = []
        for key in sorted(self._budgets):
            budget = self._budgets[key]
            if budget.expired(now):
                budget.clear()
            if budget.adjustment is not None:
                found.append(budget.to_proto(self.node))
        return found

    def clear(self, site: str, source_ip: str = "") -> list[shaping_pb2.ShapingAdjustment]:
        """End the adjustments of ``site`` (from ``source_ip``, or every IP); what was cleared."""
        cleared = []
        for (name, ip), budget in sorted(self._budgets.items()):
            if name == site and (not source_ip or ip == source_ip) and budget.adjustment is not None:
                cleared.append(budget.to_proto(self.node))
                budget.clear()
        return cleared


def decisive(replies: dict[str, Reply]) -> Reply | None:
    """What a transaction tells the budget: the first provider reply that refused, else None."""
    return next((r for r in replies.values() if 400 <= r.code < 600), None)
