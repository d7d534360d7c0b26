"""The pipeline's rate limit: never more than ``allowed`` sends in any ``interval`` seconds."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """Never more than ``allowed`` sends in any window of ``interval`` seconds; bursts of ``allowed``.

    A sliding-window log: a send holds its slot until it completes, and the slot is free again
    ``interval`` seconds after that. So any two sends through one slot are at least ``interval``
    apart however long each took, and a receiver sees at most ``allowed`` arrivals in any window.
    (GCRA would smooth the rate, but with a burst of ``allowed`` it lets up to 2 x allowed - 1 sends
    into one window.)
    """

    def __init__(self, allowed: int, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = max(1, allowed)
        self.interval = interval
        self._clock = clock
        self._held = 0
        self._done: deque[float] = deque()  # when recent sends completed, oldest first

    def take(self) -> float | None:
        """Take a slot (0.0), or say how long until one frees (None: not before a send completes)."""
        now = self._clock()
        while self._done and self._done[0] + self.interval <= now:
            self._done.popleft()
        used = self._held + len(self._done)
        if used < self.allowed:
            self._held += 1
            return 0.0
        if self._held >= self.allowed:
            return None
        return self._done[used - self.allowed] + self.interval - now

    def release(self) -> None:
        """The send that took a slot is done."""
        self._held = max(0, self._held - 1)
        self._done.append(self._clock())

    def give_back(self) -> None:
        """A slot taken was not used: it is free again at once."""
        self._held = max(0, self._held - 1)

    def resized(self, allowed: int, interval: float) -> RateLimiter:
        """A limiter with new limits that remembers the sends of this one (in flight and recent)."""
        new = RateLimiter(allowed, interval, self._clock)
        new._held = self._held
        new._done = deque(self._done)
        return new
