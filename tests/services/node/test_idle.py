"""Idle pipelines stop and leave the registry; new mail brings them back."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from typing import Any

import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import policy_store
from epoxi.envelope import new_email
from epoxi.registry.client import Consul
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, node_pb2, router_pb2, router_pb2_grpc
from services.node.main import NodeConfig, RunningNode
from services.router.main import RouterConfig, start_router
from tests.services.node.support import (
    FAST,
    KEY,
    OTHER,
    SOURCE_IP,
    Stub,
    email,
    enqueue_batch,
    fast_policy,
    start,
    true_when,
)
from tests.support import CHECK_INTERVAL, eventually

IDLE = 0.3


@pytest.fixture
def node_config(node_config: NodeConfig, registry: RunningRegistry) -> NodeConfig:
    """n1, registered, stopping pipelines idle for IDLE; deferred mail stays deferred (retries an hour away)."""
    return replace(
        node_config,
        consul=registry.address,
        check_interval=CHECK_INTERVAL,
        pipeline_idle_timeout=IDLE,
        retry_base=3600.0,
    )


async def registered(consul: Consul) -> set[str]:
    _, entries = await consul.health.service("epoxi-pipeline")
    return {e["Service"]["Meta"]["routing_key"] for e in entries}


async def test_an_idle_pipeline_stops_and_one_with_unfinished_mail_does_not(
    node: RunningNode, stub: Stub, consul: Consul, sink: Sink
) -> None:
    sink.replies = {"later@example.org": "451 4.3.0 try later"}
    await start(stub)
    await start(stub, domain="example.org")
    assert await registered(consul) == {KEY, OTHER}
    await enqueue_batch(stub, KEY, email("a@example.com"))
    await enqueue_batch(stub, OTHER, email("later@example.org"))

    async def only_deferred_left() -> bool:
        return set(node.supervisor.pipelines) == {OTHER} and await registered(consul) == {OTHER}

    await eventually(only_deferred_left)
    assert sink.recipients() == ["a@example.com"]
    [info] = (await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)).pipelines
    assert info.routing_key == OTHER and info.counters.deferred == 1
    [n] = (await consul.health.service("epoxi-node"))[1]
    assert n["Service"]["Meta"]["pipeline_count"] == "1"

    # Mail for the stopped pipeline starts it again, with the policy it had.
    reply = await enqueue_batch(stub, KEY, email("b@example.com"))
    assert reply.pipeline.status == 2 and reply.pipeline.policy == FAST  # RUNNING
    await sink.wait_for(2)
    assert KEY in await registered(consul)


async def test_the_reaper_forgets_a_stopped_key_and_mail_for_it_still_starts_it(
    node: RunningNode, stub: Stub, sink: Sink
) -> None:
    n = node.supervisor
    await start(stub)
    await enqueue_batch(stub, KEY, email("a@example.com"))
    await sink.wait_for(1)

    def forgotten() -> bool:
        maps = (n.pipelines, n.idle_stopped, n.last_active, n._enqueues_begun, n._enqueuing)
        return not any(KEY in m for m in maps)

    await eventually(true_when(forgotten))  # stopped after IDLE, forgotten 2 * IDLE later
    reply = await enqueue_batch(stub, KEY, email("b@example.com"))
    assert reply.pipeline.status == 2 and reply.pipeline.policy == FAST  # RUNNING, as it was
    await sink.wait_for(2)
    assert sink.recipients() == ["a@example.com", "b@example.com"]


async def test_a_stopped_pipeline_starts_again_through_start_pipeline(
    node: RunningNode, stub: Stub, consul: Consul, sink: Sink
) -> None:
    first = await start(stub)

    async def gone() -> bool:
        return await registered(consul) == set() and not node.supervisor.pipelines

    await eventually(gone)
    again = await start(stub)
    assert (
        again.started
        and again.pipeline.started_at.ToNanoseconds() > first.pipeline.started_at.ToNanoseconds()
    )
    await enqueue_batch(stub, KEY, email("a@example.com"))
    await sink.wait_for(1)


async def test_mail_for_a_pipeline_that_just_stopped_starts_it_again(node: RunningNode, sink: Sink) -> None:
    n = node.supervisor
    p, _ = await n.start_pipeline("example.com", SOURCE_IP, fast_policy())
    assert await n.stop_if_idle(KEY, 0.0)
    await n.enqueue(p, [email("a@example.com")])  # the caller still holds the stopped pipeline
    assert n.pipelines[KEY] is not p and n.pipelines[KEY].policy == p.policy
    await sink.wait_for(1)


async def test_an_idle_stop_keeps_a_pipeline_whose_mail_is_still_being_committed(
    node: RunningNode, sink: Sink
) -> None:
    n = node.supervisor
    p, _ = await n.start_pipeline("example.com", SOURCE_IP, fast_policy())
    gate = threading.Event()
    blocked = asyncio.ensure_future(n.spool._run(gate.wait))  # holds the spool's thread
    try:
        enqueue = asyncio.create_task(n.enqueue(p, [email("a@example.com")]))
        await eventually(true_when(lambda: n._enqueuing[KEY] == 1))  # spooling, not committed
        # The counts, as of the last commit, show nothing unfinished; the enqueue keeps it.
        assert (await n.spool.counts(KEY)).unfinished == 0
        assert await n.stop_if_idle(KEY, 0.0) is False
    finally:
        gate.set()
        await blocked
    assert len(await enqueue) == 1 and n.pipelines[KEY] is p
    await sink.wait_for(1)

    async def delivered() -> bool:
        return (await n.spool.counts(KEY)).delivered == 1

    await eventually(delivered)


async def test_a_new_router_batch_restarts_an_idle_pipeline(
    node: RunningNode, registry: RunningRegistry, consul: Consul, sink: Sink
) -> None:
    # The router starts pipelines without a policy: the stored "default" (quick batches) applies.
    await policy_store.put_policy(consul, "default", FAST)

    async def loaded() -> bool:
        return node.supervisor.policies.named("default") is not None

    await eventually(loaded)
    router = await start_router(
        RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0)
    )
    try:
        async with channel(router.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            async def route(to: str) -> Any:
                async def passing_node() -> bool:
                    _, entries = await consul.health.service("epoxi-node", passing=True)
                    return bool(entries)

                await eventually(passing_node)
                e = new_email(
                    "a@sender.test", to=[to], subject="s", text="t", delivery=email_pb2.Delivery(ip=SOURCE_IP)
                )
                reply: router_pb2.RouteEmailsResponse = await stub.RouteEmails(
                    router_pb2.RouteEmailsRequest(emails=[e]), timeout=10
                )
                [batch] = reply.batches
                assert batch.ok, batch.error
                return batch

            assert (await route("a@example.com")).new_pipeline
            await sink.wait_for(1)

            async def stopped() -> bool:
                return not node.supervisor.pipelines and await registered(consul) == set()

            await eventually(stopped)
            await route("b@example.com")
            await sink.wait_for(2)
            assert KEY in await registered(consul)
            assert node.supervisor.pipelines[KEY].policy.name == "default"
            assert sink.recipients() == ["a@example.com", "b@example.com"]
    finally:
        await router.close()
