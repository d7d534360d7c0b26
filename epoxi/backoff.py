"""The one backoff: exponential from ``base``, capped at ``cap``, with optional jitter.

Every wait that grows with consecutive failures uses it: delivery retries, host backoff,
pipeline restarts and registry watches.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# 2 ** 64 times any sane base is past any cap; keeps 2.0 ** n from overflowing after many failures.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Attempt n waits d = min(cap, base * 2^(n-1)), less a random part of up to ``jitter`` x d.

    ``jitter=0.5`` is "equal jitter": between d/2 and d, so retries spread out but never come
    sooner than half the nominal delay.
    """

    base: float
    cap: float
    jitter: float = 0.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        exponent = max(0, attempt - 1)
        d = self.cap if exponent >= _MAX_EXPONENT else min(self.cap, self.base * 2.0**exponent)
        return d * (1 - self.jitter) + d * self.jitter * rng()
