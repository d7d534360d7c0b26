from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from devmesh.registry.app import serve
from devmesh.sink import Sink
from epoxi.registry.client import connect
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.main import NodeConfig, parse_config
from tests.services.node.support import SOURCE_IP

REPO = Path(__file__).resolve().parents[3]


def parse(argv: list[str]) -> NodeConfig:
    return parse_config(argv)


def test_flags_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPOXI_NODE_ID", "env-node")
    monkeypatch.setenv("EPOXI_NODE_EGRESS_IP", "127.0.0.2,127.0.0.3")
    monkeypatch.setenv("EPOXI_NODE_ROUTE", "*=127.0.0.1:2525")
    monkeypatch.setenv("EPOXI_NODE_CHECK_INTERVAL", "1s")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8501")
    c = parse([])
    assert (c.id, list(c.egress_ips), dict(c.routes), c.check_interval, c.consul) == (
        "env-node",
        ["127.0.0.2", "127.0.0.3"],
        {"*": "127.0.0.1:2525"},
        1.0,
        "127.0.0.1:8501",
    )
    assert c.spool_path == Path("var/env-node/spool.db")
    flags = parse(["--id", "n9", "--egress-ip", "10.0.0.1", "--route", "a.test=h:25"])
    assert (flags.id, list(flags.egress_ips), dict(flags.routes)) == ("n9", ["10.0.0.1"], {"a.test": "h:25"})


async def read_until(
    stream: asyncio.StreamReader, pattern: re.Pattern[str], seen: list[str]
) -> re.Match[str]:
    while line := (await stream.readline()).decode():
        seen.append(line)
        if m := pattern.fullmatch(line.rstrip("\n")):
            return m
    raise AssertionError(f"the node exited without {pattern.pattern!r}: {''.join(seen)}")


async def test_the_node_process_announces_itself_and_leaves_the_registry_on_sigterm(
    tmp_path: Path, sink: Sink
) -> None:
    registry = await serve("127.0.0.1", 0)
    consul = connect(registry.address)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "EPOXI_"))}
    # services.node.__main__ is what `python -m services.node` runs.
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "services.node", "--id", "cli1", "--listen", "127.0.0.1:0"],
        *["--egress-ip", SOURCE_IP, "--spool", str(tmp_path / "spool.db"), "--route", f"*={sink.address}"],
        *["--consul", registry.address, "--check-interval", "500ms"],
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            ready = await read_until(
                proc.stdout, re.compile(r"node cli1 listening on (127\.0\.0\.1:\d+)"), seen
            )
        address = ready.group(1)
        async with channel(address) as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            await stub.StartPipeline(node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP))
            state: node_pb2.GetNodeStateResponse = await stub.GetNodeState(node_pb2.GetNodeStateRequest())
        assert state.node.address == address and len(state.pipelines) == 1
        registered: list[Any] = [
            (await consul.health.service(s))[1] for s in ("epoxi-node", "epoxi-pipeline")
        ]
        assert [len(r) for r in registered] == [1, 1]

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest, _ = await proc.communicate()
        assert proc.returncode == 0, "".join(seen) + rest.decode()
        for service in ("epoxi-node", "epoxi-pipeline"):
            assert (await consul.health.service(service))[1] == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await consul.close()
        await registry.close()
