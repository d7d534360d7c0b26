"""Each service's output in its own file, ``<dir>/<service>.log``, so nothing it prints is lost.

A run starts new files and keeps the previous run's as ``<service>.log.1``. Within a run, a
restarted service appends to its file; a marker line from the supervisor (``--- ... ---``)
says when each incarnation started and how it ended.
"""

from __future__ import annotations

import datetime
import signal
from pathlib import Path
from typing import TextIO


def describe_exit(returncode: int) -> str:
    """``exit code 1``, or ``killed by SIGKILL (exit code -9)`` for a signal."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {returncode})"
    return f"exit code {returncode}"


class ServiceLog:
    """One service's log file, open for the whole run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def write(self, line: str) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8", errors="replace")
        self._file.write(line if line.endswith("\n") else line + "\n")
        # Flushed line by line: the file is complete whenever someone reads it, even after a crash.
        self._file.flush()

    def mark(self, event: str) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        self.write(f"--- {now} epoxi dev: {event} ---")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ServiceLogs:
    """The log files of one run under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._logs: dict[str, ServiceLog] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.log"):
            old.replace(old.with_name(old.name + ".1"))

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def get(self, name: str) -> ServiceLog:
        if name not in self._logs:
            self._logs[name] = ServiceLog(self.path(name))
        return self._logs[name]

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
