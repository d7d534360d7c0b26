"""CPU time of a service's event-loop callbacks, by the task each one steps (a benchmark's probe).

py-spy counts a thread as busy while it is runnable, so on a machine with more busy threads
than cores it charges the time a thread waits for a core to whatever it was doing when it was
preempted. This measures CPU instead: every ``Handle._run`` is timed with ``time.thread_time``
and charged to the coroutine of the task it steps (or to the callback's name), and so is the
selector's wait. ``benchmarks.e2e_throughput --callback-cpu`` puts this directory on the mesh's
``PYTHONPATH``, so Python imports it at start-up; it does nothing unless
``EPOXI_BENCH_CALLBACK_CPU`` names a directory. Each SIGUSR2 writes the totals so far to
``<dir>/<pid>.<n>.json``; the benchmark signals before and after the measured window and
subtracts.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("EPOXI_BENCH_CALLBACK_CPU", "")

if _DIR:
    import asyncio.events
    import collections
    import json
    import selectors
    import signal
    import time

    _seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
    _clock = time.thread_time
    _snapshots = [0]

    def _name(callback: object) -> str:
        try:
            owner = getattr(callback, "__self__", None)
            if isinstance(owner, asyncio.Task):
                coro = owner.get_coro()
                return "task " + getattr(coro, "__qualname__", type(coro).__name__)
            return getattr(callback, "__qualname__", None) or type(callback).__name__
        except Exception:  # a probe must never break the loop it measures
            return type(callback).__name__

    _run = asyncio.events.Handle._run

    def _timed_run(self: asyncio.events.Handle) -> None:
        callback, started = self._callback, _clock()  # type: ignore[attr-defined]
        _run(self)
        _seconds[_name(callback)] += _clock() - started

    _select = selectors.EpollSelector.select

    def _timed_select(self: selectors.EpollSelector, timeout: float | None = None) -> list[object]:
        started = _clock()
        try:
            return _select(self, timeout)  # type: ignore[return-value]
        finally:
            _seconds["(selector wait)"] += _clock() - started

    def _snapshot(signum: int, frame: object) -> None:
        _snapshots[0] += 1
        path = os.path.join(_DIR, f"{os.getpid()}.{_snapshots[0]}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_seconds, f)
        os.replace(path + ".tmp", path)

    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    selectors.EpollSelector.select = _timed_select  # type: ignore[method-assign,assignment]
    signal.signal(signal.SIGUSR2, _snapshot)
