"""Keys of one MX site and source IP run on one node and move together: a node refuses a key
whose site runs elsewhere, a stop takes the whole site to one node with its mail, and a
rebalance plans and makes the move as one. Real nodes that both send from one IP, the dev
registry, and a sink that holds the mail while the keys move.

a.example and b.example are routed to the sink by name, so they share the site "host:port";
c.example and d.example go by the catch-all route, each a site of its own."""

from __future__ import annotations

import json
from typing import Any, cast

import grpc
import pytest

from devmesh.sink import Sink
from epoxi.registry.ownership import site_record_key
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, pipeline_pb2
from services.monitor import cluster as plan
from services.monitor.main import RunningMonitor
from services.node.engine.mx import Host
from services.node.engine.smtp import SmtpSender
from services.node.main import RunningNode
from tests.services.monitor.support import (
    FAST_RETRY,
    Hold,
    enqueue,
    equals,
    ids_of,
    key_of,
    keys_on,
    mail,
    received_ids,
)
from tests.support import Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub
IP = "127.0.0.2"
SITE = ["a.example", "b.example"]
OWN = ["c.example", "d.example"]
A, B, C, D = (key_of(d, IP) for d in SITE + OWN)


def sited(node: str, ips: list[str], *pipelines: tuple[str, str]) -> node_pb2.GetNodeStateResponse:
    """A node's live state; each pipeline is (domain, site)."""
    return node_pb2.GetNodeStateResponse(
        node=node_pb2.NodeInfo(id=node, egress_ips=ips, pipeline_count=len(pipelines)),
        pipelines=[
            pipeline_pb2.PipelineInfo(routing_key=key_of(d, IP), node=node, domain=d, source_ip=IP, site=site)
            for d, site in pipelines
        ],
    )


def test_a_site_moves_whole_and_before_single_keys_of_the_same_rank() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            sited("n1", [IP], ("a.example", "mx"), ("b.example", "mx"), ("c.example", ""), ("d.example", "")),
            sited("n2", [IP]),
        ]
    )
    assert [(mv.routing_key, mv.from_node, mv.to_node) for mv in moves] == [(A, "n1", "n2"), (B, "n1", "n2")]
    assert [[mv.routing_key for mv in g] for g in plan.move_groups(moves)] == [[A, B]]
    assert (skipped, counts) == ([], {"n1": 2, "n2": 2})


def test_a_site_too_big_to_move_is_skipped_with_the_reason_and_its_keys_never_split() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            sited("n1", [IP], ("a.example", "mx"), ("b.example", "mx"), ("c.example", "mx")),
            sited("n2", [IP]),
        ]
    )
    assert moves == []
    reason = (
        f"shares MX site mx from {IP} with 2 more pipelines here; they move only together, "
        "and moving all 3 would not even out the counts"
    )
    assert [(s.pipeline.routing_key, s.reason) for s in skipped] == [
        (A, reason),
        (B, reason),
        (key_of("c.example", IP), reason),
    ]
    assert counts == {"n1": 3, "n2": 0}


def test_moves_of_pipelines_without_a_site_go_one_by_one() -> None:
    moves, _, _ = plan.plan_rebalance(
        [
            sited("n1", [IP], *((d, "") for d in ("a.example", "b.example", "c.example", "d.example"))),
            sited("n2", [IP]),
        ]
    )
    assert [[mv.routing_key for mv in g] for g in plan.move_groups(moves)] == [[A], [B]]


# --- against real nodes ---


