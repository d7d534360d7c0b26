"""The node in the registry, against the development registry over Consul's HTTP API."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.registry.client import Consul
from epoxi.registry.services import node_from_entry, passing, pipeline_from_entry
from epoxi.runtime.channels import channel
from epoxi.tasks import cancel_and_wait
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.main import NodeConfig, RunningNode, start_node
from services.node.registration import Registrar
from tests.services.node.support import (
    FAST,
    KEY,
    OTHER,
    SOURCE_IP,
    Flaky,
    MakeSupervisor,
    email,
    fast_policy,
    smtp_to,
    start,
)
from tests.support import CHECK_INTERVAL, eventually

PIPELINE_ID = f"epoxi-pipeline-n1-{KEY}"


@pytest.fixture
def node_config(node_config: NodeConfig, registry: RunningRegistry) -> NodeConfig:
    """n1, registered."""
    return replace(node_config, consul=registry.address, check_interval=CHECK_INTERVAL)


async def health(consul: Consul, service: str) -> list[dict[str, Any]]:
    _, entries = await consul.health.service(service)
    return list(entries)


def output(entry: dict[str, Any]) -> str:
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    return str(check["Output"])


async def start_pipeline(node: RunningNode) -> None:
    async with channel(node.address) as ch:
        await start(node_pb2_grpc.NodeServiceStub(ch))


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
    # Probed every 1 s at most, whatever the shorter interval asked: a 200 ms timeout would turn
    # one slow moment into a lost session.
    assert (check["Interval"], check["Timeout"]) == ("200ms", "1s")


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

    p = node.supervisor.pipeline(KEY)
    assert p is not None
    await node.supervisor.enqueue(p, [email("a@example.com"), email("b@example.com")])
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
    node_config: NodeConfig, consul: Consul
) -> None:
    n = await start_node(node_config)
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
    make_supervisor: MakeSupervisor, sink: Sink, consul: Consul
) -> None:
    flaky = Flaky(smtp_to(sink))
    registrar = Registrar(consul, interval=0.2)
    supervisor = make_supervisor(sender=flaky, hooks=[registrar], restart_delay=0.05)
    refresher = asyncio.create_task(registrar.run(supervisor.snapshot))
    try:
        p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
        await supervisor.enqueue(p, [email("a@example.com")])

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
        await cancel_and_wait(refresher)
        await registrar.deregister_all(supervisor.id)  # the service lifecycle's step before the stop
        await supervisor.close()
    assert await health(consul, "epoxi-pipeline") == []


async def test_starting_a_pipeline_touches_only_that_pipeline_in_the_registry(
    node_config: NodeConfig,
) -> None:
    """A start registers the new pipeline; it does not re-send every other pipeline's TTL."""
    # A long interval, so only the starts themselves sync during the test.
    n = await start_node(replace(node_config, check_interval=60))
    calls: list[str] = []
    assert n.registrar is not None
    agent = n.registrar.consul.agent
    for obj, name in ((agent.service, "register"), (agent.check, "ttl_pass")):
        real = getattr(obj, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        setattr(obj, name, counted)
    try:
        for i in range(20):
            await n.supervisor.start_pipeline(
                f"d{i}.example", SOURCE_IP, fast_policy(f"d{i}.example_127_0_0_2")
            )
        calls.clear()
        await n.supervisor.start_pipeline("last.example", SOURCE_IP, fast_policy("last.example_127_0_0_2"))
        # The new pipeline's service and its first TTL pass, and the node's new pipeline count.
        assert sorted(calls) == ["register", "register", "ttl_pass"], calls
    finally:
        await n.close()


async def test_hook_events_wait_for_the_registry_only_while_the_registrar_runs(
    make_supervisor: MakeSupervisor, consul: Consul
) -> None:
    registrar = Registrar(consul, interval=60)  # rounds come from the events alone
    supervisor = make_supervisor(hooks=[registrar])
    # Before ``run``: an event waits for nothing; the first round registers what runs by then.
    await asyncio.wait_for(supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy()), 5)
    assert await health(consul, "epoxi-pipeline") == []
    refresher = asyncio.create_task(registrar.run(supervisor.snapshot))
    try:
        await eventually(lambda: health(consul, "epoxi-pipeline"))
        await supervisor.start_pipeline("example.org", SOURCE_IP, fast_policy(OTHER))
        # The start returned once its round was done: the registry shows it already.
        assert {e["Service"]["Meta"]["routing_key"] for e in await health(consul, "epoxi-pipeline")} == {
            KEY,
            OTHER,
        }
        await supervisor.stop_pipeline(OTHER)
        assert [e["Service"]["Meta"]["routing_key"] for e in await health(consul, "epoxi-pipeline")] == [KEY]
    finally:
        await cancel_and_wait(refresher)
    await registrar.deregister_all(supervisor.id)
    # After leaving, nothing registers again: not an event, not a sync.
    await asyncio.wait_for(supervisor.start_pipeline("example.org", SOURCE_IP, fast_policy(OTHER)), 5)
    await registrar.sync(supervisor.snapshot)
    assert await health(consul, "epoxi-pipeline") == []
    assert await health(consul, "epoxi-node") == []
