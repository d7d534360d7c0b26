"""HealthWatch: a local copy of a service's health entries, kept fresh by blocking queries."""

from __future__ import annotations

import pytest

from epoxi.registry.client import Consul
from epoxi.registry.watch import RETRY, HealthWatch
from tests.support import eventually


@pytest.mark.parametrize("failures", range(1, 12))
@pytest.mark.parametrize("rng", [0.0, 0.3, 1.0])
def test_retry_delay_is_the_watch_formula_it_replaced(failures: int, rng: float) -> None:
    # Before the one Backoff: min(10, 0.2 * 2**failures) * random.uniform(0.5, 1.0).
    expected = min(10.0, 0.2 * 2**failures) * (0.5 + 0.5 * rng)
    assert RETRY.delay(failures, lambda: rng) == pytest.approx(expected)


async def test_a_watch_follows_registrations_and_closes(consul: Consul) -> None:
    watch = HealthWatch(consul, "epoxi-test", wait="1s").start()
    await watch.ready.wait()
    assert watch.entries == []

    await consul.agent.service.register("epoxi-test", service_id="t1")

    async def listed() -> list[str]:
        return [e["Service"]["ID"] for e in watch.entries]

    assert await eventually(listed) == ["t1"]
    await watch.close()
    await watch.close()  # closing twice is fine
