"""New keys spread over the nodes that own their IP, by epoxi.placement's metric and the router's
tally; a key that runs stays where it runs. Over real gRPC, against test nodes that answer as
the node contract says (tests/services/router/nodes.py), registered in the dev registry."""

from __future__ import annotations

from collections import Counter

from services.router.main import RunningRouter
from tests.services.router.nodes import ContractNodes
from tests.services.router.support import email, route, sees
from tests.support import eventually

IP = "127.0.0.2"


async def counts_are(router: RunningRouter, wanted: dict[str, int]) -> None:
    """Until the router's view shows these registered pipeline counts."""

    async def shown() -> bool:
        return router.view.snapshot().pipeline_counts == wanted

    await eventually(shown)


async def test_one_request_spreads_its_new_keys_over_the_owners(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    for node_id in ("a", "b"):
        await contract_nodes.start(node_id, IP)
    await contract_nodes.start("c", "127.0.0.3")  # passing, but owns no IP of these keys
    await contract_nodes.all_passing()
    await sees(router, "a", "b", "c")

    reply = await route(router, *(email(f"u@d{i}.example", ip=IP) for i in range(20)))
    assert reply.successful_batches == reply.new_pipelines_started == 20, reply
    assert Counter(b.node for b in reply.batches) == {"a": 10, "b": 10}
    assert router.servicer.owners.registry_reads == 20  # one record read per new key

    # Once the view shows what a and b registered, the tally has nothing left to add: the next
    # keys are ranked by the registered counts alone (a tally that still counted the 20 would
    # rank a, then b, the same; see the unequal case below).
    await counts_are(router, {"a": 10, "b": 10, "c": 0})
    reply = await route(router, *(email(f"u@e{i}.example", ip=IP) for i in range(3)))
    assert [b.node for b in reply.batches] == ["a", "b", "a"]


async def test_the_next_request_counts_what_the_nodes_registered_once(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a = await contract_nodes.start("a", IP)
    b = await contract_nodes.start("b", IP)
    await contract_nodes.all_passing()
    # b runs two keys already.
    for key in ("k1.example_127_0_0_2", "k2.example_127_0_0_2"):
        assert await b.ownership.claim(key) is None
        b.pipelines.add(key)
    await b.register()
    await counts_are(router, {"a": 0, "b": 2})

    reply = await route(router, *(email(f"u@d{i}.example", ip=IP) for i in range(2)))
    assert [x.node for x in reply.batches] == ["a", "a"]
    await counts_are(router, {"a": 2, "b": 2})
    # Registered and placed once each: 2 and 2, so the tie goes to a. Counted twice, a would
    # have 4 and the key would go to b.
    reply = await route(router, email("u@e0.example", ip=IP))
    assert [x.node for x in reply.batches] == ["a"]
    assert len(a.pipelines) == 3


async def test_a_key_already_running_stays_where_it_runs(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    await contract_nodes.start("a", IP)
    b = await contract_nodes.start("b", IP)
    await contract_nodes.all_passing()
    assert await b.ownership.claim("d0.example_127_0_0_2") is None
    b.pipelines.add("d0.example_127_0_0_2")
    await b.register()
    await counts_are(router, {"a": 0, "b": 1})
    # d0 goes where it runs; the new keys go to a first (b has one pipeline already).
    reply = await route(router, *(email(f"u@d{i}.example", ip=IP) for i in range(4)))
    assert [(x.routing_key.split("_")[0], x.node, x.new_pipeline) for x in reply.batches] == [
        ("d0.example", "b", False),
        ("d1.example", "a", True),
        ("d2.example", "a", True),
        ("d3.example", "b", True),
    ]
    assert all(x.error == "" for x in reply.batches)
