"""The one backoff: exponential, capped, with jitter."""

from __future__ import annotations

from epoxi.backoff import Backoff


def test_the_delay_doubles_per_attempt_up_to_the_cap() -> None:
    b = Backoff(base=1.0, cap=10.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(0) == 1.0  # no attempt yet waits like the first


def test_equal_jitter_stays_between_half_and_all_of_the_delay() -> None:
    b = Backoff(base=60.0, cap=3600.0, jitter=0.5)
    assert b.delay(3, rng=lambda: 0.0) == 120.0
    assert b.delay(3, rng=lambda: 1.0) == 240.0
    assert all(120.0 <= b.delay(3) <= 240.0 for _ in range(200))


def test_thousands_of_failures_do_not_overflow() -> None:
    assert Backoff(base=0.4, cap=10.0, jitter=0.5).delay(100_000, rng=lambda: 1.0) == 10.0