@pytest.fixture
async def two_nodes(
    nodes: Nodes, sink: Sink, consul: Any, default_policy: None, monitor: RunningMonitor
) -> Nodes:
    routes = {"*": nodes.sink, **{d: nodes.sink for d in SITE}}
    await nodes.start("n1", IP, routes=routes, **FAST_RETRY)
    await nodes.start("n2", IP, routes=routes, **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    return nodes


async def site_holder(consul: Any, site: str) -> str | None:
    """The node holding (site, IP)'s record, None when it is free."""
    _, entry = await consul.kv.get(site_record_key(site, IP))
    if not entry or not entry.get("Session"):
        return None
    return str(json.loads(entry["Value"])["node"])


async def send(nodes: Nodes, node: str, domain: str, tag: str, count: int = 1) -> list[str]:
    emails = mail(domain, IP, tag, count)
    await nodes.stub(node).EnqueueBatch(
        node_pb2.EnqueueBatchRequest(routing_key=key_of(domain, IP), emails=emails), timeout=5
    )
    return ids_of(emails)


async def test_a_node_refuses_a_key_whose_site_runs_elsewhere_and_the_last_key_frees_it(
    two_nodes: Nodes, consul: Any, sink: Sink, monitor_stub: Stub
) -> None:
    nodes = two_nodes
    await send(nodes, "n1", "a.example", "a")
    assert await site_holder(consul, sink.address) == "n1"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(nodes, "n2", "b.example", "b")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        f"routing key {B!r} shares MX site {sink.address!r} from {IP} with the pipelines on node n1"
        in str(err.value.details())
    )
    trailing = dict(err.value.trailing_metadata() or ())
    assert trailing["epoxi-owner-node"] == "n1"
    assert await keys_on(nodes, "n2") == []  # nothing started, nothing spooled

    await send(nodes, "n2", "c.example", "c")  # a site of its own: anywhere
    await send(nodes, "n1", "b.example", "b")  # with its site
    assert (await keys_on(nodes, "n1"), await keys_on(nodes, "n2")) == ([A, B], [C])
    await sink.wait_for(3)

    # Stopping one key of the site stops the other with it (they move only together), and
    # frees the site's record: the next key of it may go anywhere.
    stopped = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key=A), timeout=10
    )
    (outcome,) = stopped.outcomes
    assert (stopped.stopped_count, outcome.node, outcome.pipeline.routing_key) == (1, "n1", A)
    assert [(o.node, o.pipeline.routing_key, o.stopped) for o in outcome.moved_with] == [("n1", B, True)]
    assert await keys_on(nodes, "n1") == []
    assert await site_holder(consul, sink.address) is None
    await send(nodes, "n2", "b.example", "b2")
    assert await site_holder(consul, sink.address) == "n2"
    await sink.wait_for(4)


async def test_a_stop_takes_every_key_of_the_site_and_its_mail_to_one_node(
    two_nodes: Nodes, consul: Any, sink: Sink
) -> None:
    nodes = two_nodes
    hold = Hold(sink)
    accepted = []
    for domain in SITE + OWN[:1]:
        accepted += await send(nodes, "n1", domain, domain, 2)

    async def all_deferred() -> bool:
        s = await nodes.stub("n1").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        return len(s.pipelines) == 3 and all(p.counters.deferred == 2 for p in s.pipelines)

    await eventually(all_deferred)

    reply = await nodes.stub("n1").StopPipeline(
        node_pb2.StopPipelineRequest(routing_key=A, hand_to_node="n2"), timeout=20
    )
    assert (reply.pipeline.routing_key, reply.handed_to_node, reply.messages_handed_off) == (A, "n2", 2)
    assert reply.pipeline.site == sink.address
    assert [(o.pipeline.routing_key, o.handed_to_node, o.messages_handed_off) for o in reply.moved_with] == [
        (B, "n2", 2)
    ]
    assert (await keys_on(nodes, "n1"), await keys_on(nodes, "n2")) == ([C], [A, B])
    assert await site_holder(consul, sink.address) == "n2"

    hold.on = False
    await eventually(lambda: equals(_count(sink), len(accepted)))
    assert received_ids(sink) == dict.fromkeys(accepted, 1)  # every message once, none lost


async def _count(sink: Sink) -> int:
    return len(sink.received)


