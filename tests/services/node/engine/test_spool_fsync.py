"""Group commit, counted where it costs: the fsync system calls of a real spool, under strace."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]

# Runs in a child process; each marker is a failing stat() that shows up in the trace.
CHILD = """
import asyncio, os, sys
from services.node.engine.spool import NewMessage, Spool

def mark(name):
    os.path.exists("/epoxi-fsync-mark-" + name)

async def main():
    spool = await Spool.open(sys.argv[1])
    msg = lambda i: NewMessage("ann@sender.test", [f"r{i}@example.com"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    await spool.enqueue("example.com_127_0_0_2", [msg(0)])  # warm up: the WAL exists from here on
    mark("batch")
    await spool.enqueue("example.com_127_0_0_2", [msg(i) for i in range(100)])
    mark("singles")
    for i in range(5):
        await spool.enqueue("example.com_127_0_0_2", [msg(i)])
    mark("end")
    await spool.close()

asyncio.run(main())
"""

SYNC = re.compile(r"\b(fsync|fdatasync)\(")
MARK = re.compile(r"epoxi-fsync-mark-(\w+)")


async def test_a_batch_of_a_hundred_costs_one_fsync(tmp_path: Path) -> None:
    assert shutil.which("strace"), "strace is not installed: run scripts/bootstrap"
    trace = tmp_path / "trace"
    proc = await asyncio.create_subprocess_exec(
        *["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,stat,newfstatat", "-o", str(trace)],
        *[sys.executable, "-c", CHILD, str(tmp_path / "spool.db")],
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()

    syncs: dict[str, int] = {}
    section = "open"
    for line in trace.read_text().splitlines():
        if m := MARK.search(line):
            section = m.group(1)
        elif SYNC.search(line):
            syncs[section] = syncs.get(section, 0) + 1
    assert syncs.get("batch") == 1, syncs  # 100 messages, one durable commit
    assert syncs.get("singles") == 5, syncs  # the probe counts: one per transaction
