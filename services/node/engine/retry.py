"""When a deferred delivery is tried again: ``epoxi.backoff`` with equal jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from epoxi.backoff import Backoff

EQUAL_JITTER = 0.5


@dataclass(frozen=True)
class Retry:
    """Attempt n waits between d/2 and d, d = min(cap, base * 2^(n-1))."""

    base: float = 60.0
    cap: float = 3600.0

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        return Backoff(self.base, self.cap, EQUAL_JITTER).delay(attempts, rng)
