"""Stored policies: the KV layout (``epoxi.policy_store``), the node's feed, and pipelines that
follow a change."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import policy_store
from epoxi.policy import Policy
from epoxi.policy_store import PolicyTable
from epoxi.registry.client import Consul
from epoxi.registry.services import pipeline_from_entry
from epoxi.tasks import cancel_and_wait
from epoxi.v1 import pipeline_pb2
from services.node.main import NodeConfig, RunningNode
from services.node.policy_feed import PolicyFeed
from tests.services.node.support import KEY, OTHER, Stub, enqueue_numbered, start, state
from tests.support import CHECK_INTERVAL, eventually
from tests.support import stored_policy as stored


@pytest.fixture
def node_config(node_config: NodeConfig, registry: RunningRegistry) -> NodeConfig:
    """n1, registered and following the stored policies."""
    return replace(node_config, consul=registry.address, check_interval=CHECK_INTERVAL)


async def test_the_feed_follows_changes_and_ignores_bad_policies(
    consul: Consul, caplog: pytest.LogCaptureFixture
) -> None:
    tables: asyncio.Queue[PolicyTable] = asyncio.Queue()

    async def changed(table: PolicyTable) -> None:
        await tables.put(table)

    feed = PolicyFeed(consul, wait="200ms")
    assert await feed.load() and feed.table == PolicyTable()
    running = asyncio.create_task(feed.run(changed))
    try:
        await policy_store.put_policy(consul, "bulk", stored(batch_size=5))
        table = await asyncio.wait_for(tables.get(), 10)
        assert table.policies["bulk"].batch_size == 5

        with caplog.at_level(logging.WARNING, "services.node.policy_feed"):
            await consul.kv.put("epoxi/policies/bulk", '{"batchSize": "many"}')
            await policy_store.put_policy(consul, "other", stored())
            table = await asyncio.wait_for(tables.get(), 10)
        # Only a real change is reported, and the bad version of "bulk" was read before "other".
        assert set(table.policies) == {"bulk", "other"} and table.policies["bulk"].batch_size == 5
        assert "policy 'bulk' is not a PipelinePolicy in JSON" in caplog.text
        assert "keeping the previous version" in caplog.text

        await policy_store.assign(consul, KEY, "bulk")
        table = await asyncio.wait_for(tables.get(), 10)
        assert table.assignments == {KEY: "bulk"}
        await policy_store.delete_policy(consul, "bulk")
        table = await asyncio.wait_for(tables.get(), 10)
        assert set(table.policies) == {"other"}
        assert tables.empty()
    finally:
        await cancel_and_wait(running)


# A node following the stored policies.


async def policy_of(stub: Stub, key: str = KEY) -> pipeline_pb2.PipelinePolicy:
    [p] = [p for p in (await state(stub)).pipelines if p.routing_key == key]
    return p.policy


async def test_start_pipeline_by_policy_name(consul: Consul, node: RunningNode, stub: Stub) -> None:
    await policy_store.put_policy(consul, "bulk", stored(max_connections=2))
    await eventually(lambda: _has_policy(node, "bulk"))
    p = (await start(stub, policy=None, policy_name="bulk")).pipeline
    assert (p.policy.name, p.policy.max_connections) == ("bulk", 2)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, "example.org", policy=None, policy_name="nope")
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no valid policy 'nope' is stored under epoxi/policies/",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, "example.org", policy_name="bulk", policy=stored(batch_size=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "give policy or policy_name, not both"


async def _has_policy(node: RunningNode, name: str) -> bool:
    return node.supervisor.policies.named(name) is not None


async def test_without_a_policy_a_pipeline_takes_its_assignment_else_default(
    consul: Consul, node: RunningNode, stub: Stub
) -> None:
    assert (
        await start(stub, "example.net", policy=None)
    ).pipeline.policy.name == "example.net_127_0_0_2"  # built-in
    await policy_store.put_policy(consul, "default", stored(batch_size=11))
    await policy_store.put_policy(consul, "bulk", stored(batch_size=22))
    await policy_store.assign(consul, KEY, "bulk")

    async def loaded() -> bool:
        return node.supervisor.policies.assignments.get(KEY) == "bulk" and await _has_policy(node, "default")

    await eventually(loaded)
    assert (await start(stub, policy=None)).pipeline.policy.batch_size == 22
    assert (await start(stub, "example.org", policy=None)).pipeline.policy.batch_size == 11
    assert (await start(stub, "example.info", policy=stored(batch_size=33))).pipeline.policy.batch_size == 33


async def test_a_policy_changed_in_kv_reaches_the_running_pipeline_without_losing_mail(
    consul: Consul, node: RunningNode, stub: Stub, sink: Sink
) -> None:
    # Paced: 20 messages at once, then 20 a second, so mail is still flowing at the change.
    await policy_store.put_policy(consul, "paced", stored(allowed_messages=20, max_connections=1))
    await eventually(lambda: _has_policy(node, "paced"))
    await start(stub, policy=None, policy_name="paced")
    total = 60
    await enqueue_numbered(stub, total)
    await sink.wait_for(1)

    faster = stored(allowed_messages=1000, max_connections=4, batch_size=25)
    await policy_store.put_policy(consul, "paced", faster)
    expected = Policy.from_proto(faster, "paced").to_proto()

    async def changed() -> bool:
        return await policy_of(stub) == expected

    await eventually(changed)
    assert len(sink.recipients()) < total  # the change came while mail was still flowing

    async def registered() -> bool:
        _, entries = await consul.health.service("epoxi-pipeline")
        return [pipeline_from_entry(e).policy for e in entries] == [expected]

    await eventually(registered)  # the registry's copy of the policy follows too
    await sink.wait_for(total)

    async def all_delivered() -> bool:
        return (await state(stub)).pipelines[0].counters.delivered == total

    await eventually(all_delivered)
    assert sorted(sink.recipients()) == sorted(f"r{i}@example.com" for i in range(total))
    saved = await node.spool.pipeline(KEY)  # a restart resumes with the policy in force
    assert saved is not None and saved.policy.to_proto() == expected


async def test_a_bad_policy_change_is_ignored_and_the_pipeline_keeps_its_policy(
    consul: Consul, node: RunningNode, stub: Stub
) -> None:
    await policy_store.put_policy(consul, "a", stored(batch_size=5))
    await policy_store.put_policy(consul, "b", stored(batch_size=6))
    await eventually(lambda: _has_policy(node, "b"))
    before = (await start(stub, policy_name="a", policy=None)).pipeline.policy
    await start(stub, "example.org", policy=None, policy_name="b")

    await consul.kv.put("epoxi/policies/a", '{"batchTimeout": "-3s"}')
    await policy_store.put_policy(consul, "b", stored(batch_size=7))  # written after the bad one

    async def b_changed() -> bool:
        return (await policy_of(stub, OTHER)).batch_size == 7

    await eventually(b_changed)  # so the bad version of "a" has been read by now
    assert await policy_of(stub) == before

    await policy_store.assign(consul, KEY, "b")  # and an assignment moves it to another policy

    async def moved() -> bool:
        return (await policy_of(stub)).name == "b"

    await eventually(moved)
