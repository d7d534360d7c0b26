"""Hosts that just refused a connection are left alone for a while (``epoxi.backoff``, no jitter).

A host is remembered while it rests and for ``cap`` seconds after, so a host that fails again
when tried waits longer; one that has not failed for that long starts from ``base`` again. Hosts
past that are dropped as others fail, so the map holds only hosts that failed in the last
``2 * cap`` seconds (``__len__``), not every host that ever failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epoxi.backoff import Backoff

BackoffKey = tuple[str, str, int]  # (source IP, host address, port)

# Forgotten hosts are swept out when the map reaches this size, then at twice what was left.
MIN_SWEEP = 64


@dataclass
class HostBackoff:
    """A host that failed is left alone ``base`` seconds, doubling per failure up to ``cap``."""

    base: float = 60.0
    cap: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[BackoffKey, tuple[int, float]] = field(default_factory=dict)
    _sweep_at: int = MIN_SWEEP

    def __len__(self) -> int:
        """How many hosts are remembered."""
        return len(self._failures)

    def remaining(self, key: BackoffKey) -> float | None:
        """Seconds until ``key`` may be tried again; None when it may be tried now."""
        entry = self._failures.get(key)
        if entry is None:
            return None
        now = self.clock()
        if self._forgotten(entry, now):
            del self._failures[key]
            return None
        left = entry[1] - now
        return left if left > 0 else None

    def failed(self, key: BackoffKey) -> None:
        now = self.clock()
        entry = self._failures.get(key)
        failures = 1 if entry is None or self._forgotten(entry, now) else entry[0] + 1
        self._failures[key] = (failures, now + Backoff(self.base, self.cap).delay(failures))
        if len(self._failures) >= self._sweep_at:
            self._sweep(now)

    def succeeded(self, key: BackoffKey) -> None:
        self._failures.pop(key, None)

    def _forgotten(self, entry: tuple[int, float], now: float) -> bool:
        return now >= entry[1] + self.cap

    def _sweep(self, now: float) -> None:
        self._failures = {k: e for k, e in self._failures.items() if not self._forgotten(e, now)}
        self._sweep_at = max(MIN_SWEEP, 2 * len(self._failures))
