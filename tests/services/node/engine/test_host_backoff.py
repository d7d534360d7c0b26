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
