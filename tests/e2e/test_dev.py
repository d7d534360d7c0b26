"""`epoxi dev` — the README's first command — routes and delivers its demo batch, keeps each
service's log in a file, and keeps the mail of earlier runs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from devmesh.launch import DEMO_RECIPIENTS

SERVICES = ("registry", "sink", "node1", "node2", "router", "monitor", "gateway", "ingress")


async def run_dev(data: Path) -> str:
    ports = [
        f"--{name}=127.0.0.1:0" for name in ("registry", "router", "monitor", "gateway", "sink", "ingress")
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "dev",
        "--exit-after-demo",
        "--data-dir",
        str(data),
        *ports,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


async def test_epoxi_dev_delivers_the_demo_batch(tmp_path: Path) -> None:
    text = await run_dev(tmp_path)
    received = [line.split() for line in text.splitlines() if line.strip().startswith("received from")]
    # "received from <peer> for <rcpt> (...)"
    peers = {words[4]: words[2] for words in received}
    for rcpt, ip in DEMO_RECIPIENTS:
        assert rcpt in peers, text
        if ip:
            assert peers[rcpt] == ip
    assert len(list((tmp_path / "sink").glob("*.eml"))) == len(DEMO_RECIPIENTS)


async def test_a_second_run_keeps_the_first_runs_mail_and_logs(tmp_path: Path) -> None:
    await run_dev(tmp_path)
    first_mail = set((tmp_path / "sink").glob("*.eml"))
    text = await run_dev(tmp_path)

    assert first_mail < set((tmp_path / "sink").glob("*.eml"))
    assert len(list((tmp_path / "sink").glob("*.eml"))) == 2 * len(DEMO_RECIPIENTS)
    logs = tmp_path / "logs"
    assert f"each service logs to {logs}/<service>.log" in text
    for name in SERVICES:
        # This run's log, and the previous run's, each from its start to its stop.
        for log in (logs / f"{name}.log", logs / f"{name}.log.1"):
            lines = log.read_text().splitlines()
            assert f"epoxi dev: {name} started, pid" in lines[0], log
            assert f"{name} listening on" in "\n".join(lines), log
            assert lines[-1].endswith("stopped: exit code 0 ---"), log
