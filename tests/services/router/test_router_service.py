"""The router over real gRPC, in front of real nodes, a real dev registry and a real SMTP sink."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.envelope import new_email
from epoxi.registry.client import Consul
from epoxi.v1 import email_pb2
from services.node.main import RunningNode
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.services.router.support import route
from tests.support import Nodes, eventually, passing_nodes


def email(to: str, ip: str) -> email_pb2.Email:
    return new_email("a@sender.test", to=[to], subject="s", text="t", delivery=email_pb2.Delivery(ip=ip))


async def start_nodes(nodes: Nodes, consul: Consul, owners: dict[str, list[str]]) -> list[RunningNode]:
    """Start a registered node per ``owners`` entry (ID: egress IPs) and wait until all pass."""
    started = [await nodes.start(node_id, *ips, retry_base=0.05) for node_id, ips in owners.items()]
    await eventually(lambda: contains_all(passing_nodes(consul), set(owners)), seconds=20)
    return started


async def contains_all(ids: Awaitable[set[str]], wanted: set[str]) -> bool:
    return await ids >= wanted


async def test_routing_uses_the_cache_and_falls_back_when_a_node_fails(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    a, _ = await start_nodes(nodes, consul, {"a": ["127.0.0.2"], "b": ["127.0.0.2"]})
    first = await route(router, email("x@example.com", "127.0.0.2"))
    [batch] = first.batches
    assert batch.ok and batch.node == "a" and batch.new_pipeline  # tie on load: lowest ID
    await sink.wait_for(1)

    # With the registry gone the router still routes from its cache: no round trip per batch.
    # Node a is unreachable but still passing in that cache, so the router must fall back.
    await registry.close()
    assert a.server is not None
    await a.server.stop(0)
    second = await route(router, email("y@example.com", "127.0.0.2"))
    [batch] = second.batches
    assert batch.ok and batch.node == "b", second
    assert batch.new_pipeline
    assert "node a: UNAVAILABLE" in batch.error
    assert (second.successful_batches, second.fallbacks_used, second.new_pipelines_started) == (1, 1, 1)
    await sink.wait_for(2)
    assert [(m.peer, m.rcpt_tos) for m in sink.received] == [
        ("127.0.0.2", ["x@example.com"]),
        ("127.0.0.2", ["y@example.com"]),
    ]


async def test_batches_of_one_key_stay_on_one_pipeline_and_are_split(
    registry: RunningRegistry, sink: Sink, nodes: Nodes, consul: Consul
) -> None:
    router = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, max_batch=2))
    await start_nodes(nodes, consul, {"n": ["127.0.0.3"]})
    try:
        reply = await route(router, *(email(f"u{i}@example.net", "127.0.0.3") for i in range(5)))
        assert [len(b.message_ids) for b in reply.batches] == [2, 2, 1]
        assert {b.node for b in reply.batches} == {"n"}
        assert reply.new_pipelines_started == 1 and reply.accepted_recipients == 5
        await sink.wait_for(5)
    finally:
        await router.close()


async def test_an_invalid_email_rejects_the_whole_request(
    registry: RunningRegistry, router: RunningRouter
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await route(router, email("ok@example.com", "127.0.0.2"), email("bad@@example.com", "127.0.0.2"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        err.value.details()
        == "nothing was routed: emails[1].to[0] 'bad@@example.com' is not an email address"
    )
