"""The router over real gRPC with a real dev registry: in front of a real node and the SMTP sink,
and of test nodes that answer as the node contract says (tests/services/router/nodes.py)."""

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
from tests.services.router.nodes import ContractNodes
from tests.services.router.support import route, sees
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


async def test_a_real_node_takes_a_new_key_and_delivers_it(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    # A real node starts the key's pipeline itself when the batch reaches it.
    await start_nodes(nodes, consul, {"a": ["127.0.0.2"]})
    await sees(router, "a")
    reply = await route(router, email("x@example.com", "127.0.0.2"))
    [batch] = reply.batches
    assert (batch.ok, batch.node, batch.new_pipeline, batch.error) == (True, "a", True, ""), reply
    [received] = await sink.wait_for(1)
    assert (received.peer, received.rcpt_tos) == ("127.0.0.2", ["x@example.com"])
    assert received.message()["Message-ID"] == batch.email_message_ids[0]


async def test_with_the_registry_gone_a_known_key_is_still_routed_from_the_cache(
    registry: RunningRegistry, router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    await contract_nodes.start("a", "127.0.0.2")
    b = await contract_nodes.start("b", "127.0.0.2")
    await contract_nodes.all_passing()
    await sees(router, "a", "b")
    first = await route(router, email("x@example.com", "127.0.0.2"))
    assert [(x.node, x.new_pipeline) for x in first.batches] == [("a", True)]
    reads = router.servicer.owners.registry_reads

    # No registry round trip per batch: the view and the owner cache answer.
    await registry.close()
    second = await route(router, email("y@example.com", "127.0.0.2"))
    assert [(x.ok, x.node, x.error) for x in second.batches] == [(True, "a", "")]
    assert router.servicer.owners.registry_reads == reads and b.calls == []


async def test_batches_of_one_key_stay_on_one_node_in_order_and_are_split(
    registry: RunningRegistry, contract_nodes: ContractNodes
) -> None:
    router = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, max_batch=2))
    n = await contract_nodes.start("n", "127.0.0.3")
    await contract_nodes.all_passing()
    try:
        await sees(router, "n")
        reply = await route(router, *(email(f"u{i}@example.net", "127.0.0.3") for i in range(5)))
        assert [list(b.email_indexes) for b in reply.batches] == [[0, 1], [2, 3], [4]]
        assert [len(b.message_ids) for b in reply.batches] == [2, 2, 1]
        assert {b.node for b in reply.batches} == {"n"}
        assert reply.new_pipelines_started == 1 and reply.accepted_recipients == 5
        # In order: each batch after the first went to the owner the first one made.
        assert [c.idempotency_key for c in n.calls] == [b.idempotency_key for b in reply.batches]
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
