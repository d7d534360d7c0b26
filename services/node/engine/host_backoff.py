"""Hosts that just refused a connection are left alone for a while (``epoxi.backoff``, no jitter)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epoxi.backoff import Backoff

BackoffKey = tuple[str, str, int]  # (source IP, host address, port)


@dataclass
class HostBackoff:
    """A host that failed is left alone ``base`` seconds, doubling per failure up to ``cap``."""

    base: float = 60.0
    cap: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[BackoffKey, tuple[int, float]] = field(default_factory=dict)

    def remaining(self, key: BackoffKey) -> float | None:
        """Seconds until ``key`` may be tried again; None when it may be tried now."""
        entry = self._failures.get(key)
        if entry is None:
            return None
        left = entry[1] - self.clock()
        return left if left > 0 else None

    def failed(self, key: BackoffKey) -> None:
        failures = self._failures.get(key, (0, 0.0))[0] + 1
        self._failures[key] = (failures, self.clock() + Backoff(self.base, self.cap).delay(failures))

    def succeeded(self, key: BackoffKey) -> None:
        self._failures.pop(key, None)
