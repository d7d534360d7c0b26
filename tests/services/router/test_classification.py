"""How the router classifies each EnqueueBatch outcome, over real gRPC, against test nodes on
real ports that answer as the node contract says (tests/services/router/nodes.py), registered
in the dev registry."""

from __future__ import annotations

import grpc
import pytest

from epoxi.registry.ownership import Owner
from epoxi.v1 import router_pb2
from services.router.main import RunningRouter
from services.router.servicer import DISAGREEMENT
from tests.services.router.nodes import ContractNode, ContractNodes, Fault, Script
from tests.services.router.support import email, route, sees

IP = "127.0.0.2"
KEY = "example.com_127_0_0_2"
ACCEPTED = router_pb2.BATCH_STATUS_ACCEPTED
FAILED = router_pb2.BATCH_STATUS_FAILED
UNKNOWN = router_pb2.BATCH_STATUS_UNKNOWN


async def two_nodes(router: RunningRouter, nodes: ContractNodes) -> tuple[ContractNode, ContractNode]:
    """Nodes a and b, both sending from IP, passing in the router's view. Equal: a ranks first."""
    a = await nodes.start("a", IP)
    b = await nodes.start("b", IP)
    await nodes.all_passing()
    await sees(router, "a", "b")
    return a, b


def counts(reply: router_pb2.RouteEmailsResponse) -> tuple[int, int, int, int]:
    return (reply.successful_batches, reply.failed_batches, reply.unknown_batches, reply.fallbacks_used)


