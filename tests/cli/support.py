"""Helpers for the ``epoxi`` command's tests: the real command as a subprocess, the mesh's
nodes and fast default policy, and what the mesh's sink and a failed file hold."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devmesh.supervisor import NodeSpec
from epoxi import policy_store
from epoxi.registry import client
from tests.support import stored_policy

# node1 and node2 share 127.0.0.2, so a rebalance can move pipelines on it between them; .3
# is node1's alone and .4 node2's.
NODES = [NodeSpec("node1", ["127.0.0.2", "127.0.0.3"]), NodeSpec("node2", ["127.0.0.2", "127.0.0.4"])]


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def epoxi(*args: str, stdin: bytes | None = None, seconds: float = 120) -> Run:
    """``python -m cli ARGS``: the real ``epoxi`` command, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "EPOXI_MONITOR": ""},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), seconds)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def store_fast_default_policy(registry: str) -> None:
    """Pipelines started from now on send a batch at once (20 ms batch timeout) and are not
    held by the default rate limit (1000 a minute) during a bulk test."""
    consul = client.connect(registry)
    try:
        await policy_store.put_policy(
            consul, policy_store.DEFAULT_POLICY, stored_policy(allowed_messages=1_000_000)
        )
    finally:
        await consul.close()


def failed_entries(path: Path | str) -> list[dict[str, Any]]:
    """The entries of a failed file ``epoxi send --file`` wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def delivered(maildir: Path) -> list[str]:
    """The envelope recipients of every message the mesh's sink wrote to ``maildir``."""
    found: list[str] = []
    for path in maildir.glob("*.eml") if maildir.exists() else ():
        with path.open("rb") as f:
            f.readline()  # X-Epoxi-Peer
            to = f.readline().decode().removeprefix("X-Epoxi-Envelope-To:").strip()
        found += [r.strip() for r in to.split(",") if r.strip()]
    return found
