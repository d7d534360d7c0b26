"""Small helpers shared by the benchmarks: free ports, /proc readings, table printing, orphans,
and the count a sink keeps (the start/stop context is ``devmesh.started``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import time
from collections.abc import Sequence

from devmesh.started import Started

_PR_SET_CHILD_SUBREAPER = 36
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Counted(Started):
    """A sink that counts the messages it received: ``count``, and ``await wait_for(n, seconds)``."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def counted(self, count: int) -> None:
        self.count = count
        self._changed.set()

    async def wait_for(self, count: int, seconds: float) -> float:
        """Wait up to ``seconds`` until ``count`` messages arrived; the ``time.perf_counter()`` when they had."""
        async with asyncio.timeout(seconds):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()
        return time.perf_counter()


async def wait_listening(
    proc: asyncio.subprocess.Process, host: str, port: int, seconds: float = 10.0
) -> None:
    """Until ``proc`` accepts connections on ``host``:``port``; raises if it exits first or does
    not listen within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"{proc.pid} exited with {proc.returncode} before listening on {host}:{port}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def terminate(proc: asyncio.subprocess.Process | None, seconds: float = 5.0) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after ``seconds``), if it still runs."""
    if proc is not None and proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``; 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time so far of each of the process's threads, by thread name (threads of
    one name, e.g. a pool's, summed; the main thread as "main")."""
    seconds: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return seconds
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                name, _, rest = f.read().partition("(")[2].rpartition(")")
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = rest.split()
        name = (
            "main" if tid == str(pid) else name.rstrip("0123456789_") or name
        )  # "spool_0" -> "spool", "asyncio_3" -> "asyncio"
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return seconds


def machine() -> dict[str, str]:
    """nproc, CPU model, RAM and load, for the report."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "load average at start": load,
    }


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Postfix's daemons outlive its ``postfix`` command), so that
    ``reap_orphans`` can collect them instead of leaving zombies behind. Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_orphans() -> int:
    """Collect every exited child; call only once no asyncio subprocess is left running."""
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def table(rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
