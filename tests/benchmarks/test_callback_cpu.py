"""The event-loop CPU probe of ``benchmarks.e2e_throughput --callback-cpu``, in a process of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from benchmarks import callback_cpu

BUSY = """
import asyncio, sys

async def spin() -> None:
    while True:
        sum(range(20_000))  # CPU the probe must charge to this task
        await asyncio.sleep(0)

async def main() -> None:
    task = asyncio.create_task(spin())
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    task.cancel()

asyncio.run(main())
"""


async def test_a_task_s_cpu_is_charged_to_its_coroutine_between_two_snapshots(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BUSY,
        env={**os.environ, **callback_cpu.env(tmp_path)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and await proc.stdout.readline() == b"ready\n"
        before = await callback_cpu.snapshot(tmp_path, {"busy": proc.pid})
        await asyncio.sleep(0.5)
        after = await callback_cpu.snapshot(tmp_path, {"busy": proc.pid})
    finally:
        assert proc.stdin is not None
        proc.stdin.write(b"\n")
        await proc.wait()
    spent = callback_cpu.spent(before, after)["busy"]
    assert spent["task spin"] > 0.05  # most of half a second of a spinning loop
    assert spent["task spin"] > 10 * sum(s for name, s in spent.items() if name != "task spin")


async def test_without_its_variable_the_probe_does_nothing(tmp_path: Path) -> None:
    environment = {**os.environ, **callback_cpu.env(tmp_path)}
    del environment["EPOXI_BENCH_CALLBACK_CPU"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import asyncio.events, signal; "
        "print(asyncio.events.Handle._run.__qualname__, signal.getsignal(signal.SIGUSR2))",
        env=environment,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert out.decode().split() == ["Handle._run", str(int(signal.SIG_DFL))]
