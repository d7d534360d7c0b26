"""Rebalance: the plan (pure), the dry run, moves under load with their queued mail, and the
cluster-wide lock; real nodes, the dev registry and a sink that holds the mail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from devmesh.sink import Sink
from epoxi.registry.ownership import Owner, owner_of
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2, pipeline_pb2
from services.monitor import cluster as plan
from services.monitor import lock
from services.monitor.main import RunningMonitor
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
    unfinished,
)
from tests.support import Nodes, eventually, passing_nodes

Stub = monitor_pb2_grpc.MonitorServiceStub


# --- planning (pure) ---


def state(node: str, ips: list[str], *pipelines: tuple[str, str, int]) -> node_pb2.GetNodeStateResponse:
    """A node's live state; each pipeline is (domain, source IP, unfinished messages)."""
    return node_pb2.GetNodeStateResponse(
        node=node_pb2.NodeInfo(id=node, egress_ips=ips, pipeline_count=len(pipelines)),
        pipelines=[
            pipeline_pb2.PipelineInfo(
                routing_key=key_of(d, ip),
                node=node,
                domain=d,
                source_ip=ip,
                counters=pipeline_pb2.PipelineCounters(deferred=busy),
            )
            for d, ip, busy in pipelines
        ],
    )


def moves_of(moves: Any) -> list[tuple[str, str, str]]:
    return [(mv.routing_key, mv.from_node, mv.to_node) for mv in moves]


def test_plan_moves_from_the_most_to_the_least_loaded_owner() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a", ["1.1.1.1"], *((d, "1.1.1.1", 0) for d in ("a.com", "b.com", "c.com", "d.com", "e.com"))
            ),
            state("b", ["1.1.1.1"]),
            state("c", ["1.1.1.1", "2.2.2.2"]),
        ]
    )
    assert moves_of(moves) == [
        ("a.com_1_1_1_1", "a", "b"),
        ("b.com_1_1_1_1", "a", "c"),
        ("c.com_1_1_1_1", "a", "b"),
    ]
    assert all(mv.state == m.PIPELINE_MOVE_STATE_PLANNED for mv in moves)
    assert (skipped, counts) == ([], {"a": 2, "b": 2, "c": 1})


def test_plan_leaves_counts_that_differ_by_one() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state("a", ["1.1.1.1"], ("a.com", "1.1.1.1", 0), ("b.com", "1.1.1.1", 0)),
            state("b", ["1.1.1.1"], ("c.com", "1.1.1.1", 0)),
        ]
    )
    assert (moves, skipped, counts) == ([], [], {"a": 2, "b": 1})


def test_plan_moves_pipelines_with_queued_mail_too() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a", ["1.1.1.1"], ("a.com", "1.1.1.1", 3), ("b.com", "1.1.1.1", 0), ("c.com", "1.1.1.1", 7)
            ),
            state("b", ["1.1.1.1"]),
        ]
    )
    assert moves_of(moves) == [("a.com_1_1_1_1", "a", "b")]
    assert moves[0].pipeline.counters.deferred == 3
    assert (skipped, counts) == ([], {"a": 2, "b": 1})


def test_plan_skips_what_no_other_node_can_take_and_never_targets_a_node_without_the_ip() -> None:
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a",
                ["1.1.1.1", "2.2.2.2"],
                ("a.com", "2.2.2.2", 0),
                ("b.com", "1.1.1.1", 0),
                ("c.com", "2.2.2.2", 0),
            ),
            state("b", ["1.1.1.1"], ("b.com", "1.1.1.1", 0)),
            state("c", ["3.3.3.3"]),
        ]
    )
    # b owns only .1, where it already runs b.com; c owns none of a's IPs.
    assert moves == []
    assert [(s.pipeline.routing_key, s.to_node, s.reason) for s in skipped] == [
        ("a.com_2_2_2_2", "", "no other passing node sends from 2.2.2.2"),
        ("b.com_1_1_1_1", "", "every other passing node that sends from 1.1.1.1 runs b.com_1_1_1_1 already"),
        ("c.com_2_2_2_2", "", "no other passing node sends from 2.2.2.2"),
    ]
    assert counts == {"a": 3, "b": 1, "c": 0}


def test_plan_follows_each_ips_owners() -> None:
    """Only b owns .2: a's .2 pipelines go there, its .1 ones to c, until the counts meet."""
    moves, skipped, counts = plan.plan_rebalance(
        [
            state(
                "a",
                ["1.1.1.1", "2.2.2.2"],
                *((d, "2.2.2.2", 0) for d in ("a.com", "b.com", "c.com")),
                *((d, "1.1.1.1", 0) for d in ("d.com", "e.com", "f.com")),
            ),
            state("b", ["2.2.2.2"]),
            state("c", ["1.1.1.1"]),
        ]
    )
    assert moves_of(moves) == [
        ("a.com_2_2_2_2", "a", "b"),
        ("d.com_1_1_1_1", "a", "c"),
        ("b.com_2_2_2_2", "a", "b"),
        ("e.com_1_1_1_1", "a", "c"),
    ]
    assert (skipped, counts) == ([], {"a": 2, "b": 2, "c": 2})


