"""The retry schedule: exponential backoff with equal jitter, from ``epoxi.backoff``."""

from __future__ import annotations

from services.node.engine.retry import Retry


def test_retry_delay_grows_exponentially_with_jitter() -> None:
    r = Retry(base=10.0, cap=100.0)
    assert [r.delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [10.0, 20.0, 40.0, 80.0, 100.0]
    assert [r.delay(n, rng=lambda: 0.0) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]


def test_retry_delays_keep_their_numbers_for_any_jitter() -> None:
    """Attempt n waits between d/2 and d, d = min(cap, base * 2^(n-1)), as before Backoff."""
    r = Retry(base=60.0, cap=3600.0)
    for n in range(1, 12):
        d = min(3600.0, 60.0 * 2.0 ** (n - 1))
        for x in (0.0, 0.25, 0.5, 0.999):
            assert r.delay(n, rng=lambda: x) == d / 2 + x * d / 2  # noqa: B023 (called at once)
    assert r.delay(10_000, rng=lambda: 1.0) == 3600.0  # no overflow after many attempts
