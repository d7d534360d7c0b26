"""Shaping against real SMTP sinks that answer as providers do: the rates the sink measures,
a budget shared by two domains, suspension and a block."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from devmesh.sink import Sink
from epoxi.routing import routing_key
from epoxi.shaping import BOUNCE, SUSPEND, THROTTLE, Rule, ShapingTable, Site
from services.node.engine.mx import Destinations, Host
from services.node.engine.pipeline import Pipeline
from services.node.engine.reply import Reply
from services.node.engine.retry import Retry
from services.node.engine.shaping import Shaper
from services.node.engine.smtp import SmtpSender
from services.node.engine.spool import Outcome, Spool, State
from tests.services.node.support import SOURCE_IP, fast_policy, messages
from tests.support import eventually

RETRY = Retry(base=0.05, cap=0.2)


class Provider:
    """Answers RCPT through ``sink``: 250, or ``refusal`` when ``refusing(arrivals so far, recipient)``; times each."""

    def __init__(self, sink: Sink, refusal: str, refusing: Callable[[int, str], bool]) -> None:
        self.sink = sink
        self.refusal = refusal
        self.refusing = refusing
        self.arrivals: list[tuple[float, str, bool]] = []  # (time.monotonic(), recipient, refused)
        sink.reply_rule = self._reply

    def _reply(self, rcpt: str) -> str | None:
        refused = self.refusing(len(self.arrivals), rcpt)
        self.arrivals.append((time.monotonic(), rcpt, refused))
        return self.refusal if refused else None

    def busiest(self, interval: float, since: float = 0.0, until: float = float("inf")) -> int:
        """The most arrivals in any window of ``interval`` seconds starting in [since, until)."""
        times = [t for t, _, _ in self.arrivals if t >= since]
        best = 0
        for i, start in enumerate(times):
            if start >= until:
                break
            best = max(best, sum(1 for t in times[i:] if t < start + interval))
        return best


@pytest.fixture
async def pipelines(spool: Spool) -> AsyncIterator[Callable[..., Pipeline]]:
    started: list[Pipeline] = []

    def make(
        domain: str, sender: SmtpSender, shaper: Shaper, ip: str = SOURCE_IP, **policy: object
    ) -> Pipeline:
        key = routing_key(domain, ip)
        p = Pipeline(
            routing_key=key,
            domain=domain,
            source_ip=ip,
            policy=fast_policy(
                key, **{"max_retries": 20, "allowed_messages": 1000, "message_interval": 1.0, **policy}
            ),
            spool=spool,
            sender=sender,
            retry=RETRY,
            shaper=shaper,
        )
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop(grace=1)


def to(sink: Sink) -> SmtpSender:
    # The sink is the MX of every test domain (routed by name: the catch-all route makes each
    # domain a site of its own).
    routes = {d: Host(sink.host, sink.port) for d in ("example.com", "example.org", "example.net")}
    return SmtpSender(Destinations(routes), "node.epoxi.test", timeout=5)


def shaper_for(sender: SmtpSender, site: Site, *rules: Rule) -> Shaper:
    return Shaper(
        sender.destinations, ShapingTable(rules={r.name: r for r in rules}, sites={site.name: site}), "n1"
    )


async def fill(p: Pipeline, n: int, domain: str | None = None) -> None:
    domain = domain or p.domain
    await p.spool.enqueue(p.routing_key, messages(*(f"r{i}@{domain}" for i in range(n))))
    p.wake()


async def delivered(p: Pipeline, n: int) -> None:
    async def done() -> bool:
        c = await p.counts()
        return c.delivered == n and c.unfinished == 0

    await eventually(done, 60)


async def test_a_provider_saying_slow_down_halves_the_site_budget_at_once_and_it_recovers(
    spool: Spool, sink: Sink, pipelines: Callable[..., Pipeline]
) -> None:
    sender = to(sink)
    site = Site(sink.address, (sink.address,), max_connections=4, allowed_messages=20, message_interval=1.0)
    rule = Rule("slow-down", THROTTLE, 1.0, code="421", factor=0.5, recovery_step=0.25, recovery_interval=1.5)
    shaper = shaper_for(sender, site, rule)
    clean = asyncio.Event()
    provider = Provider(sink, "421 4.7.0 Try again later", lambda n, _: n >= 30 and not clean.is_set())
    p = pipelines("example.com", sender, shaper, max_connections=4)
    total = 120
    await fill(p, total)

    factors: list[float] = []  # the budget's factor, each time it changes
    refused_before: list[int] = []  # refusals the sink had sent when the factor first dropped

    async def watch() -> None:
        while True:
            b = p.budget
            f = b.adjustment.factor if b is not None and b.adjustment is not None else 1.0
            if not factors or factors[-1] != f:
                factors.append(f)
                if f < 1 and not refused_before:
                    refused_before.append(sum(refused for _, _, refused in provider.arrivals))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        await eventually(lambda: asyncio.sleep(0, refused_before), 30)
        first_refusal = next(t for t, _, refused in provider.arrivals if refused)
        # Within one reply: the refusals sent before the drop are those of the lanes (4) that
        # were sending when the first one came.
        assert 1 <= refused_before[0] <= 4
        assert p.budget is not None and p.budget.adjustment is not None
        assert p.budget.rate() == (10, 1.0) and p.budget.connection_limit() == 2
        await asyncio.sleep(1.0)  # refusals go on at the reduced rate

        def refused_while_throttled() -> list[float]:
            return [t for t, _, refused in provider.arrivals if refused and t > first_refusal + 0.2]

        # Delivery goes on, slower: at least three more refusals (a loaded machine sends fewer
        # in the second, so the throttled period lasts until they have come).
        await eventually(lambda: asyncio.sleep(0, len(refused_while_throttled()) >= 3), 30)
        clean.set()
        cleaned = time.monotonic()
        await delivered(p, total)
    finally:
        watcher.cancel()

    assert provider.busiest(1.0, until=first_refusal) <= 20  # the site's own limit
    # Sends that held a slot when the reply came may still arrive (one per lane, 4); after
    # them, no window of the throttled period holds more than the halved limit.
    assert provider.busiest(1.0, since=first_refusal, until=cleaned) <= 10 + 4
    assert provider.busiest(1.0, since=first_refusal + 0.2, until=cleaned) <= 10
    assert len(refused_while_throttled()) >= 3  # delivery went on, slower
    assert factors[:2] == [1.0, 0.5] and factors[-1] == 1.0
    assert 0.75 in factors  # recovery climbed in steps
    assert shaper.adjustments() == []
    assert sorted(set(r for _, r, refused in provider.arrivals if not refused)) == sorted(
        f"r{i}@example.com" for i in range(total)
    )


async def test_two_domains_on_one_mx_share_one_budget(
    spool: Spool, sink: Sink, pipelines: Callable[..., Pipeline]
) -> None:
    sender = to(sink)
    site = Site(sink.address, (sink.address,), max_connections=2, allowed_messages=10, message_interval=1.0)
    shaper = shaper_for(sender, site)
    provider = Provider(sink, "", lambda n, _: False)
    a = pipelines("example.com", sender, shaper, max_connections=4)
    b = pipelines("example.org", sender, shaper, max_connections=4)
    await fill(a, 25)
    await fill(b, 25)
    await delivered(a, 25)
    await delivered(b, 25)
    assert a.budget is b.budget and a.site == b.site == sink.address
    assert provider.busiest(1.0) <= 10  # together, never more than the site allows
    assert sink.peak_sessions <= 2
    # Both were busy at once: the domains' arrivals interleave.
    domains = [r.rpartition("@")[2] for _, r, _ in provider.arrivals]
    switches = sum(1 for x, y in itertools.pairwise(domains) if x != y)
    assert switches >= 5


async def test_a_suspension_defers_queued_mail_with_its_attempts_unspent(
    spool: Spool, sink: Sink, pipelines: Callable[..., Pipeline]
) -> None:
    sender = to(sink)
    site = Site(sink.address, (sink.address,))
    rule = Rule("hold-on", SUSPEND, 0.5, code="421", text=r"\[TSS04\]")
    shaper = shaper_for(sender, site, rule)
    said = "421 4.7.0 [TSS04] Messages temporarily deferred due to unexpected volume"
    provider = Provider(sink, said, lambda n, _: n == 0)
    p = pipelines("example.com", sender, shaper, max_connections=1, batch_size=10)
    await fill(p, 10)
    await eventually(lambda: asyncio.sleep(0, p.budget is not None and p.budget.adjustment is not None), 10)
    suspended_at = time.monotonic()
    await delivered(p, 10)
    # Nothing reached the sink while the site was suspended, and the suspension cost no attempt.
    assert [t for t, _, _ in provider.arrivals[1:] if t < suspended_at + 0.45] == []
    history = [await spool.message(mid) for mid in await spool_ids(spool, p.routing_key)]
    attempts = sorted(max(d.attempts for d in m[0].deliveries) for m in history if m)
    assert attempts == [1] * 9 + [2]
    texts = [a.reply.text for m in history if m for a in m[1] if a.result is State.DEFERRED]
    assert any("suspended" in t and "hold-on" in t for t in texts)


async def spool_ids(spool: Spool, key: str) -> list[str]:
    return [m.id for m in await spool.list_messages(key, None, None, 100)]


async def test_a_block_bounces_the_sites_mail_from_that_ip_only_with_the_reply(
    spool: Spool, sink: Sink, pipelines: Callable[..., Pipeline], tmp_path: Path
) -> None:
    other = await Sink().start()
    try:
        routes = {"example.com": Host(sink.host, sink.port), "example.org": Host(other.host, other.port)}
        sender = SmtpSender(Destinations({**routes, "example.net": routes["example.com"]}), "node.epoxi.test")
        rule = Rule("banned", BOUNCE, 60.0, code="550", enhanced_code="5.7.", text="banned sending ip")
        shaper = Shaper(sender.destinations, ShapingTable(rules={"banned": rule}), "n1")
        said = f"550 5.7.606 Access denied, banned sending IP [{SOURCE_IP}]"
        provider = Provider(sink, said, lambda _, rcpt: rcpt.endswith("@example.com"))
        blocked = pipelines("example.com", sender, shaper, max_connections=1)
        # The same IP to another site, and another IP to the blocking site, are not blocked.
        elsewhere = pipelines("example.org", sender, shaper, max_connections=1)
        other_ip = pipelines("example.net", sender, shaper, ip="127.0.0.3", max_connections=1)
        await fill(blocked, 20)
        await fill(elsewhere, 5)
        await fill(other_ip, 5)

        async def all_bounced() -> bool:
            c = await blocked.counts()
            return c.bounced == 20 and c.unfinished == 0

        await eventually(all_bounced, 30)
        await delivered(elsewhere, 5)
        await delivered(other_ip, 5)
        assert (
            len([a for a in provider.arrivals if a[1].endswith("@example.com")]) == 1
        )  # the rest never sent
        for mid in await spool_ids(spool, blocked.routing_key):
            found = await spool.message(mid)
            assert found is not None
            last = found[1][-1]
            assert (last.result, last.reply.code, last.reply.enhanced) == (State.BOUNCED, 550, "5.7.606")
            assert "banned sending IP" in last.reply.text
        assert other_ip.budget is not None and other_ip.budget.adjustment is None
        assert other_ip.site == blocked.site != elsewhere.site
    finally:
        await other.stop()


async def test_a_block_bounces_the_sites_deferred_mail_too_not_only_what_is_due(
    spool: Spool, sink: Sink, pipelines: Callable[..., Pipeline]
) -> None:
    """Mail of the blocked (site, IP) deferred an hour away bounces once the block is in force,
    by another key of the site that has nothing due: "bounce the queued mail"."""
    routes = {d: Host(sink.host, sink.port) for d in ("example.com", "example.info")}
    sender = SmtpSender(Destinations(routes), "node.epoxi.test", timeout=5)
    rule = Rule("banned", BOUNCE, 60.0, code="550", enhanced_code="5.7.", text="banned sending ip")
    shaper = Shaper(sender.destinations, ShapingTable(rules={"banned": rule}), "n1")
    provider = Provider(
        sink, f"550 5.7.606 Access denied, banned sending IP [{SOURCE_IP}]", lambda _, rcpt: True
    )

    waiting = routing_key("example.info", SOURCE_IP)
    await spool.enqueue(waiting, messages(*(f"w{i}@example.info" for i in range(3))))
    now = time.time()
    tried = await spool.claim(waiting, now, 10)
    earlier = Reply.local("an earlier try", "4.4.1")
    await spool.record(
        [Outcome(d.id, State.DEFERRED, 1, now + 3600, earlier, now) for job in tried for d in job.deliveries]
    )
    later = pipelines("example.info", sender, shaper, max_connections=1)
    blocking = pipelines("example.com", sender, shaper, max_connections=1)
    await fill(blocking, 1)

    async def all_bounced() -> bool:
        c = await later.counts()
        return c.bounced == 3 and c.unfinished == 0

    await eventually(all_bounced, 30)
    assert [a[1] for a in provider.arrivals] == ["r0@example.com"]  # the deferred mail was never sent
    for mid in await spool_ids(spool, waiting):
        found = await spool.message(mid)
        assert found is not None
        last = found[1][-1]
        assert (last.result, last.reply.code, last.reply.enhanced) == (State.BOUNCED, 550, "5.7.606")
        assert [d.attempts for d in found[0].deliveries] == [1]  # the try it had; the bounce spent none
