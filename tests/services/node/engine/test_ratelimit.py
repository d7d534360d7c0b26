"""The rate limiter on its own, with a fake clock."""

from __future__ import annotations

import pytest

from services.node.engine.ratelimit import RateLimiter


def test_the_rate_limiter_allows_a_burst_of_exactly_allowed_then_waits_a_full_interval() -> None:
    now = [100.0]
    limiter = RateLimiter(allowed=3, interval=30.0, clock=lambda: now[0])
    assert [limiter.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take() is None  # all three in flight: nothing frees before one completes
    limiter.release()
    now[0] = 101.0
    limiter.release()
    limiter.release()
    assert limiter.take() == pytest.approx(29.0)  # the first slot frees 30 s after its send completed
    now[0] = 130.0
    assert limiter.take() == 0.0
    assert limiter.take() == pytest.approx(1.0)
    now[0] = 131.0
    assert [limiter.take(), limiter.take()] == [0.0, 0.0]
    assert limiter.take() is None


def test_the_rate_limiter_never_lets_more_than_allowed_into_any_window() -> None:
    """Sends that complete at once, as fast as the limiter lets them: GCRA would let 2n - 1 through."""
    now = [0.0]
    limiter = RateLimiter(allowed=3, interval=30.0, clock=lambda: now[0])
    sent: list[float] = []
    while len(sent) < 20:
        wait = limiter.take()
        assert wait is not None
        if wait > 0:
            now[0] += wait
            continue
        sent.append(now[0])
        limiter.release()
    assert sent[:3] == [0.0, 0.0, 0.0]  # a burst of exactly ``allowed``
    assert max(sum(1 for t in sent if s <= t < s + 30.0) for s in sent) == 3


def test_a_resized_rate_limiter_remembers_recent_sends() -> None:
    now = [0.0]
    limiter = RateLimiter(allowed=2, interval=10.0, clock=lambda: now[0])
    limiter.take()
    limiter.release()
    limiter.take()  # in flight during the change
    bigger = limiter.resized(3, 10.0)
    assert bigger.take() == 0.0
    assert bigger.take() == pytest.approx(10.0)  # 1 sent + 2 in flight fill the window of 3
    bigger.release()
    bigger.release()
    assert bigger.take() == pytest.approx(10.0)
