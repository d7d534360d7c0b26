"""A progress line on stderr: count/total, a bar, the rate and the ETA.

On a terminal it is one line redrawn in place; otherwise (a pipe, a log, a test) it is a plain
line at most every ``interval`` seconds, and always a last one when done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

BAR = 20
TTY_INTERVAL = 0.1
PLAIN_INTERVAL = 1.0


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self,
        total: int,
        stream: TextIO,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval if interval is not None else (TTY_INTERVAL if self._tty else PLAIN_INTERVAL)
        self._clock = clock
        self.started = clock()
        self._shown_at: float | None = None

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, done: int, failed: int = 0) -> None:
        """``done`` more emails are finished, ``failed`` of them failed."""
        self.done += done
        self.failed += failed
        now = self._clock()
        if self._shown_at is None or now - self._shown_at >= self._interval:
            self._show(now)

    def finish(self) -> None:
        self._show(self._clock())
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def line(self) -> str:
        total = max(self.total, self.done)
        share = self.done / total if total else 1.0
        filled = int(share * BAR)
        rate = self.rate()
        eta = duration((total - self.done) / rate) if rate > 0 else "?"
        return (
            f"done {self.done}/{total} [{'#' * filled}{'.' * (BAR - filled)}] {share:4.0%}  "
            f"{rate:.0f} emails/s  ETA {eta}  failed {self.failed}"
        )

    def _show(self, now: float) -> None:
        self._shown_at = now
        if self._tty:
            self._stream.write("\r" + self.line() + "\x1b[K")
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()
