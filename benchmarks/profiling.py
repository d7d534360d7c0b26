"""Sampling a running service with py-spy, and a text summary of what the samples show.

``PySpy(pid, path).start()`` runs ``py-spy record --format raw --threads`` against the process;
``stop()`` interrupts it so it writes the collapsed stacks (one ``frame;frame;... count`` line
per distinct stack, root first, the thread as the first frame). ``summarize`` ranks functions
by the share of samples in which they are on the stack (inclusive) and at its top (self).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which(str(Path(sys.executable).parent / "py-spy"))


class PySpy:
    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        self.pid = pid
        self.output = output
        self.rate = rate
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> PySpy:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(self.output),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return self

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# Frames every sample of a thread goes through; they say nothing about where the time goes.
_PLUMBING = (
    "threading.py",
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "concurrent/futures/thread.py",
    "__main__.py",
    "epoxi/runtime.py",
    "/main.py",
)


# What a sample was spent on: the first category (in this order) with a frame on the stack.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("render RFC 5322 (epoxi.mail.render)", ("render (epoxi/mail.py)",)),
    ("validate (epoxi.mail.validate)", ("validate (epoxi/mail.py)",)),
    ("spool: SQLite and fsync", ("(services/node/engine/spool.py)",)),
    (
        "registry: sync, snapshot, watch",
        ("Registrar.", "PipelineSupervisor.snapshot", "HealthWatch", "consul/", "aiohttp/"),
    ),
    ("router: plan and route", ("services/router/servicer.py", "services/router/batching.py")),
    (
        "SMTP delivery (pipeline, smtp_client)",
        (
            "services/node/engine/smtp_client.py",
            "services/node/engine/smtp.py",
            "services/node/engine/reply.py",
            "Pipeline.",
        ),
    ),
    ("node: other handler work", ("services/node/supervisor.py", "services/node/servicer.py")),
    ("gRPC and protobuf", ("grpc/", "_pb2", "google/protobuf/")),
    ("event loop and asyncio", ("asyncio/", "selectors.py")),
]


def categorize(frames: list[str]) -> str:
    for name, patterns in CATEGORIES:
        if any(p in f for f in frames for p in patterns):
            return name
    return "other"


def _plumbing(frame: str) -> bool:
    return any(p in frame for p in _PLUMBING)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file})"


def summarize(raw: Path, top: int = 20) -> str:
    """Per-thread sample counts, then the top functions by inclusive and by self samples."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], [_short(f) for f in frames[1:]]
        total += count
        threads[thread] += count
        for f in set(frames):
            if not _plumbing(f):
                inclusive[f] += count
        if frames:
            own[frames[-1]] += count
        kinds[categorize(frames)] += count
    if total == 0:
        return f"{raw.name}: no samples\n"
    out = [f"{raw.name}: {total} samples (on-CPU; idle threads are not sampled)"]
    out.append("  by thread: " + ", ".join(f"{t} {n / total:.0%}" for t, n in threads.most_common(6)))
    out.append("  by component:")
    out += [f"    {n / total:6.1%}  {k}" for k, n in kinds.most_common()]
    out.append("  inclusive (on the stack; event-loop and thread plumbing left out):")
    out += [f"    {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    out.append("  self (top of the stack):")
    out += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(out) + "\n"
