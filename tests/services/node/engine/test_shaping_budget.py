"""A (site, source IP) budget on a fake clock: AIMD on matching replies, holds, and clearing."""

from __future__ import annotations

import asyncio

from epoxi.shaping import BOUNCE, SUSPEND, THROTTLE, Rule, ShapingTable, Site
from services.node.engine.reply import Reply
from services.node.engine.shaping import Budget, Shaper, decisive

SLOW = Reply.parse(421, "4.7.0 Try again later")
BLOCKED = Reply.parse(550, "5.7.606 Access denied, banned sending IP [127.0.0.2]")
THROTTLE_RULE = Rule(
    "slow", THROTTLE, 10.0, code="421", factor=0.5, recovery_step=0.25, recovery_interval=5.0
)
RULES = [
    THROTTLE_RULE,
    Rule("hold", SUSPEND, 30.0, code="451"),
    Rule("block", BOUNCE, 60.0, code="550", enhanced_code="5.7."),
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: Clock, **limits: int | float) -> Budget:
    site = Site("s", ("mx.test",), **limits)  # type: ignore[arg-type]
    return Budget(site, "127.0.0.2", clock)


def test_one_reply_halves_the_limits_and_clean_replies_bring_them_back_step_by_step() -> None:
    clock = Clock()
    b = budget(clock, max_connections=8, allowed_messages=40, message_interval=1.0)
    assert (b.connection_limit(), b.rate()) == (8, (40, 1.0))
    assert b.observe(SLOW, RULES, clock.now) is THROTTLE_RULE
    assert (b.connection_limit(), b.rate()) == (4, (20, 1.0))
    # Every lane hears the same reply: one decrease per recovery interval, not one per reply.
    for _ in range(5):
        b.observe(SLOW, RULES, clock.now + 1)
    assert b.rate() == (20, 1.0)
    clock.now += 6  # a further match after a recovery interval decreases again
    b.observe(SLOW, RULES, clock.now)
    assert (b.connection_limit(), b.rate()) == (2, (10, 1.0))
    last_match = clock.now

    # Clean replies change nothing until the duration has passed since the last match...
    b.observe(None, RULES, last_match + 9)
    assert b.rate() == (10, 1.0)
    # ...then the factor climbs by the step each recovery interval: 0.25, 0.5, 0.75, 1 (cleared).
    steps = []
    for t in (10, 11, 15, 20, 25):
        b.observe(None, RULES, last_match + t)
        steps.append(b.adjustment.factor if b.adjustment else 1.0)
    assert steps == [0.5, 0.5, 0.75, 1.0, 1.0]
    assert b.adjustment is None and b.rate() == (40, 1.0) and b.connection_limit() == 8


def test_a_site_without_limits_is_throttled_from_what_it_was_getting() -> None:
    clock = Clock()
    b = budget(clock)
    assert b.connection_limit() is None
    freed = asyncio.Event()
    for _ in range(3):
        assert b.try_open(lambda: None)
    for _ in range(50):  # 50 sends over 5 seconds: 10 a second
        assert b.take(freed) == 0.0
        b.release()
        clock.now += 0.1
    b.observe(SLOW, RULES, clock.now)
    assert b.rate() == (5, 1.0)
    assert b.connection_limit() == 1  # 3 open, halved, rounded down
    assert b.surplus() == 2


def test_below_one_message_an_interval_the_interval_stretches() -> None:
    clock = Clock()
    b = budget(clock, allowed_messages=1, message_interval=2.0)
    b.observe(SLOW, RULES, clock.now)
    assert b.rate() == (1, 4.0)


def test_the_connection_cap_is_shared_and_a_closed_connection_wakes_who_waits() -> None:
    clock = Clock()
    b = budget(clock, max_connections=2)
    woken: list[str] = []
    assert b.try_open(lambda: woken.append("a")) and b.try_open(lambda: woken.append("a"))
    assert not b.try_open(lambda: woken.append("b")) and b.wanted()
    b.closed()
    assert woken == ["b"] and not b.wanted()


def test_a_suspension_holds_sending_until_it_ends() -> None:
    clock = Clock()
    b = budget(clock)
    b.observe(Reply.parse(451, "4.7.500 Server busy"), RULES, clock.now)
    held = b.holding(clock.now + 29)
    assert held is not None and held.suspended_until == clock.now + 30 and held.blocked_by is None
    assert b.holding(clock.now + 30) is None
    assert b.expired(clock.now + 30)


def test_a_block_keeps_the_reply_that_blocked() -> None:
    clock = Clock()
    b = budget(clock)
    b.observe(BLOCKED, RULES, clock.now)
    held = b.holding(clock.now + 1)
    assert held is not None and held.blocked_by == BLOCKED and held.blocked_until == clock.now + 60


def test_the_shaper_lists_and_clears_adjustments_and_follows_new_sites() -> None:
    clock = Clock()
    shaper = Shaper(table=ShapingTable(rules={r.name: r for r in RULES}), node="n1", clock=clock)
    woken: list[str] = []
    a = shaper.join("s", "127.0.0.2", "a.test_127_0_0_2", lambda: woken.append("a"))
    assert shaper.join("s", "127.0.0.2", "b.test_127_0_0_2", lambda: woken.append("b")) is a
    other = shaper.join("s", "127.0.0.3", "a.test_127_0_0_3", lambda: None)
    a.observe(SLOW, shaper.rules, clock.now)
    other.observe(SLOW, shaper.rules, clock.now)
    assert sorted(woken) == ["a", "b"]  # the keys sharing the budget hear of the change
    listed = shaper.adjustments()
    assert [(x.site, x.source_ip, x.rule, x.factor) for x in listed] == [
        ("s", "127.0.0.2", "slow", 0.5),
        ("s", "127.0.0.3", "slow", 0.5),
    ]
    assert listed[0].routing_keys == ["a.test_127_0_0_2", "b.test_127_0_0_2"]
    assert listed[0].reply == "421 4.7.0 Try again later" and listed[0].node == "n1"
    cleared = shaper.clear("s", "127.0.0.2")
    assert [x.source_ip for x in cleared] == ["127.0.0.2"]
    assert [x.source_ip for x in shaper.adjustments()] == ["127.0.0.3"]
    assert shaper.clear("nowhere") == []

    shaper.apply_table(
        ShapingTable(sites={"s": Site("s", ("mx.test",), allowed_messages=7, message_interval=1.0)})
    )
    assert a.rate() == (7, 1.0)


def test_the_decisive_reply_is_the_first_provider_refusal() -> None:
    ok = Reply.parse(250, "2.1.5 OK")
    local = Reply.local("connection refused")
    assert decisive({"a": ok, "b": local}) is None
    assert decisive({"a": ok, "b": SLOW, "c": BLOCKED}) == SLOW


def test_slots_held_across_a_clear_and_a_new_throttle_do_not_wedge_the_budget() -> None:
    clock = Clock()
    b = budget(clock)  # no limits of its own: sends skip the limiter
    freed = asyncio.Event()
    for _ in range(4):
        assert b.take(freed) == 0.0
    b.observe(SLOW, RULES, clock.now)  # throttled while 4 sends are under way
    for _ in range(4):
        b.release()
    b.clear()
    assert b.take(freed) == 0.0  # unlimited again
    clock.now += 1
    b.observe(SLOW, RULES, clock.now)  # a new throttle, with that send still under way
    b.release()
    clock.now += 10
    allowed, _ = b.rate()
    assert [b.take(freed) for _ in range(allowed)] == [0.0] * allowed