# --- against real nodes ---

DOMAINS = [f"d{i}.example" for i in range(6)]
IP = "127.0.0.2"


class Loaded:
    """n1 runs a pipeline for each of DOMAINS from .2, each with deferred mail (the sink holds
    it); n2 owns .2 too and runs nothing."""

    def __init__(self, nodes: Nodes, hold: Hold) -> None:
        self.nodes = nodes
        self.hold = hold
        self.keys = [key_of(d, IP) for d in DOMAINS]
        # Where each key's mail goes next (followed as nodes refuse it), and every Message-ID
        # a node acknowledged.
        self.owners = dict.fromkeys(self.keys, nodes.running["n1"].address)
        self.accepted: list[str] = []
        self._batches = 0

    async def send(self, key: str, count: int = 1) -> None:
        self._batches += 1
        tag = f"m{self._batches}"
        emails = mail(key.split("_", 1)[0], IP, tag, count)
        self.owners[key] = await enqueue(self.nodes, self.owners[key], key, emails, tag)
        self.accepted += ids_of(emails)

    async def keep_sending(self, stop: asyncio.Event) -> int:
        """One email after another to each key (a sender per key, so every key takes mail while it
        moves), until ``stop``; the batches sent."""

        async def to(key: str) -> int:
            sent = 0
            while not stop.is_set():
                await self.send(key)
                sent += 1
                await asyncio.sleep(0.005)
            return sent

        return sum(await asyncio.gather(*map(to, self.keys)))


async def deferred_everywhere(nodes: Nodes, id: str, keys: list[str]) -> bool:
    """Every key of ``keys`` runs on ``id`` with mail deferred."""
    s = await nodes.stub(id).GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    found = {p.routing_key: p.counters.deferred for p in s.pipelines}
    return all(found.get(k, 0) > 0 for k in keys)


@pytest.fixture
async def loaded(
    nodes: Nodes, sink: Sink, consul: Any, default_policy: None, monitor: RunningMonitor
) -> AsyncIterator[Loaded]:
    await nodes.start("n1", IP, **FAST_RETRY)
    await nodes.start("n2", IP, **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    load = Loaded(nodes, Hold(sink))
    for key in load.keys:
        await load.send(key, 2)
    await eventually(lambda: deferred_everywhere(nodes, "n1", load.keys))
    yield load


async def placement(nodes: Nodes) -> dict[str, list[str]]:
    return {id: await keys_on(nodes, id) for id in sorted(nodes.running)}


async def test_dry_run_plans_and_touches_nothing(loaded: Loaded, consul: Any, monitor_stub: Stub) -> None:
    before = await placement(loaded.nodes)
    load = await unfinished(loaded.nodes)
    planned = await monitor_stub.Rebalance(m.RebalanceRequest(dry_run=True), timeout=10)
    assert moves_of(planned.moves) == [(k, "n1", "n2") for k in loaded.keys[:3]]
    assert all(mv.state == m.PIPELINE_MOVE_STATE_PLANNED for mv in planned.moves)
    # Pipelines with queued mail are planned like any other.
    assert all(mv.pipeline.counters.deferred + mv.pipeline.counters.in_flight > 0 for mv in planned.moves)
    assert list(planned.skipped) == []
    assert dict(planned.planned_pipelines_per_node) == {"n1": 3, "n2": 3}
    # Nothing moved, nothing was locked, no mail went out.
    assert await placement(loaded.nodes) == before == {"n1": loaded.keys, "n2": []}
    assert await unfinished(loaded.nodes) == load
    _, entry = await consul.kv.get(lock.REBALANCE)
    assert entry is None
    assert [(await owner_of(consul, k)) for k in loaded.keys] == [
        Owner("n1", loaded.nodes.running["n1"].address)
    ] * len(loaded.keys)


async def test_rebalance_under_load_moves_the_mail_and_loses_none(
    loaded: Loaded, sink: Sink, consul: Any, monitor_stub: Stub
) -> None:
    stop = asyncio.Event()
    sending = asyncio.create_task(loaded.keep_sending(stop))
    try:
        done = await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=60)
    finally:
        # A few more rounds against the moved keys, then stop.
        await asyncio.sleep(0.2)
        stop.set()
        sent = await sending
    assert sent > 2 * len(loaded.keys)
    assert moves_of(done.moves) == [(k, "n1", "n2") for k in loaded.keys[:3]]
    assert [mv.state for mv in done.moves] == [m.PIPELINE_MOVE_STATE_MOVED] * 3
    assert all(mv.messages_moved >= 2 for mv in done.moves), [mv.messages_moved for mv in done.moves]
    assert all(mv.pipeline.node == "n2" and not mv.error_message for mv in done.moves)
    assert dict(done.planned_pipelines_per_node) == {"n1": 3, "n2": 3}
    assert await placement(loaded.nodes) == {"n1": loaded.keys[3:], "n2": loaded.keys[:3]}
    # The sender followed the moved keys to n2.
    n2 = loaded.nodes.running["n2"].address
    assert [k for k, a in loaded.owners.items() if a == n2] == loaded.keys[:3]
    _, entry = await consul.kv.get(lock.REBALANCE)
    assert entry is None or not entry.get("Session")
    assert received_ids(sink) == {}  # all of it was held until now

    loaded.hold.on = False
    await eventually(lambda: equals(unfinished(loaded.nodes), 0))
    assert received_ids(sink) == dict.fromkeys(loaded.accepted, 1)
    assert len(loaded.accepted) == 2 * len(loaded.keys) + sent
    # Balanced now: nothing more to move.
    again = await monitor_stub.Rebalance(m.RebalanceRequest(dry_run=True), timeout=10)
    assert list(again.moves) == []


