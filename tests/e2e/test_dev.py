"""`epoxi dev` — the README's first command — routes and delivers its demo batch."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from devmesh.launch import DEMO_RECIPIENTS


async def test_epoxi_dev_delivers_the_demo_batch(tmp_path: Path) -> None:
    ports = [f"--{name}=127.0.0.1:0" for name in ("registry", "router", "monitor", "gateway", "sink")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "dev",
        "--exit-after-demo",
        "--data-dir",
        str(tmp_path),
        *ports,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    received = [line.split() for line in text.splitlines() if line.strip().startswith("received from")]
    # "received from <peer> for <rcpt> (...)"
    peers = {words[4]: words[2] for words in received}
    for rcpt, ip in DEMO_RECIPIENTS:
        assert rcpt in peers, text
        if ip:
            assert peers[rcpt] == ip
    assert len(list((tmp_path / "sink").glob("*.eml"))) == len(DEMO_RECIPIENTS)
