"""Queue inspection across the cluster (GetClusterQueueStats, ListQueuedMessages, GetQueuedMessage)
against real nodes whose spools hold real mail, kept there by a sink that defers everything.

One routing key's mail lives on two nodes at once (as it does while a key changes hands): node1
owns the key through its registry record, and node2 runs without a registry session (so it takes
any key) but is registered, with the registry's real gRPC check, for the monitor to find.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from devmesh.sink import Sink
from epoxi.registry import services
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, queue_pb2
from services.monitor import queue_pages
from tests.services.monitor.support import FAST_RETRY, Hold, equals, key_of, mail, register_ghost
from tests.support import CHECK_INTERVAL, Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub
KEY = key_of("gmail.com", "127.0.0.2")
OTHER = key_of("yahoo.com", "127.0.0.3")


@dataclass
class Spooled:
    """The cluster, and the spool IDs in the order the mail was accepted, with the node holding each."""

    nodes: Nodes
    order: list[tuple[str, str]]  # (node, spool ID) of KEY's mail, oldest first
    other: str  # the spool ID of node1's one message for OTHER


async def register_by_hand(consul: Any, nodes: Nodes, id: str, *egress_ips: str) -> None:
    info = node_pb2.NodeInfo(id=id, address=nodes.running[id].address, egress_ips=list(egress_ips))
    interval = f"{int(CHECK_INTERVAL * 1000)}ms"
    await consul.agent.service.register(**services.node_registration(info, interval, "1m"))


async def spool_one(nodes: Nodes, id: str, key: str, tag: str) -> str:
    domain, _, _ = key.partition("_")
    ip = "127.0.0.2" if key == KEY else "127.0.0.3"
    request = node_pb2.EnqueueBatchRequest(routing_key=key, emails=mail(domain, ip, tag))

    async def spooled() -> node_pb2.EnqueueBatchResponse | None:
        try:
            reply: node_pb2.EnqueueBatchResponse = await nodes.stub(id).EnqueueBatch(request, timeout=10)
        except grpc.aio.AioRpcError as e:
            # The node could not open its registry session: its check (0.2 s timeout here) timed
            # out on a loaded machine and is critical until the next one. Nothing was spooled.
            if e.code() is grpc.StatusCode.UNAVAILABLE and "registry session" in (e.details() or ""):
                return None
            raise
        return reply

    [spool_id] = (await eventually(spooled)).message_ids
    return str(spool_id)


@pytest.fixture
async def spooled(nodes: Nodes, consul: Any, sink: Sink) -> AsyncIterator[Spooled]:
    Hold(sink)
    await nodes.start("node1", "127.0.0.2", "127.0.0.3", **FAST_RETRY)
    await nodes.start("node2", "127.0.0.2", consul=None, **FAST_RETRY)
    await register_by_hand(consul, nodes, "node2", "127.0.0.2")
    await eventually(lambda: equals(passing_nodes(consul), {"node1", "node2"}))
    order = []
    for i, id in enumerate(["node1", "node1", "node1", "node2", "node2", "node1", "node1"]):
        order.append((id, await spool_one(nodes, id, KEY, f"m{i}")))
    other = await spool_one(nodes, "node1", OTHER, "other")
    yield Spooled(nodes, order, other)


async def list_all(stub: Stub, page_size: int, **fields: Any) -> tuple[list[tuple[str, str]], int]:
    """Every (node, spool ID) of the listing, page by page, and how many pages it took."""
    seen: list[tuple[str, str]] = []
    token, pages = "", 0
    while True:
        page = await stub.ListQueuedMessages(
            m.ListQueuedMessagesRequest(routing_key=KEY, page_size=page_size, page_token=token, **fields),
            timeout=10,
        )
        pages += 1
        assert len(page.messages) <= page_size
        assert list(page.unreachable_nodes) == []
        seen += [(q.node, q.message.id) for q in page.messages]
        token = page.next_page_token
        if not token:
            return seen, pages


@pytest.mark.parametrize("page_size", [1, 2, 3, 7])
async def test_listing_is_oldest_first_across_nodes_page_by_page(
    spooled: Spooled, monitor_stub: Stub, page_size: int
) -> None:
    seen, pages = await list_all(monitor_stub, page_size)
    assert seen == spooled.order
    assert pages == -(-len(spooled.order) // page_size)  # the last page, full or not, has no token


async def test_a_page_is_the_oldest_of_every_node(spooled: Spooled, monitor_stub: Stub) -> None:
    page = await monitor_stub.ListQueuedMessages(
        m.ListQueuedMessagesRequest(routing_key=KEY, page_size=4), timeout=10
    )
    assert [(q.node, q.message.id) for q in page.messages] == spooled.order[:4]
    assert all(q.message.routing_key == KEY for q in page.messages)
    accepted = [q.message.accepted_at.ToNanoseconds() for q in page.messages]
    assert accepted == sorted(accepted)
    rest = await monitor_stub.ListQueuedMessages(
        m.ListQueuedMessagesRequest(routing_key=KEY, page_size=4, page_token=page.next_page_token), timeout=10
    )
    assert [(q.node, q.message.id) for q in rest.messages] == spooled.order[4:]
    assert rest.next_page_token == ""


async def test_page_size_zero_is_fifty_and_the_state_filters(spooled: Spooled, monitor_stub: Stub) -> None:
    page = await monitor_stub.ListQueuedMessages(m.ListQueuedMessagesRequest(routing_key=KEY), timeout=10)
    assert [(q.node, q.message.id) for q in page.messages] == spooled.order
    assert page.next_page_token == ""
    delivered = await monitor_stub.ListQueuedMessages(
        m.ListQueuedMessagesRequest(routing_key=KEY, state=queue_pb2.DELIVERY_STATE_DELIVERED), timeout=10
    )
    assert list(delivered.messages) == []  # the sink delivers nothing


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"page_size": -1}, "page_size must not be negative"),
        ({"state": 99}, "state 99 is not a DeliveryState"),
        ({"page_token": "not a token"}, "page_token is not a token the monitor issued"),
        ({"page_token": queue_pages.Position(OTHER, 0).token()}, "another routing_key or state"),
        ({"routing_key": "not-a-key"}, "is not <domain>_<source ip>"),
    ],
)
async def test_bad_listing_requests_are_invalid_argument(
    spooled: Spooled, monitor_stub: Stub, fields: dict[str, Any], error: str
) -> None:
    request = m.ListQueuedMessagesRequest(routing_key=KEY)
    for name, value in fields.items():
        setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.ListQueuedMessages(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in str(e.value.details())


async def test_a_node_token_tampered_with_is_invalid_argument(spooled: Spooled, monitor_stub: Stub) -> None:
    forged = queue_pages.Position(KEY, 0, {"node1": "bm90IGEgbm9kZSB0b2tlbg"}).token()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.ListQueuedMessages(
            m.ListQueuedMessagesRequest(routing_key=KEY, page_token=forged), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node node1 refuses the page_token" in str(e.value.details())


async def test_get_queued_message_finds_the_node_that_holds_it(spooled: Spooled, monitor_stub: Stub) -> None:
    for node, spool_id in [spooled.order[0], spooled.order[3]]:
        found = await monitor_stub.GetQueuedMessage(
            m.GetQueuedMessageRequest(message_id=spool_id), timeout=10
        )
        assert (found.node, found.message.id, found.message.routing_key) == (node, spool_id, KEY)
        assert [r.recipient for r in found.message.recipients] == [found.message.recipients[0].recipient]
        assert all(a.recipient == found.message.recipients[0].recipient for a in found.attempts)


async def test_get_queued_message_refusals(spooled: Spooled, monitor_stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.GetQueuedMessage(m.GetQueuedMessageRequest(message_id="0" * 32), timeout=10)
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"no reachable node has message {'0' * 32}",
    )
    for bad in ["", "xyz", "A" * 32, "0" * 33]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await monitor_stub.GetQueuedMessage(m.GetQueuedMessageRequest(message_id=bad), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a spool ID" in str(e.value.details())


def _unfinished(counters: Any) -> int:
    return int(counters.queued + counters.in_flight + counters.deferred)


async def test_cluster_queue_stats_merge_every_node(spooled: Spooled, monitor_stub: Stub) -> None:
    stats = await monitor_stub.GetClusterQueueStats(m.GetClusterQueueStatsRequest(), timeout=10)
    assert sorted(stats.nodes) == ["node1", "node2"]
    assert [p.routing_key for p in stats.nodes["node1"].pipelines] == [KEY, OTHER]
    assert [p.routing_key for p in stats.nodes["node2"].pipelines] == [KEY]
    # One recipient per message: 5 + 1 on node1, 2 on node2, none finished.
    assert (_unfinished(stats.nodes["node1"].totals), _unfinished(stats.nodes["node2"].totals)) == (6, 2)
    assert _unfinished(stats.totals) == 8
    assert list(stats.unreachable_nodes) == []

    only = await monitor_stub.GetClusterQueueStats(
        m.GetClusterQueueStatsRequest(routing_key=OTHER), timeout=10
    )
    assert [p.routing_key for p in only.nodes["node1"].pipelines] == [OTHER]
    assert list(only.nodes["node2"].pipelines) == []  # it answered: nothing of that key
    assert _unfinished(only.totals) == 1


async def test_cluster_queue_stats_refusals(spooled: Spooled, monitor_stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.GetClusterQueueStats(
            m.GetClusterQueueStatsRequest(routing_key=key_of("nowhere.com", "127.0.0.2")), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.GetClusterQueueStats(m.GetClusterQueueStatsRequest(routing_key="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_node_that_does_not_answer_is_named_and_the_rest_answer(
    spooled: Spooled, consul: Any, monitor_stub: Stub
) -> None:
    await register_ghost(consul)
    stats = await monitor_stub.GetClusterQueueStats(m.GetClusterQueueStatsRequest(), timeout=10)
    assert sorted(stats.nodes) == ["node1", "node2"]
    assert [(u.node, u.error_code) for u in stats.unreachable_nodes] == [("ghost", "UNAVAILABLE")]
    page = await monitor_stub.ListQueuedMessages(m.ListQueuedMessagesRequest(routing_key=KEY), timeout=10)
    assert [(q.node, q.message.id) for q in page.messages] == spooled.order
    assert [u.node for u in page.unreachable_nodes] == ["ghost"]
    node, spool_id = spooled.order[-1]
    found = await monitor_stub.GetQueuedMessage(m.GetQueuedMessageRequest(message_id=spool_id), timeout=10)
    assert found.node == node
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.GetQueuedMessage(m.GetQueuedMessageRequest(message_id="1" * 32), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "node ghost (UNAVAILABLE" in str(e.value.details())


async def _inspect_all(stub: Stub) -> list[grpc.aio.AioRpcError]:
    errors = []
    for call in (
        lambda: stub.GetClusterQueueStats(m.GetClusterQueueStatsRequest(), timeout=10),
        lambda: stub.ListQueuedMessages(m.ListQueuedMessagesRequest(routing_key=KEY), timeout=10),
        lambda: stub.GetQueuedMessage(m.GetQueuedMessageRequest(message_id="2" * 32), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        errors.append(e.value)
    return errors


async def test_unavailable_only_when_no_node_answers(consul: Any, monitor_stub: Stub) -> None:
    for error in await _inspect_all(monitor_stub):
        assert (error.code(), error.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "no passing node in the registry to ask",
        )
    await register_ghost(consul)
    for error in await _inspect_all(monitor_stub):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert str(error.details()).startswith("no node answered: node ghost (UNAVAILABLE")


async def test_queue_inspection_over_http(spooled: Spooled, http: aiohttp.ClientSession) -> None:
    async with http.get(f"/admin/queues/{KEY}/messages", params={"pageSize": "5"}) as resp:
        assert resp.status == 200, await resp.text()
        page = await resp.json()
    assert [(q["node"], q["message"]["id"]) for q in page["messages"]] == spooled.order[:5]
    assert page["messages"][0]["message"]["sizeBytes"].isdigit()  # uint64: a JSON string
    async with http.get(
        f"/admin/queues/{KEY}/messages", params={"pageSize": "5", "pageToken": page["nextPageToken"]}
    ) as resp:
        rest = await resp.json()
    assert [(q["node"], q["message"]["id"]) for q in rest["messages"]] == spooled.order[5:]
    async with http.get(f"/admin/messages/{spooled.other}") as resp:
        assert resp.status == 200
        assert (await resp.json())["node"] == "node1"
    async with http.get("/admin/messages/nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    async with http.get("/admin/queues", params={"routingKey": OTHER}) as resp:
        stats = await resp.json()
    assert stats["nodes"]["node1"]["pipelines"][0]["routingKey"] == OTHER
