"""The node in the registry, against the development registry over Consul's HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.registry.client import Consul, connect
from epoxi.registry.services import node_from_entry, passing, pipeline_from_entry
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.engine.delivery import Destinations, Host, SmtpSender
from services.node.engine.pipeline import Retry
from services.node.engine.spool import Spool
from services.node.main import RunningNode, start_node
from services.node.registration import Registrar
from services.node.supervisor import Node
from tests.services.node.conftest import SOURCE_IP, email, fast_policy
from tests.services.node.test_pipeline import _Flaky
from tests.services.node.test_servicer import FAST, KEY, config
from tests.support import eventually

PIPELINE_ID = f"epoxi-pipeline-n1-{KEY}"


@pytest.fixture
async def consul(registry: RunningRegistry) -> AsyncIterator[Consul]:
    c = connect(registry.address)
    yield c
    await c.close()


@pytest.fixture
async def node(tmp_path: Path, sink: Sink, registry: RunningRegistry) -> AsyncIterator[RunningNode]:
    n = await start_node(config(tmp_path, sink, consul=registry.address, check_interval=0.2))
    yield n
    await n.close()


async def health(consul: Consul, service: str) -> list[dict[str, Any]]:
    _, entries = await consul.health.service(service)
    return list(entries)


def output(entry: dict[str, Any]) -> str:
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    return str(check["Output"])


async def start_pipeline(node: RunningNode) -> None:
    async with channel(node.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        await stub.StartPipeline(
            node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP, policy=FAST)
        )


async def test_the_node_registers_itself_with_a_passing_grpc_check(node: RunningNode, consul: Consul) -> None:
    async def passing_node() -> list[dict[str, Any]]:
        return [e for e in await health(consul, "epoxi-node") if passing(e)]

    [entry] = await eventually(passing_node)
    info = node_from_entry(entry)
    assert (info.id, info.address, list(info.egress_ips), info.ip_pool) == (
        "n1",
        node.address,
        [SOURCE_IP, "127.0.0.3"],
        "default",
    )
    assert set(entry["Service"]["Tags"]) == {f"ip:{SOURCE_IP}", "ip:127.0.0.3", "pool:default"}
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    assert check["Type"] == "grpc"


async def test_a_pipeline_appears_passing_with_its_state_and_follows_its_counts(
    node: RunningNode, consul: Consul, sink: Sink
) -> None:
    await start_pipeline(node)
    [entry] = await health(consul, "epoxi-pipeline")
    assert passing(entry)
    assert output(entry) == "running: 0 queued, 0 in flight, 0 deferred, 0 delivered, 0 bounced"
    info = pipeline_from_entry(entry)
    assert (info.name, info.routing_key, info.node, info.address, info.domain, info.source_ip) == (
        PIPELINE_ID,
        KEY,
        "n1",
        node.address,
        "example.com",
        SOURCE_IP,
    )
    assert info.policy == FAST
    assert "node:n1" in entry["Service"]["Tags"] and KEY in entry["Service"]["Tags"]
    [n] = await health(consul, "epoxi-node")
    assert node_from_entry(n).pipeline_count == 1

    p = node.node.pipelines[KEY]
    await node.node.enqueue(p, [email("a@example.com"), email("b@example.com")])
    await sink.wait_for(2)

    async def counted() -> bool:
        [e] = await health(consul, "epoxi-pipeline")
        return output(e) == "running: 0 queued, 0 in flight, 0 deferred, 2 delivered, 0 bounced"

    await eventually(counted)
    [n] = await health(consul, "epoxi-node")
    assert node_from_entry(n).load == 0


async def test_stopping_a_pipeline_deregisters_it(node: RunningNode, consul: Consul) -> None:
    await start_pipeline(node)
    assert len(await health(consul, "epoxi-pipeline")) == 1
    async with channel(node.address) as ch:
        await node_pb2_grpc.NodeServiceStub(ch).StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY))
    assert await health(consul, "epoxi-pipeline") == []
    [n] = await health(consul, "epoxi-node")
    assert node_from_entry(n).pipeline_count == 0


async def test_shutting_down_deregisters_pipelines_and_the_node(
    tmp_path: Path, sink: Sink, registry: RunningRegistry, consul: Consul
) -> None:
    n = await start_node(config(tmp_path, sink, consul=registry.address, check_interval=0.2))
    try:
        await start_pipeline(n)
        assert len(await health(consul, "epoxi-pipeline")) == 1
        assert len(await health(consul, "epoxi-node")) == 1
    finally:
        await n.close()
    assert await health(consul, "epoxi-pipeline") == []
    assert await health(consul, "epoxi-node") == []


async def test_a_pipeline_the_registry_lost_is_registered_again(node: RunningNode, consul: Consul) -> None:
    await start_pipeline(node)
    await consul.agent.service.deregister(PIPELINE_ID)

    async def back() -> list[dict[str, Any]]:
        return [e for e in await health(consul, "epoxi-pipeline") if passing(e)]

    [entry] = await eventually(back)
    assert entry["Service"]["ID"] == PIPELINE_ID


async def test_a_node_the_registry_lost_is_registered_again(node: RunningNode, consul: Consul) -> None:
    assert len(await health(consul, "epoxi-node")) == 1
    await consul.agent.service.deregister("n1")  # as if the registry restarted empty
    assert await health(consul, "epoxi-node") == []

    async def back() -> list[dict[str, Any]]:
        return await health(consul, "epoxi-node")

    [entry] = await eventually(back)
    assert entry["Service"]["ID"] == "n1"


async def test_a_crashed_pipeline_shows_critical_until_it_recovers(
    tmp_path: Path, sink: Sink, consul: Consul
) -> None:
    flaky = _Flaky(SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "n1.epoxi.test"))
    spool = await Spool.open(tmp_path / "spool.db")
    node = Node(
        id="n1",
        address="127.0.0.1:1",
        egress_ips=[SOURCE_IP],
        ip_pool="default",
        spool=spool,
        sender=flaky,
        retry=Retry(0.01, 0.05),
        restart_delay=0.05,
    )
    node.registrar = Registrar(consul, node.snapshot, interval=0.2)
    refresher = asyncio.create_task(node.registrar.run())
    try:
        p, _ = await node.start_pipeline("example.com", SOURCE_IP, fast_policy())
        await node.enqueue(p, [email("a@example.com")])

        async def critical() -> str:
            [e] = await health(consul, "epoxi-pipeline")
            return "" if passing(e) else output(e)

        assert (await eventually(critical)).startswith("failed (RuntimeError: boom), restarting: 1 queued")

        flaky.healed.set()
        await sink.wait_for(1)

        async def recovered() -> bool:
            [e] = await health(consul, "epoxi-pipeline")
            return passing(e) and output(e).startswith(
                "running: 0 queued, 0 in flight, 0 deferred, 1 delivered"
            )

        await eventually(recovered)
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await node.registrar.deregister_all(node.id)  # the service lifecycle's step before the stop
        await node.close()
        await spool.close()
    assert await health(consul, "epoxi-pipeline") == []


async def test_starting_a_pipeline_touches_only_that_pipeline_in_the_registry(
    tmp_path: Path, sink: Sink, registry: RunningRegistry
) -> None:
    """A start registers the new pipeline; it does not re-send every other pipeline's TTL."""
    # A long interval, so only the starts themselves sync during the test.
    n = await start_node(config(tmp_path, sink, consul=registry.address, check_interval=60))
    calls: list[str] = []
    assert n.node.registrar is not None
    agent = n.node.registrar.consul.agent
    for obj, name in ((agent.service, "register"), (agent.check, "ttl_pass")):
        real = getattr(obj, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        setattr(obj, name, counted)
    try:
        for i in range(20):
            await n.node.start_pipeline(f"d{i}.example", SOURCE_IP, fast_policy(f"d{i}.example_127_0_0_2"))
        calls.clear()
        await n.node.start_pipeline("last.example", SOURCE_IP, fast_policy("last.example_127_0_0_2"))
        # The new pipeline's service and its first TTL pass, and the node's new pipeline count.
        assert sorted(calls) == ["register", "register", "ttl_pass"], calls
    finally:
        await n.close()
