"""Helpers shared by the tests: waiting for a condition, reading the registry, and starting real nodes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import duration_pb2

from epoxi import policy_store
from epoxi.envelope import new_email
from epoxi.registry import client, services
from epoxi.runtime.channels import Channels
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, pipeline_pb2
from services.node.main import NodeConfig, RunningNode, start_node

T = TypeVar("T")

SOURCE_IP = "127.0.0.2"
# Seconds: the registry's probes and TTLs run fast in tests.
CHECK_INTERVAL = 0.2


def valid_email(sender: str = "Ann <ann@example.com>", **fields: Any) -> email_pb2.Email:
    """An email the router accepts: one recipient, a subject and a text body, unless overridden."""
    return new_email(sender, **{"to": ["bob@example.org"], "subject": "Hi", "text": "hello", **fields})


def stored_policy(**fields: Any) -> pipeline_pb2.PipelinePolicy:
    """A policy to store in KV, with a 20 ms batch timeout so tests never wait on the default."""
    return pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=20_000_000), **fields)


async def batch_without_waiting(registry_addr: str) -> None:
    """Store a default policy with a 20 ms batch timeout in the registry at ``registry_addr``
    (with $CONSUL_HTTP_TOKEN*), so pipelines that processes start later send new mail at once."""
    consul = client.connect(registry_addr)
    try:
        await policy_store.put_policy(consul, policy_store.DEFAULT_POLICY, stored_policy())
    finally:
        await consul.close()


async def eventually(
    check: Callable[[], Awaitable[T | None]], seconds: float = 30.0, step: float = 0.02
) -> T:
    """Poll ``check`` until it returns something truthy, and return that; fail after ``seconds``
    (generous: a loaded machine may take a while to run a registry check, and only a failure
    waits it out). ``None``, ``False`` and empty values all mean "not yet"."""
    async with asyncio.timeout(seconds):
        while True:
            if result := await check():
                return result
            await asyncio.sleep(step)


def unused_address() -> str:
    """A 127.0.0.1 address nothing listens on (a port bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def passing_nodes(consul: Any) -> set[str]:
    """The IDs of the nodes the registry shows passing."""
    _, entries = await consul.health.service(services.NODE_SERVICE, passing=True)
    return {e["Service"]["ID"] for e in entries}


class Nodes:
    """Starts real nodes that deliver to one sink (and register when given a registry); closes
    them all at the end."""

    def __init__(self, data: Path, sink: str, registry: str | None = None) -> None:
        self.data = data
        self.sink = sink
        self.registry = registry
        self.running: dict[str, RunningNode] = {}
        self.channels = Channels()

    def config(self, id: str, *egress_ips: str, **overrides: Any) -> NodeConfig:
        fields: dict[str, Any] = {
            "id": id,
            "egress_ips": list(egress_ips),
            "spool": self.data / id / "spool.db",
            "routes": {"*": self.sink},
            "consul": self.registry,
            "check_interval": CHECK_INTERVAL,
            "stop_grace": 1.0,
            **overrides,
        }
        return NodeConfig(**fields)

    async def start(self, id: str, *egress_ips: str, **overrides: Any) -> RunningNode:
        node = self.running[id] = await start_node(self.config(id, *egress_ips, **overrides))
        return node

    def stub(self, id: str) -> node_pb2_grpc.NodeServiceStub:
        return self.stub_at(self.running[id].address)

    def stub_at(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self.channels.get(address))

    async def start_pipeline(self, id: str, domain: str, ip: str) -> None:
        # A short batch timeout, so enqueued mail goes out at once.
        policy = pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=50_000_000))
        await self.stub(id).StartPipeline(
            node_pb2.StartPipelineRequest(domain=domain, source_ip=ip, policy=policy), timeout=5
        )

    async def close(self) -> None:
        try:
            await asyncio.gather(*(n.close() for n in self.running.values()))
        finally:
            await self.channels.close()
