"""Reading the event-loop CPU probe (``sitecustomize`` here) from the benchmark's side.

``env(dir)`` is what a mesh process needs in its environment to load the probe and write to
``dir``; ``snapshot(dir, pids)`` asks each process for its totals (SIGUSR2) and waits for them;
``spent(before, after)`` is what each process spent in between, by callback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNAPSHOT_WAIT = 10.0  # seconds a process gets to write its totals

Totals = dict[str, dict[str, float]]  # process name -> callback -> CPU seconds so far


def env(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "EPOXI_BENCH_CALLBACK_CPU": str(directory)}


async def snapshot(directory: Path, pids: dict[str, int]) -> Totals:
    """Each named process's totals so far; ``{}`` when ``pids`` is empty."""
    totals: Totals = {}
    loop = asyncio.get_running_loop()
    for name, pid in pids.items():
        seen = _written(directory, pid)
        os.kill(pid, signal.SIGUSR2)
        deadline = loop.time() + SNAPSHOT_WAIT
        while not (new := _written(directory, pid) - seen):
            if loop.time() > deadline:
                raise RuntimeError(f"{name} (pid {pid}) wrote no callback CPU totals: is the probe loaded?")
            await asyncio.sleep(0.05)
        totals[name] = _seconds(directory / new.pop())
    return totals


def _written(directory: Path, pid: int) -> set[str]:
    return {p.name for p in directory.glob(f"{pid}.*.json")}


def _seconds(path: Path) -> dict[str, float]:
    seconds: dict[str, float] = json.loads(path.read_text())
    return seconds


def spent(before: Totals, after: Totals) -> Totals:
    return {
        name: {c: s - before.get(name, {}).get(c, 0.0) for c, s in seconds.items()}
        for name, seconds in after.items()
    }