async def test_rebalance_moves_the_sites_keys_together_with_their_mail(
    two_nodes: Nodes, consul: Any, sink: Sink, monitor_stub: Stub
) -> None:
    nodes = two_nodes
    hold = Hold(sink)
    owners = {}
    accepted = []
    for domain in SITE + OWN:
        emails = mail(domain, IP, domain, 2)
        owners[domain] = await enqueue(nodes, nodes.running["n1"].address, key_of(domain, IP), emails, domain)
        accepted += ids_of(emails)
    assert await keys_on(nodes, "n1") == [A, B, C, D]

    planned = await monitor_stub.Rebalance(m.RebalanceRequest(dry_run=True), timeout=10)
    assert [(mv.routing_key, mv.to_node, mv.pipeline.site) for mv in planned.moves] == [
        (A, "n2", sink.address),
        (B, "n2", sink.address),
    ]
    assert dict(planned.planned_pipelines_per_node) == {"n1": 2, "n2": 2}

    done = await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=30)
    assert [(mv.routing_key, mv.state, mv.messages_moved) for mv in done.moves] == [
        (A, m.PIPELINE_MOVE_STATE_MOVED, 2),
        (B, m.PIPELINE_MOVE_STATE_MOVED, 2),
    ]
    assert all(mv.pipeline.node == "n2" for mv in done.moves)
    assert (await keys_on(nodes, "n1"), await keys_on(nodes, "n2")) == ([C, D], [A, B])
    assert await site_holder(consul, sink.address) == "n2"

    hold.on = False
    await eventually(lambda: equals(_count(sink), len(accepted)))
    assert received_ids(sink) == dict.fromkeys(accepted, 1)


async def test_the_sites_record_is_freed_when_its_last_key_stops_for_being_idle(
    nodes: Nodes, consul: Any, sink: Sink, default_policy: None
) -> None:
    routes = {"*": nodes.sink, **{d: nodes.sink for d in SITE}}
    for node in ("n1", "n2"):
        await nodes.start(node, IP, routes=routes, pipeline_idle_timeout=0.3)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    await send(nodes, "n1", "a.example", "a")
    await send(nodes, "n1", "b.example", "b")
    await sink.wait_for(2)
    assert await site_holder(consul, sink.address) == "n1"

    async def stopped_and_freed() -> bool:
        return await keys_on(nodes, "n1") == [] and await site_holder(consul, sink.address) is None

    await eventually(stopped_and_freed)
    await send(nodes, "n2", "b.example", "b2")  # the site may start anywhere now
    assert await site_holder(consul, sink.address) == "n2"
    await sink.wait_for(3)


