"""StopPipelineByRoutingKey with mail queued: handed to a peer that owns the IP, or kept and
sent by the pipeline started again; real nodes, the dev registry and a sink that holds the mail."""

from __future__ import annotations

from typing import Any

import pytest

from devmesh.sink import Sink
from epoxi.registry import services
from epoxi.registry.ownership import owner_of
from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc, node_pb2
from tests.services.monitor.support import (
    FAST_RETRY,
    Hold,
    contains,
    enqueue,
    equals,
    ids_of,
    key_of,
    keys_on,
    mail,
    received_ids,
    register_pipeline,
    unfinished,
)
from tests.support import Nodes, eventually, passing_nodes, unused_address

Stub = monitor_pb2_grpc.MonitorServiceStub

pytestmark = pytest.mark.usefixtures("default_policy")


async def queued_on(nodes: Nodes, id: str, count: int) -> bool:
    """``id`` holds ``count`` unfinished messages, every one attempted and deferred."""
    return await unfinished(nodes) == count and await _deferred(nodes, id) == count


async def _deferred(nodes: Nodes, id: str) -> int:
    state = await nodes.stub(id).GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
    return sum(p.counters.deferred for p in state.pipelines)


async def service_ids(consul: Any) -> set[str]:
    _, entries = await consul.health.service(services.PIPELINE_SERVICE)
    return {e["Service"]["ID"] for e in entries}


async def all_delivered_once(nodes: Nodes, sink: Sink, ids: list[str]) -> None:
    """Every one of ``ids`` reaches the sink, nothing is left to send anywhere (so nothing more
    can arrive), and the sink got each exactly once."""
    await eventually(lambda: equals(unfinished(nodes), 0))
    assert received_ids(sink) == dict.fromkeys(ids, 1)


async def test_stop_hands_queued_mail_to_a_peer_owning_the_ip(
    nodes: Nodes, sink: Sink, consul: Any, monitor_stub: Stub
) -> None:
    await nodes.start("n1", "127.0.0.2", **FAST_RETRY)
    await nodes.start("n2", "127.0.0.2", **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    hold = Hold(sink)
    key = key_of("example.org", "127.0.0.2")
    emails = mail("example.org", "127.0.0.2", "stop", 5)
    assert await enqueue(nodes, nodes.running["n1"].address, key, emails, "b1") == nodes.running["n1"].address
    await eventually(lambda: queued_on(nodes, "n1", 5))

    response = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key=key), timeout=20
    )
    [outcome] = response.outcomes
    assert (response.stopped_count, outcome.node, outcome.stopped, outcome.pipeline.routing_key) == (
        1,
        "n1",
        True,
        key,
    )
    assert (outcome.messages_handed_off, outcome.handed_to_node, outcome.messages_kept) == (5, "n2", 0)
    assert (outcome.kept_reason, outcome.error_code) == ("", "")
    # n2 took the key with its mail; n1 runs it no more.
    assert await keys_on(nodes, "n1") == []
    assert await keys_on(nodes, "n2") == [key]
    owner = await owner_of(consul, key)
    assert owner is not None and owner.node == "n2"
    assert received_ids(sink) == {}

    hold.on = False
    await all_delivered_once(nodes, sink, ids_of(emails))
    assert {r.peer for r in sink.received} == {"127.0.0.2"}


async def test_stop_keeps_the_mail_when_no_other_node_owns_the_ip(
    nodes: Nodes, sink: Sink, consul: Any, monitor_stub: Stub
) -> None:
    await nodes.start("n1", "127.0.0.2", "127.0.0.3", **FAST_RETRY)
    await nodes.start("n2", "127.0.0.2", **FAST_RETRY)
    await eventually(lambda: equals(passing_nodes(consul), {"n1", "n2"}))
    hold = Hold(sink)
    key = key_of("example.org", "127.0.0.3")
    emails = mail("example.org", "127.0.0.3", "keep", 4)
    await enqueue(nodes, nodes.running["n1"].address, key, emails, "b1")
    await eventually(lambda: queued_on(nodes, "n1", 4))

    response = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key=key), timeout=20
    )
    [outcome] = response.outcomes
    assert (outcome.node, outcome.stopped, outcome.messages_handed_off, outcome.handed_to_node) == (
        "n1",
        True,
        0,
        "",
    )
    assert (outcome.messages_kept, outcome.kept_reason) == (4, "no other passing node sends from 127.0.0.3")
    # The pipeline runs again on n1, for the mail it kept.
    assert await keys_on(nodes, "n1") == [key]
    assert await keys_on(nodes, "n2") == []

    hold.on = False
    await all_delivered_once(nodes, sink, ids_of(emails))
    assert {r.peer for r in sink.received} == {"127.0.0.3"}


async def test_stop_reaches_the_record_holder_and_every_registered_runner(
    nodes: Nodes, sink: Sink, consul: Any, monitor_stub: Stub
) -> None:
    """The registry shows the key on a node that is gone, and not on n1, which holds its record."""
    # Registry rounds 30 s apart: n1 does not register its pipeline again during the test.
    await nodes.start("n1", "127.0.0.2", **{**FAST_RETRY, "check_interval": 30.0})
    key = key_of("example.org", "127.0.0.2")
    emails = mail("example.org", "127.0.0.2", "both", 2)
    await enqueue(nodes, nodes.running["n1"].address, key, emails, "b1")
    await eventually(lambda: equals(unfinished(nodes), 0))
    registered = services.pipeline_service_id("n1", key)
    await eventually(lambda: contains(service_ids(consul), registered))
    await consul.agent.service.deregister(registered)
    await register_pipeline(consul, "ghost", "example.org", "127.0.0.2", unused_address())
    assert await service_ids(consul) == {services.pipeline_service_id("ghost", key)}

    response = await monitor_stub.StopPipelineByRoutingKey(
        m.StopPipelineByRoutingKeyRequest(routing_key=key), timeout=20
    )
    assert response.stopped_count == 1
    assert [(o.node, o.stopped, o.error_code) for o in response.outcomes] == [
        ("ghost", False, "UNAVAILABLE"),
        ("n1", True, ""),
    ]
    assert response.outcomes[1].messages_handed_off == response.outcomes[1].messages_kept == 0
    assert await owner_of(consul, key) is None
    assert received_ids(sink) == dict.fromkeys(ids_of(emails), 1)
