"""Shaping across the cluster (ListClusterShaping, ClearClusterShaping) against real nodes whose
budgets a provider's reply throttled: the sink answers ``421 4.7.0 Try again later``, and the
built-in rule ``try-again-later`` halves the (site, source IP)'s limits. Every node routes the
test domains to the sink by name, so the site is the sink's "host:port"; node1 sends from .2 and .3, node2 from .4: three
adjustments, on two nodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from devmesh.sink import Sink
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, shaping_pb2
from tests.services.monitor.support import equals, key_of, mail, register_ghost
from tests.support import Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub
TRY_AGAIN = "421 4.7.0 Try again later"
# (domain, source IP, node) of the keys that get the reply.
KEYS = [
    ("gmail.com", "127.0.0.2", "node1"),
    ("yahoo.com", "127.0.0.3", "node1"),
    ("aol.com", "127.0.0.4", "node2"),
]


class Refuse:
    """Makes the sink answer every recipient ``TRY_AGAIN`` while ``on``."""

    def __init__(self, sink: Sink) -> None:
        self.on = True
        sink.reply_rule = lambda rcpt: TRY_AGAIN if self.on else None


@dataclass
class Throttled:
    nodes: Nodes
    site: str
    refuse: Refuse


async def adjustments(stub: Stub, count: int) -> m.ListClusterShapingResponse | None:
    listed = await stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10)
    return listed if len(listed.adjustments) == count else None


@pytest.fixture
async def throttled(nodes: Nodes, consul: Any, sink: Sink, monitor_stub: Stub) -> AsyncIterator[Throttled]:
    refuse = Refuse(sink)
    routes = {domain: nodes.sink for domain, _, _ in KEYS}
    await nodes.start("node1", "127.0.0.2", "127.0.0.3", routes=routes)
    await nodes.start("node2", "127.0.0.4", routes=routes)
    await eventually(lambda: equals(passing_nodes(consul), {"node1", "node2"}))
    for domain, ip, node in KEYS:
        request = node_pb2.EnqueueBatchRequest(
            routing_key=key_of(domain, ip), emails=mail(domain, ip, domain)
        )
        await nodes.stub(node).EnqueueBatch(request, timeout=10)
    await eventually(lambda: adjustments(monitor_stub, len(KEYS)))
    # Mail retried from now on is accepted: no reply throttles again what a test clears.
    refuse.on = False
    yield Throttled(nodes, sink.address, refuse)


async def test_the_adjustments_of_every_node_sorted_by_site_ip_and_node(
    throttled: Throttled, monitor_stub: Stub
) -> None:
    listed = await monitor_stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10)
    assert list(listed.unreachable_nodes) == []
    assert [(a.site, a.source_ip, a.node) for a in listed.adjustments] == [
        (throttled.site, ip, node) for _, ip, node in KEYS
    ]
    for a, (domain, ip, _) in zip(listed.adjustments, KEYS, strict=True):
        assert (a.rule, a.action, a.reply) == (
            "try-again-later",
            shaping_pb2.SHAPING_ACTION_THROTTLE,
            TRY_AGAIN,
        )
        assert a.factor == 0.5
        assert list(a.routing_keys) == [key_of(domain, ip)]
        # The rule holds 300 s before recovery begins.
        assert 299 <= a.until.seconds - a.triggered_at.seconds <= 301
    # A key's queue stats name its site and the adjustment in force there.
    stats = await monitor_stub.GetClusterQueueStats(
        m.GetClusterQueueStatsRequest(routing_key=key_of("aol.com", "127.0.0.4")), timeout=10
    )
    [queue] = stats.nodes["node2"].pipelines
    assert (queue.site, queue.shaping.rule, queue.shaping.source_ip) == (
        throttled.site,
        "try-again-later",
        "127.0.0.4",
    )


async def test_clear_one_ip_then_the_whole_site(throttled: Throttled, monitor_stub: Stub) -> None:
    site = throttled.site
    one = await monitor_stub.ClearClusterShaping(
        m.ClearClusterShapingRequest(site=site, source_ip="127.0.0.3"), timeout=10
    )
    assert [(a.site, a.source_ip, a.node, a.rule) for a in one.cleared] == [
        (site, "127.0.0.3", "node1", "try-again-later")
    ]
    assert list(one.unreachable_nodes) == []
    left = await monitor_stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10)
    assert [(a.source_ip, a.node) for a in left.adjustments] == [
        ("127.0.0.2", "node1"),
        ("127.0.0.4", "node2"),
    ]

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.ClearClusterShaping(
            m.ClearClusterShapingRequest(site=site, source_ip="127.0.0.3"), timeout=10
        )
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"no shaping adjustment in force for site {site!r} from 127.0.0.3 on any node",
    )

    every = await monitor_stub.ClearClusterShaping(m.ClearClusterShapingRequest(site=site), timeout=10)
    assert [(a.source_ip, a.node) for a in every.cleared] == [("127.0.0.2", "node1"), ("127.0.0.4", "node2")]
    assert (
        list((await monitor_stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10)).adjustments)
        == []
    )


@pytest.mark.parametrize(
    ("fields", "code", "error"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "site is empty"),
        ({"source_ip": "127.0.0.2"}, grpc.StatusCode.INVALID_ARGUMENT, "site is empty"),
        (
            {"site": "x", "source_ip": "nope"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "source_ip 'nope' is not an IP",
        ),
        ({"site": "nowhere.test"}, grpc.StatusCode.NOT_FOUND, "no shaping adjustment in force for site"),
    ],
)
async def test_clear_refusals(
    throttled: Throttled, monitor_stub: Stub, fields: dict[str, str], code: grpc.StatusCode, error: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.ClearClusterShaping(m.ClearClusterShapingRequest(**fields), timeout=10)
    assert e.value.code() == code
    assert error in str(e.value.details())


async def test_a_node_that_does_not_answer_is_named(
    throttled: Throttled, consul: Any, monitor_stub: Stub
) -> None:
    await register_ghost(consul)
    listed = await monitor_stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10)
    assert len(listed.adjustments) == len(KEYS)
    assert [(u.node, u.error_code) for u in listed.unreachable_nodes] == [("ghost", "UNAVAILABLE")]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await monitor_stub.ClearClusterShaping(m.ClearClusterShapingRequest(site="nowhere.test"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "; node ghost (UNAVAILABLE: " in str(e.value.details())
    cleared = await monitor_stub.ClearClusterShaping(
        m.ClearClusterShapingRequest(site=throttled.site, source_ip="127.0.0.4"), timeout=10
    )
    assert [a.node for a in cleared.cleared] == ["node2"]
    assert [u.node for u in cleared.unreachable_nodes] == ["ghost"]


async def test_unavailable_only_when_no_node_answers(consul: Any, monitor_stub: Stub) -> None:
    calls = [
        lambda: monitor_stub.ListClusterShaping(m.ListClusterShapingRequest(), timeout=10),
        lambda: monitor_stub.ClearClusterShaping(m.ClearClusterShapingRequest(site="s"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "no passing node in the registry to ask",
        )
    await register_ghost(consul)
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(e.value.details()).startswith("no node answered: node ghost (UNAVAILABLE")


async def test_shaping_over_http(throttled: Throttled, http: aiohttp.ClientSession) -> None:
    async with http.get("/admin/shaping") as resp:
        assert resp.status == 200, await resp.text()
        listed = await resp.json()
    assert [(a["sourceIp"], a["node"]) for a in listed["adjustments"]] == [(ip, node) for _, ip, node in KEYS]
    first = listed["adjustments"][0]
    assert (first["site"], first["action"], first["factor"]) == (
        throttled.site,
        "SHAPING_ACTION_THROTTLE",
        0.5,
    )
    assert first["until"].endswith("Z") and first["messageInterval"].endswith("s")
    assert listed["unreachableNodes"] == []

    body = {"site": throttled.site, "sourceIp": "127.0.0.2"}
    async with http.post("/admin/shaping:clear", json=body) as resp:
        assert resp.status == 200, await resp.text()
        cleared = await resp.json()
    assert [(a["sourceIp"], a["node"], a["rule"]) for a in cleared["cleared"]] == [
        ("127.0.0.2", "node1", "try-again-later")
    ]
    async with http.post("/admin/shaping:clear", json=body) as resp:
        assert resp.status == 404
        status = await resp.json()
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert status["message"].startswith(f"no shaping adjustment in force for site {throttled.site!r}")
    assert status["details"] == []
    async with http.post("/admin/shaping:clear", json={"site": ""}) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    async with http.post("/admin/shaping:clear", json={"site": "x", "sourceIp": "not-an-ip"}) as resp:
        assert resp.status == 400
        assert "is not an IP address" in (await resp.json())["message"]
