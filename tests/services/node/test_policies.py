"""Stored policies: the KV layout, the node's watch, and pipelines that follow a change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import policy_store
from epoxi.policy import Policy
from epoxi.policy_store import PolicyError, PolicyTable
from epoxi.registry.client import Consul, connect
from epoxi.registry.services import pipeline_from_entry
from epoxi.runtime.channels import channel
from epoxi.tasks import cancel_and_wait
from epoxi.v1 import node_pb2, node_pb2_grpc, pipeline_pb2
from services.node.main import RunningNode, start_node
from services.node.policy_feed import PolicyWatch
from tests.services.node.conftest import email
from tests.services.node.test_servicer import KEY, config
from tests.support import eventually

Stub = node_pb2_grpc.NodeServiceStub
OTHER = "example.org_127_0_0_2"


def stored(**fields: Any) -> pipeline_pb2.PipelinePolicy:
    return pipeline_pb2.PipelinePolicy(batch_timeout=duration_pb2.Duration(nanos=20_000_000), **fields)


# The stored form, without a registry.


def test_a_stored_policy_is_protobuf_json_named_by_its_key() -> None:
    raw = b'{"maxConnections": 3, "batch_size": 7, "batchTimeout": "0.5s", "maxRetries": 0}'
    assert policy_store.decode("bulk", raw) == Policy(
        name="bulk", max_connections=3, batch_size=7, batch_timeout=0.5, max_retries=0
    )
    assert policy_store.decode("bulk", policy_store.encode(stored(name="bulk"))).batch_timeout == 0.02


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("bulk", b"", "policy 'bulk' is empty"),
        ("bulk", b"{not json", "policy 'bulk' is not a PipelinePolicy in JSON"),
        ("bulk", b'{"maxConnection": 3}', "policy 'bulk' is not a PipelinePolicy in JSON"),
        ("bulk", b'{"name": "other"}', "policy 'bulk' carries the name 'other'"),
        (
            "bulk",
            b'{"batchTimeout": "-1s"}',
            "policy 'bulk': policy.batch_timeout must be a positive duration",
        ),
        ("no/slash", b"{}", "policy name 'no/slash' must be"),
    ],
)
def test_a_bad_stored_policy_says_why(name: str, raw: bytes, problem: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_store.decode(name, raw)
    assert str(err.value).startswith(problem)


def test_a_policy_that_turns_bad_keeps_its_last_good_version() -> None:
    good = policy_store.decode("bulk", b'{"batchSize": 7}')
    entries: list[dict[str, Any]] = [
        {"Key": "epoxi/policies/bulk", "Value": b"{broken"},
        {"Key": "epoxi/policies/fresh", "Value": b"{broken"},
        {"Key": "epoxi/policies/", "Value": None},
    ]
    found, problems = policy_store.read_policies(entries, {"bulk": good})
    assert found == {"bulk": good}
    assert [p.split(":")[0] for p in problems] == [
        "policy 'bulk' is not a PipelinePolicy in JSON",
        "policy 'fresh' is not a PipelinePolicy in JSON",
    ]
    assert problems[0].endswith("(keeping the previous version)") and problems[1].endswith("(ignored)")


def test_which_policy_a_pipeline_takes() -> None:
    bulk, default, slow = (Policy(name=n, batch_size=i) for i, n in enumerate(["bulk", "default", "slow"], 1))
    table = PolicyTable({"bulk": bulk, "default": default, "slow": slow}, {KEY: "bulk", OTHER: "missing"})
    assert table.for_new_pipeline(KEY) == bulk
    assert table.for_new_pipeline(OTHER) == default  # its assigned policy is not stored
    assert PolicyTable().for_new_pipeline(KEY) is None  # built-in defaults
    assert table.for_running_pipeline(KEY, Policy(name="slow")) == bulk  # the assignment wins
    assert table.for_running_pipeline(OTHER, Policy(name="slow")) == slow  # it follows its name
    inline = Policy(name="inline", batch_size=99)
    assert table.for_running_pipeline(OTHER, inline) is inline


# Against the development registry.


@pytest.fixture
async def consul(registry: RunningRegistry) -> AsyncIterator[Consul]:
    c = connect(registry.address)
    yield c
    await c.close()


async def test_policies_and_assignments_round_trip_through_kv(consul: Consul) -> None:
    await policy_store.put_policy(consul, "bulk", stored(name="ignored", max_connections=4))
    await policy_store.assign(consul, KEY, "bulk")
    _, raw = await consul.kv.get("epoxi/policies/bulk")
    assert json_format.Parse(raw["Value"], pipeline_pb2.PipelinePolicy()).name == ""  # the key names it
    table, problems = await policy_store.read_table(consul)
    assert problems == [] and table.assignments == {KEY: "bulk"}
    assert table.policies["bulk"] == Policy(name="bulk", max_connections=4, batch_timeout=0.02)

    with pytest.raises(PolicyError):
        await policy_store.put_policy(
            consul, "bad", stored(message_interval=duration_pb2.Duration(seconds=-5))
        )
    assert (await consul.kv.get("epoxi/policies/bad"))[1] is None
    await policy_store.unassign(consul, KEY)
    await policy_store.delete_policy(consul, "bulk")
    assert await policy_store.read_table(consul) == (PolicyTable(), [])


async def test_the_watch_follows_changes_and_ignores_bad_policies(
    consul: Consul, caplog: pytest.LogCaptureFixture
) -> None:
    tables: asyncio.Queue[PolicyTable] = asyncio.Queue()

    async def changed(table: PolicyTable) -> None:
        await tables.put(table)

    watch = PolicyWatch(consul, changed, wait="200ms")
    assert await watch.load() and watch.table == PolicyTable()
    running = asyncio.create_task(watch.run())
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


@pytest.fixture
async def node(tmp_path: Path, sink: Sink, registry: RunningRegistry) -> AsyncIterator[RunningNode]:
    n = await start_node(config(tmp_path, sink, consul=registry.address, check_interval=0.2))
    yield n
    await n.close()


@pytest.fixture
async def stub(node: RunningNode) -> AsyncIterator[Stub]:
    async with channel(node.address) as ch:
        yield node_pb2_grpc.NodeServiceStub(ch)


async def start(stub: Stub, domain: str = "example.com", **fields: Any) -> pipeline_pb2.PipelineInfo:
    reply: node_pb2.StartPipelineResponse = await stub.StartPipeline(
        node_pb2.StartPipelineRequest(domain=domain, source_ip="127.0.0.2", **fields), timeout=5
    )
    return reply.pipeline


async def policy_of(stub: Stub, key: str = KEY) -> pipeline_pb2.PipelinePolicy:
    state: node_pb2.GetNodeStateResponse = await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    [p] = [p for p in state.pipelines if p.routing_key == key]
    return p.policy


async def test_start_pipeline_by_policy_name(consul: Consul, node: RunningNode, stub: Stub) -> None:
    await policy_store.put_policy(consul, "bulk", stored(max_connections=2))
    await eventually(lambda: _has_policy(node, "bulk"))
    p = await start(stub, policy_name="bulk")
    assert (p.policy.name, p.policy.max_connections) == ("bulk", 2)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, "example.org", policy_name="nope")
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no valid policy 'nope' is stored under epoxi/policies/",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(stub, "example.org", policy_name="bulk", policy=stored(batch_size=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "give policy or policy_name, not both"


async def _has_policy(node: RunningNode, name: str) -> bool:
    return node.node.policies.named(name) is not None


async def test_without_a_policy_a_pipeline_takes_its_assignment_else_default(
    consul: Consul, node: RunningNode, stub: Stub
) -> None:
    assert (await start(stub, "example.net")).policy.name == "example.net_127_0_0_2"  # built-in
    await policy_store.put_policy(consul, "default", stored(batch_size=11))
    await policy_store.put_policy(consul, "bulk", stored(batch_size=22))
    await policy_store.assign(consul, KEY, "bulk")

    async def loaded() -> bool:
        return node.node.policies.assignments.get(KEY) == "bulk" and await _has_policy(node, "default")

    await eventually(loaded)
    assert (await start(stub)).policy.batch_size == 22
    assert (await start(stub, "example.org")).policy.batch_size == 11
    assert (await start(stub, "example.info", policy=stored(batch_size=33))).policy.batch_size == 33


async def test_a_policy_changed_in_kv_reaches_the_running_pipeline_without_losing_mail(
    consul: Consul, node: RunningNode, stub: Stub, sink: Sink
) -> None:
    # Paced: 20 messages at once, then 20 a second, so mail is still flowing at the change.
    await policy_store.put_policy(consul, "paced", stored(allowed_messages=20, max_connections=1))
    await eventually(lambda: _has_policy(node, "paced"))
    await start(stub, policy_name="paced")
    total = 60
    for i in range(0, total, 10):
        await stub.EnqueueBatch(
            node_pb2.EnqueueBatchRequest(
                routing_key=KEY, emails=[email(f"r{i + j}@example.com") for j in range(10)]
            ),
            timeout=5,
        )
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
        state: node_pb2.GetNodeStateResponse = await stub.GetNodeState(
            node_pb2.GetNodeStateRequest(), timeout=5
        )
        return state.pipelines[0].counters.delivered == total

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
    before = (await start(stub, policy_name="a")).policy
    await start(stub, "example.org", policy_name="b")

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