async def test_a_node_back_after_its_site_moved_hands_its_mail_to_the_sites_node(
    nodes: Nodes, consul: Any, sink: Sink, default_policy: None
) -> None:
    routes = {"*": nodes.sink, **{d: nodes.sink for d in SITE}}
    n1 = await nodes.start("n1", IP, routes=routes, **FAST_RETRY)
    await nodes.start("n2", IP, routes=routes, **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    hold = Hold(sink)
    held = await send(nodes, "n1", "a.example", "held", 2)

    async def deferred() -> bool:
        s = await nodes.stub("n1").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        return sum(int(p.counters.deferred) for p in s.pipelines) == 2

    await eventually(deferred)
    await n1.close()  # its mail stays in its spool; its records are released
    del nodes.running["n1"]
    taken = await send(nodes, "n2", "b.example", "new")  # the site is n2's now
    assert await site_holder(consul, sink.address) == "n2"

    # n1 resumes a.example, is refused by the site's record, and hands the mail to n2.
    await nodes.start("n1", IP, routes=routes, **FAST_RETRY)
    hold.on = False
    await eventually(lambda: equals(_count(sink), 3))
    assert received_ids(sink) == dict.fromkeys(held + taken, 1)
    assert (await keys_on(nodes, "n1"), await keys_on(nodes, "n2")) == ([], [A, B])


async def test_start_pipeline_optimal_follows_the_site_to_its_node(
    two_nodes: Nodes, consul: Any, sink: Sink, monitor_stub: Stub
) -> None:
    nodes = two_nodes
    await send(nodes, "n1", "a.example", "a")
    # n2 runs nothing, so placement picks it first; it refuses, naming n1, which starts the key.
    reply = await monitor_stub.StartPipelineOptimal(
        m.StartPipelineOptimalRequest(domain="b.example", source_ip=IP), timeout=10
    )
    assert (reply.node.id, reply.pipeline.node, reply.pipeline.routing_key, reply.started) == (
        "n1",
        "n1",
        B,
        True,
    )
    assert reply.pipeline.site == sink.address
    own = await monitor_stub.StartPipelineOptimal(
        m.StartPipelineOptimalRequest(domain="c.example", source_ip=IP), timeout=10
    )
    assert own.node.id == "n2"  # a site of its own goes where placement puts it


def reroute(node: RunningNode, domain: str, to: Sink) -> None:
    """``domain``'s mail goes to ``to`` from now on, as when its MX records change."""
    sender = node.supervisor.sender
    assert isinstance(sender, SmtpSender)  # whose destinations the node's shaper looks sites up in
    routes = cast(dict[str, Host], sender.destinations.routes)
    routes[domain] = Host(to.host, to.port)


async def test_a_key_whose_mx_changed_takes_its_new_sites_budget_and_record(
    two_nodes: Nodes, consul: Any, sink: Sink
) -> None:
    nodes = two_nodes
    n1 = nodes.running["n1"]
    await send(nodes, "n1", "a.example", "a")
    await send(nodes, "n1", "b.example", "b")
    await sink.wait_for(2)
    other = await Sink().start()
    try:
        reroute(n1, "a.example", other)
        assert await n1.supervisor.resite() == [A]
        assert await n1.supervisor.resite() == []  # nothing changed since
        # a.example's new site is n1's (nobody ran it); b.example keeps the old one on n1.
        assert (await site_holder(consul, other.address), await site_holder(consul, sink.address)) == (
            "n1",
            "n1",
        )
        accepted = await send(nodes, "n1", "a.example", "a2")
        await other.wait_for(1)
        assert [str(r.message()["Message-ID"]) for r in other.received] == accepted

        async def budget_moved() -> bool:
            p = n1.supervisor.pipeline(A)
            return (
                p is not None
                and p.site == other.address
                and p.budget is not None
                and p.budget.site.name == other.address
            )

        await eventually(budget_moved)
        # The last key of the old site leaving frees its record.
        reroute(n1, "b.example", other)
        assert await n1.supervisor.resite() == [B]
        assert (await site_holder(consul, other.address), await site_holder(consul, sink.address)) == (
            "n1",
            None,
        )
    finally:
        await other.stop()


async def test_a_key_whose_new_site_runs_elsewhere_goes_there_with_its_mail(
    nodes: Nodes, consul: Any, sink: Sink, default_policy: None
) -> None:
    other = await Sink().start()
    try:
        # n1 sends a.example to the sink; n2 sends it and c.example to the other sink already.
        n1 = await nodes.start("n1", IP, routes={"*": nodes.sink, "a.example": nodes.sink}, **FAST_RETRY)
        moved_to = {"*": nodes.sink, "a.example": other.address, "c.example": other.address}
        await nodes.start("n2", IP, routes=moved_to, **FAST_RETRY)
        await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
        await send(nodes, "n2", "c.example", "c")
        assert await site_holder(consul, other.address) == "n2"
        Hold(sink)  # the old MX defers all it gets
        held = await send(nodes, "n1", "a.example", "held", 2)

        async def deferred() -> bool:
            s = await nodes.stub("n1").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
            return sum(int(p.counters.deferred) for p in s.pipelines) == 2

        await eventually(deferred)
        # The new MX defers too for now, so the mail is still n1's when the site moves.
        later = Hold(other)
        reroute(n1, "a.example", other)  # n1's next registry round looks the site up again

        async def moved() -> bool:
            return (await keys_on(nodes, "n1"), await keys_on(nodes, "n2")) == ([], [A, C])

        await eventually(moved)
        assert await site_holder(consul, sink.address) is None
        state = await nodes.stub("n2").GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        assert {p.routing_key: p.site for p in state.pipelines} == {A: other.address, C: other.address}
        later.on = False
        await other.wait_for(3)
        assert received_ids(other) == dict.fromkeys([*held, "<c-0@epoxi.test>"], 1)
        assert received_ids(sink) == {}  # the old MX deferred all it got
        s1 = await nodes.stub("n1").GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
        assert (s1.totals.delivered, s1.totals.deferred) == (0, 0)  # n2 delivered it
    finally:
        await other.stop()
