"""Host backoff on its own, with a fake clock: doubling per failure, capped, reset on success."""

from __future__ import annotations

import pytest

from services.node.engine.host_backoff import HostBackoff

KEY = ("127.0.0.2", "192.0.2.1", 25)


def test_a_failing_host_waits_longer_each_time_up_to_the_cap() -> None:
    now = [0.0]
    backoff = HostBackoff(base=10, cap=40, clock=lambda: now[0])
    assert backoff.remaining(KEY) is None
    waits = []
    for _ in range(4):
        backoff.failed(KEY)
        waits.append(backoff.remaining(KEY))
    assert waits == [10.0, 20.0, 40.0, 40.0]
    now[0] = 39.0
    assert backoff.remaining(KEY) == pytest.approx(1.0)
    now[0] = 40.0
    assert backoff.remaining(KEY) is None  # due again
    assert backoff.remaining(("127.0.0.3", "192.0.2.1", 25)) is None  # per source IP


def test_a_success_forgets_the_failures() -> None:
    now = [0.0]
    backoff = HostBackoff(base=10, cap=40, clock=lambda: now[0])
    backoff.failed(KEY)
    backoff.failed(KEY)
    backoff.succeeded(KEY)
    assert backoff.remaining(KEY) is None
    backoff.failed(KEY)
    assert backoff.remaining(KEY) == 10.0  # from the base again


def test_hosts_whose_backoff_ran_out_long_ago_are_forgotten() -> None:
    now = [0.0]
    backoff = HostBackoff(base=10, cap=40, clock=lambda: now[0])
    for i in range(1000):
        backoff.failed(("127.0.0.2", f"192.0.2.{i}", 25))
        now[0] += 1.0  # a thousand hosts failing, one a second
    # Only hosts that failed in the last 2 * cap seconds may be remembered, however many failed.
    assert len(backoff) <= 2 * 40 + 64
    backoff.failed(KEY)
    now[0] += 10 + 40  # KEY's rest ran out, and then cap seconds more: a new failure starts afresh
    backoff.failed(KEY)
    assert backoff.remaining(KEY) == 10.0


def test_a_host_failing_again_soon_after_its_rest_waits_longer() -> None:
    now = [0.0]
    backoff = HostBackoff(base=10, cap=40, clock=lambda: now[0])
    backoff.failed(KEY)
    now[0] = 10.0 + 39.0  # rested, tried again within cap seconds of its rest ending
    backoff.failed(KEY)
    assert backoff.remaining(KEY) == 20.0
    now[0] += 20.0 + 40.0
    assert backoff.remaining(KEY) is None and len(backoff) == 0  # forgotten when looked at, too
