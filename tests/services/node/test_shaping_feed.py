"""Shaping rules in the registry's KV store reach a running node while mail flows, over gRPC."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest
from google.protobuf import duration_pb2

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import shaping
from epoxi.registry.client import Consul
from epoxi.v1 import node_pb2, shaping_pb2
from services.node.main import NodeConfig, RunningNode
from tests.services.node.support import KEY, Stub, email, enqueue_numbered, fast_policy, start, state
from tests.support import CHECK_INTERVAL, eventually


@pytest.fixture
def node_config(node_config: NodeConfig, registry: RunningRegistry) -> NodeConfig:
    # example.com is routed to the sink by name, so its site is the sink's host:port.
    routes = {**node_config.routes, "example.com": node_config.routes["*"]}
    return replace(
        node_config,
        consul=registry.address,
        check_interval=CHECK_INTERVAL,
        policy_watch_wait=0.2,
        routes=routes,
    )


async def listed(stub: Stub) -> list[shaping_pb2.ShapingAdjustment]:
    reply = await stub.ListShaping(shaping_pb2.ListShapingRequest(), timeout=5)
    return list(reply.adjustments)


async def test_a_rule_put_in_kv_while_mail_flows_takes_effect_and_loses_nothing(
    consul: Consul, node: RunningNode, stub: Stub, sink: Sink
) -> None:
    slow = {"on": True}
    seen: list[str] = []

    def reply(rcpt: str) -> str | None:
        seen.append(rcpt)
        return "451 4.3.2 Please slow down, sender" if slow["on"] and len(seen) % 3 == 0 else None

    sink.reply_rule = reply
    # Retries enough that refused mail is still being retried when the rule arrives.
    await start(stub, policy=fast_policy(max_retries=1000).to_proto())
    total = 60
    await enqueue_numbered(stub, total)
    await sink.wait_for(5)
    assert await listed(stub) == []  # no built-in rule matches this reply

    rule = shaping_pb2.ShapingRule(
        code="451",
        text="slow down",
        action=shaping_pb2.SHAPING_ACTION_SUSPEND,
        duration=duration_pb2.Duration(nanos=300_000_000),
    )
    await consul.kv.put(shaping.RULES + "slow-down", shaping.encode(rule))

    async def suspended() -> list[shaping_pb2.ShapingAdjustment] | None:
        found = await listed(stub)
        return found or None

    adjustment = (await eventually(suspended, 20))[0]
    assert adjustment.rule == "slow-down" and adjustment.action == shaping_pb2.SHAPING_ACTION_SUSPEND
    assert adjustment.reply == "451 4.3.2 Please slow down, sender"
    assert adjustment.site == sink.address and adjustment.routing_keys == [KEY] and adjustment.node == "n1"
    stats = await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(routing_key=KEY), timeout=5)
    assert stats.pipelines[0].site == sink.address

    slow["on"] = False

    async def all_delivered() -> bool:
        return (await state(stub)).pipelines[0].counters.delivered == total

    await eventually(all_delivered, 30)
    assert sorted(set(sink.recipients())) == sorted(f"r{i}@example.com" for i in range(total))
    assert (await state(stub)).pipelines[0].counters.bounced == 0


async def test_clear_shaping_over_grpc(consul: Consul, node: RunningNode, stub: Stub, sink: Sink) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ClearShaping(shaping_pb2.ClearShapingRequest(site=""), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ClearShaping(shaping_pb2.ClearShapingRequest(site="s", source_ip="not-an-ip"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not an IP address" in (
        e.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ClearShaping(shaping_pb2.ClearShapingRequest(site=sink.address), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # A long suspension, triggered by the first message, then cleared: the mail goes at once.
    rule = shaping_pb2.ShapingRule(
        code="421", action=shaping_pb2.SHAPING_ACTION_SUSPEND, duration=duration_pb2.Duration(seconds=3600)
    )
    await consul.kv.put(shaping.RULES + "hold", shaping.encode(rule))
    first = {"done": False}

    def reply(rcpt: str) -> str | None:
        if first["done"]:
            return None
        first["done"] = True
        return "421 4.7.0 not now"

    async def loaded() -> bool:
        return "hold" in node.supervisor.shaper.table.rules

    await eventually(loaded, 10)
    sink.reply_rule = reply
    await start(stub)
    await stub.EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email(f"r{i}@example.com") for i in range(5)]),
        timeout=5,
    )

    async def held() -> bool:
        return bool(await listed(stub))

    await eventually(held, 10)
    stats = await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(routing_key=KEY), timeout=5)
    shaped = stats.pipelines[0].shaping
    assert (stats.pipelines[0].site, shaped.rule, shaped.action) == (
        sink.address,
        "hold",
        shaping_pb2.SHAPING_ACTION_SUSPEND,
    )
    assert shaped.reply == "421 4.7.0 not now" and shaped.until.seconds > time.time() + 3000
    cleared = await stub.ClearShaping(shaping_pb2.ClearShapingRequest(site=sink.address), timeout=5)
    assert [c.rule for c in cleared.cleared] == ["hold"]
    await sink.wait_for(5, 20)
    assert await listed(stub) == []
