"""New keys spread over the nodes that own their IP, by epoxi.placement's metric, over real gRPC
with real nodes, the dev registry and the SMTP sink."""

from __future__ import annotations

from collections import Counter

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.envelope import new_email
from epoxi.registry import services
from epoxi.registry.client import Consul
from epoxi.v1 import email_pb2
from services.router.main import RunningRouter
from tests.services.router.support import route
from tests.support import Nodes, eventually, passing_nodes


def email(domain: str, ip: str) -> email_pb2.Email:
    return new_email(
        "a@sender.test", to=[f"u@{domain}"], subject="s", text="t", delivery=email_pb2.Delivery(ip=ip)
    )


async def registered_pipelines(consul: Consul) -> Counter[str]:
    _, entries = await consul.health.service(services.PIPELINE_SERVICE, passing=True)
    return Counter(services.pipeline_from_entry(e).node for e in entries)


async def test_one_request_spreads_its_new_keys_over_the_owners(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    for node_id in ("a", "b"):
        await nodes.start(node_id, "127.0.0.2", retry_base=0.05)
    await nodes.start("c", "127.0.0.3", retry_base=0.05)  # passing, but owns no IP of these keys
    await eventually(lambda: has_all(consul, {"a", "b", "c"}), seconds=20)

    reply = await route(router, *(email(f"d{i}.example", "127.0.0.2") for i in range(20)))
    assert reply.successful_batches == reply.new_pipelines_started == 20, reply
    assert Counter(b.node for b in reply.batches) == {"a": 10, "b": 10}
    await sink.wait_for(20)

    # The next new keys count what the registry now shows: still even, within one.
    await eventually(lambda: total_is(consul, 20))
    reply = await route(router, *(email(f"e{i}.example", "127.0.0.2") for i in range(3)))
    placed = Counter(b.node for b in reply.batches)
    assert set(placed) <= {"a", "b"} and sum(placed.values()) == 3
    counts = await eventually(lambda: total_is(consul, 23))
    assert abs(counts["a"] - counts["b"]) <= 1, counts


async def test_a_key_already_running_stays_where_it_runs(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    for node_id in ("a", "b"):
        await nodes.start(node_id, "127.0.0.2", retry_base=0.05)
    await eventually(lambda: has_all(consul, {"a", "b"}), seconds=20)
    await nodes.start_pipeline("b", "d0.example", "127.0.0.2")
    await eventually(lambda: total_is(consul, 1))
    # d0 goes where it runs; the new keys go to a first (b has one pipeline already).
    reply = await route(router, *(email(f"d{i}.example", "127.0.0.2") for i in range(4)))
    assert [(b.routing_key.split("_")[0], b.node, b.new_pipeline) for b in reply.batches] == [
        ("d0.example", "b", False),
        ("d1.example", "a", True),
        ("d2.example", "a", True),
        ("d3.example", "b", True),
    ]
    await sink.wait_for(4)


async def has_all(consul: Consul, ids: set[str]) -> bool:
    return await passing_nodes(consul) >= ids


async def total_is(consul: Consul, n: int) -> Counter[str] | None:
    counts = await registered_pipelines(consul)
    return counts if sum(counts.values()) == n else None