async def test_a_held_lock_aborts_the_rebalance_and_names_its_holder(
    loaded: Loaded, consul: Any, monitor_stub: Stub, http: aiohttp.ClientSession
) -> None:
    session = await consul.session.create(name="another monitor", behavior="release", lock_delay=1, ttl=30)
    try:
        holder = json.dumps({"monitor": "monitor-other", "address": "10.0.0.9:50052"})
        assert await consul.kv.put(lock.REBALANCE, holder, acquire=session)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert e.value.details() == (
            f"another rebalance is under way: {lock.REBALANCE} is held by monitor monitor-other"
            f" at 10.0.0.9:50052 (session {session})"
        )
        async with http.post("/admin/pipelines:rebalance", json={}) as resp:
            assert resp.status == 409, await resp.text()
            assert (await resp.json())["message"] == e.value.details()
        # Nothing moved; a dry run needs no lock.
        assert await placement(loaded.nodes) == {"n1": loaded.keys, "n2": []}
        async with http.post("/admin/pipelines:rebalance", json={"dryRun": True}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        assert [(mv["routingKey"], mv["toNode"], mv["state"]) for mv in body["moves"]] == [
            (k, "n2", "PIPELINE_MOVE_STATE_PLANNED") for k in loaded.keys[:3]
        ]
    finally:
        await consul.session.destroy(session)
    # The monitor's session for the refused attempt is gone too.
    _, sessions = await consul.session.list()
    assert [s["Name"] for s in sessions if s["Name"].startswith("epoxi-monitor")] == []


async def test_concurrent_rebalances_one_acts_the_other_is_aborted(
    nodes: Nodes, sink: Sink, consul: Any, default_policy: None, monitor: RunningMonitor, monitor_stub: Stub
) -> None:
    # A long stop grace: the first move's stop waits for the delivery the sink stalls.
    await nodes.start("n1", IP, stop_grace=30.0, **FAST_RETRY)
    await nodes.start("n2", IP, **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    stalled, release = asyncio.Event(), asyncio.Event()

    async def stall(rcpt: str) -> None:
        if rcpt.startswith("rcpt-stall-"):
            stalled.set()
            await release.wait()

    sink.rcpt_hook = stall
    first_key, second_key = key_of("a.example", IP), key_of("b.example", IP)
    await enqueue(nodes, nodes.running["n1"].address, second_key, mail("b.example", IP, "plain"), "b1")
    await enqueue(nodes, nodes.running["n1"].address, first_key, mail("a.example", IP, "stall"), "b2")
    await stalled.wait()

    async def rebalance() -> m.RebalanceResponse:
        response: m.RebalanceResponse = await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=30)
        return response

    async def locked() -> bool:
        _, entry = await consul.kv.get(lock.REBALANCE)
        return bool(entry and entry.get("Session"))

    first = asyncio.create_task(rebalance())
    try:
        await eventually(locked)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await monitor_stub.Rebalance(m.RebalanceRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert f"is held by monitor monitor-test at {monitor.address}" in (e.value.details() or "")
        assert not first.done()
    finally:
        release.set()
    done = await first
    # The in-flight delivery finished on n1; nothing was queued, so n2 started the key afresh.
    assert [(mv.routing_key, mv.to_node, mv.state, mv.messages_moved) for mv in done.moves] == [
        (first_key, "n2", m.PIPELINE_MOVE_STATE_MOVED, 0)
    ]
    assert await placement(nodes) == {"n1": [second_key], "n2": [first_key]}
    assert not await locked()
    await eventually(lambda: equals(unfinished(nodes), 0))
    assert received_ids(sink) == {"<plain-0@epoxi.test>": 1, "<stall-0@epoxi.test>": 1}