async def test_an_accepted_batch_names_its_node_and_the_key_is_not_looked_up_again(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    first = await route(router, email("x@example.com", ip=IP))
    [batch] = first.batches
    assert (batch.status, batch.ok, batch.node, batch.error) == (ACCEPTED, True, "a", "")
    assert batch.new_pipeline
    [call] = a.calls
    assert call.idempotency_key == batch.idempotency_key and call.routing_key == KEY
    assert list(batch.message_ids) == a.spooled[batch.idempotency_key].message_ids
    assert list(batch.email_message_ids) == [e.message_id for e in call.emails]
    assert (first.new_pipelines_started, first.accepted_recipients, counts(first)) == (1, 1, (1, 0, 0, 0))
    reads = router.servicer.owners.registry_reads

    second = await route(router, email("y@example.com", ip=IP))
    [batch] = second.batches
    assert (batch.status, batch.node, batch.new_pipeline) == (ACCEPTED, "a", False)
    assert router.servicer.owners.registry_reads == reads  # the cache answered
    assert b.calls == []


async def test_a_refusal_is_definite_and_the_next_node_takes_the_batch(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    # Not UNAVAILABLE: the channel itself retries that (epoxi.runtime.channels), refused or not.
    a.faults.append(Script(Fault.REFUSE, grpc.StatusCode.RESOURCE_EXHAUSTED, "spool is full"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node, batch.new_pipeline) == (ACCEPTED, "b", True)
    assert batch.error == "node a: RESOURCE_EXHAUSTED: spool is full"
    assert (len(a.calls), len(b.calls), a.spooled) == (1, 1, {})  # a was not asked again
    assert counts(reply) == (1, 0, 0, 1)


async def test_refusals_on_every_node_fail_the_batch(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    a.faults.append(Script(Fault.REFUSE, grpc.StatusCode.FAILED_PRECONDITION, "stopping"))
    b.faults.append(Script(Fault.REFUSE, grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.ok, batch.node, list(batch.message_ids)) == (FAILED, False, "", [])
    assert batch.error == "node a: FAILED_PRECONDITION: stopping; node b: RESOURCE_EXHAUSTED: too busy"
    assert counts(reply) == (0, 1, 0, 0)
    assert list(batch.email_indexes) == [0] and batch.idempotency_key


async def test_an_invalid_batch_fails_and_no_other_node_is_tried(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    a.faults.append(Script(Fault.REFUSE, grpc.StatusCode.INVALID_ARGUMENT, "emails[0] is too large"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.error) == (
        FAILED,
        f"node a: INVALID_ARGUMENT: emails[0] is too large ({DISAGREEMENT})",
    )
    assert (len(a.calls), b.calls) == (1, [])


async def test_an_error_without_the_marker_sends_the_batch_to_the_same_node_again(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    a.faults.append(Script(Fault.UNMARKED, grpc.StatusCode.INTERNAL, "boom"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "a")
    assert batch.error == "node a: INTERNAL: boom; sent again"
    assert (len(a.calls), b.calls, counts(reply)) == (2, [], (1, 0, 0, 0))


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN])
async def test_a_lost_reply_is_sent_again_and_the_node_knows_the_batch_by_its_key(
    router: RunningRouter, contract_nodes: ContractNodes, code: grpc.StatusCode
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    # a spools the batch, then the reply is lost.
    a.faults.append(Script(Fault.LOSE_REPLY, code, "reply lost"))
    reply = await route(router, email("x@example.com", ip=IP), email("y@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "a")
    assert batch.error == f"node a: {code.name}: reply lost; sent again"
    [spooled] = a.spooled.values()  # once, though it was sent twice
    assert list(batch.message_ids) == spooled.message_ids
    assert [c.idempotency_key for c in a.calls] == [batch.idempotency_key] * 2
    assert b.calls == []


async def test_a_reply_lost_twice_leaves_the_batch_unknown(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    for _ in range(2):
        a.faults.append(Script(Fault.LOSE_REPLY, grpc.StatusCode.DEADLINE_EXCEEDED, "reply lost"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    # a may have it (it does); b refuses, naming a, which was tried already.
    assert (batch.status, batch.ok, batch.node) == (UNKNOWN, False, "")
    assert batch.error.startswith(
        "node a: DEADLINE_EXCEEDED: reply lost; sent again; node a: DEADLINE_EXCEEDED: reply lost; "
        "node b: FAILED_PRECONDITION: routing key 'example.com_127_0_0_2' runs on node a"
    )
    assert counts(reply) == (0, 0, 1, 0) and reply.total_batches == 1
    assert (len(a.spooled), len(a.calls), b.spooled) == (1, 2, {})
    # Sending the same emails again is safe: the node answers with what it spooled.
    again = await route(router, email("x@example.com", ip=IP))
    [retried] = again.batches
    assert (retried.status, retried.idempotency_key) == (ACCEPTED, batch.idempotency_key)
    assert list(retried.message_ids) == a.spooled[batch.idempotency_key].message_ids
    assert len(a.spooled) == 1


async def test_a_node_that_cannot_be_reached_is_skipped_as_nothing_was_sent(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    await contract_nodes.start_unreachable("a", IP)
    b = await contract_nodes.start("b", IP)
    await contract_nodes.all_passing()
    await sees(router, "a", "b")
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "b")
    assert batch.error.startswith("node a: UNAVAILABLE: failed to connect to all addresses")
    assert "sent again" not in batch.error and counts(reply) == (1, 0, 0, 1)
    # b is the key's owner now: the next batch goes there first.
    reply = await route(router, email("y@example.com", ip=IP))
    assert [(b.node, b.error) for b in reply.batches] == [("b", "")]
    assert len(b.calls) == 2


async def test_a_redirect_sends_the_batch_to_the_owner_it_names(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    a.redirect_to = Owner("b", b.info.address)  # as a node whose record read raced b's claim
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "b")
    assert batch.error == f"node a: FAILED_PRECONDITION: routing key {KEY!r} is owned by another node"
    assert router.servicer.owners.cache.get(KEY) == Owner("b", b.info.address)
    assert counts(reply) == (1, 0, 0, 1)


async def test_a_redirect_to_a_node_that_is_not_passing_goes_on_to_the_next(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, _ = await two_nodes(router, contract_nodes)
    a.redirect_to = Owner("gone", "127.0.0.1:1")
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "b")
    assert batch.error.startswith("node a: FAILED_PRECONDITION")


async def test_a_stale_cache_entry_is_corrected_by_the_redirect(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    first = await route(router, email("x@example.com", ip=IP))
    assert [x.node for x in first.batches] == ["a"]
    # The key moves to b; the router's cache still names a.
    await a.release(KEY)
    assert await b.ownership.claim(KEY) is None
    reads = router.servicer.owners.registry_reads

    moved = await route(router, email("y@example.com", ip=IP))
    [batch] = moved.batches
    assert (batch.status, batch.node) == (ACCEPTED, "b")
    assert batch.error == f"node a: FAILED_PRECONDITION: routing key {KEY!r} runs on node b"
    assert router.servicer.owners.cache.get(KEY) == Owner("b", b.info.address)
    # The redirect named the owner: no registry read was needed, and the next batch goes to b.
    settled = await route(router, email("z@example.com", ip=IP))
    assert [(x.node, x.error) for x in settled.batches] == [("b", "")]
    assert router.servicer.owners.registry_reads == reads
    assert len(a.calls) == 2 and len(b.calls) == 2


async def test_an_unavailable_refusal_is_retried_by_the_channel_only_then_the_next_node(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a, b = await two_nodes(router, contract_nodes)
    # The channel's retry policy resends UNAVAILABLE up to 3 attempts in all (safe: refused).
    for _ in range(3):
        a.faults.append(Script(Fault.REFUSE, grpc.StatusCode.UNAVAILABLE, "cannot claim the key now"))
    reply = await route(router, email("x@example.com", ip=IP))
    [batch] = reply.batches
    assert (batch.status, batch.node) == (ACCEPTED, "b")
    assert batch.error == "node a: UNAVAILABLE: cannot claim the key now"
    assert (len(a.calls), a.spooled, len(b.calls)) == (3, {}, 1)
