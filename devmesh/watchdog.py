"""Notice when a service of the mesh dies, say so, and start it again, as a supervisor would.

A service that dies is started again after a backoff: 0.5 s, doubling up to 30 s. One that
stayed up 30 s has recovered, and its next death counts as the first again; after 5 quick
deaths in a row (a start that fails is one) it is left dead. Every service but the registry
is restarted: nodes anywhere (the registry says where they are), the others at the address
they had, the one their clients know. The development registry is only reported: it keeps
the mesh's state in memory, and a new one would start empty under services that hold
sessions and placement records in the old one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devmesh.logs import describe_exit
from devmesh.supervisor import Mesh, Process, StartFailed
from epoxi.tasks import cancel_and_wait

TAIL_LINES = 20
NOT_RESTARTED = {
    "registry": "the development registry kept the mesh's state (registrations, sessions, placement"
    " records, KV) in memory, and a new one would start empty; restart epoxi dev",
}


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    longest: float = 30.0
    # Up this long, a service has recovered: its next death counts as the first again.
    stable_after: float = 30.0
    # Quick deaths in a row after which a service is left dead.
    give_up_after: int = 5

    def delay(self, failures: int) -> float:
        return float(min(self.first * 2 ** (failures - 1), self.longest))


@dataclass(frozen=True)
class Died:
    name: str
    pid: int
    returncode: int
    # How it ended: "died", or why a start failed ("exited before it was ready", ...).
    how: str
    tail: list[str]
    log: Path | None
    # What happens next: "restarting it in 0.5 s", "not restarted: ...", "given up ...".
    then: str

    @classmethod
    def of(cls, process: Process, how: str, log: Path | None, then: str) -> Died:
        returncode = process.proc.returncode
        return cls(
            name=process.name,
            pid=process.pid,
            returncode=returncode if returncode is not None else -1,
            how=how,
            tail=process.tail(TAIL_LINES),
            log=log,
            then=then,
        )

    def describe(self) -> str:
        source = f"{self.log}" if self.log is not None else "its output"
        count = len(self.tail)
        lines = [
            f"!! {self.name} (pid {self.pid}) {self.how}: {describe_exit(self.returncode)}",
            f"   last {count} line{'' if count == 1 else 's'} of {source}:"
            if count
            else "   it printed nothing",
            *(f"   | {line}" for line in self.tail),
            f"!! {self.name}: {self.then}",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Restarted:
    name: str
    pid: int
    address: str
    restarts: int

    def describe(self) -> str:
        return (
            f">> {self.name} restarted and ready: pid {self.pid} at {self.address} (restart {self.restarts})"
        )


Event = Died | Restarted


class Watchdog:
    """Watches every process of ``mesh`` and restarts the ones that die, telling ``report``."""

    def __init__(self, mesh: Mesh, report: Callable[[Event], None], backoff: Backoff | None = None) -> None:
        self.mesh = mesh
        self.report = report
        self.backoff = backoff or Backoff()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Watchdog:
        for name in self.mesh.processes:
            self._tasks.append(asyncio.create_task(self._watch(name), name=f"watch {name}"))
        return self

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    async def _watch(self, name: str) -> None:
        process = self.mesh.processes[name]
        failures = restarts = 0
        while True:
            await process.exited()
            if process.stopping:
                return
            how, quick = "died", time.monotonic() - process.started_at < self.backoff.stable_after
            while True:
                failures = failures + 1 if quick else 1
                delay = self._delay(name, failures)
                then = self._then(name, failures, delay)
                self.report(Died.of(process, how, self.mesh.log_path(name), then))
                if delay is None:
                    return
                await asyncio.sleep(delay)
                try:
                    process = await self.mesh.restart(name)
                    break
                except StartFailed as failed:
                    process, how, quick = failed.process, failed.reason, True
            restarts += 1
            self.report(Restarted(name, process.pid, process.address, restarts))

    def _delay(self, name: str, failures: int) -> float | None:
        if name in NOT_RESTARTED or failures >= self.backoff.give_up_after:
            return None
        return self.backoff.delay(failures)

    def _then(self, name: str, failures: int, delay: float | None) -> str:
        if name in NOT_RESTARTED:
            return f"not restarted: {NOT_RESTARTED[name]}"
        if delay is None:
            return (
                f"given up: it failed {failures} times in a row, each within"
                f" {self.backoff.stable_after:g} s of its start; not restarting it again"
            )
        return f"restarting it in {delay:g} s"
