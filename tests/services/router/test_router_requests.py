"""What a RouteEmails response tells the caller about each email: its batch, its index in the
request, its Message-ID and the batch's idempotency key; and that sending the same request again
names the same messages, so a node spools nothing twice. Over real gRPC, against test nodes
that answer as the node contract says (tests/services/router/nodes.py)."""

from __future__ import annotations

from epoxi.v1 import router_pb2
from services.router.main import RunningRouter
from tests.services.router.nodes import ContractNodes
from tests.services.router.support import email, route, sees

ACCEPTED = router_pb2.BATCH_STATUS_ACCEPTED
FAILED = router_pb2.BATCH_STATUS_FAILED


async def test_the_same_request_twice_names_the_same_messages_and_is_spooled_once(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a = await contract_nodes.start("a", "127.0.0.2")
    await contract_nodes.all_passing()
    await sees(router, "a")
    # No Message-IDs given; two of the emails are identical.
    emails = [
        email("x@gmail.com", ip="127.0.0.2"),
        email("y@yahoo.com", ip="127.0.0.2"),
        email("x@gmail.com", ip="127.0.0.2"),
    ]
    first = await route(router, *emails)
    again = await route(router, *emails)
    key = [(b.routing_key, list(b.email_message_ids), b.idempotency_key) for b in first.batches]
    assert key == [(b.routing_key, list(b.email_message_ids), b.idempotency_key) for b in again.batches]
    gmail, yahoo = first.batches
    assert len(set(gmail.email_message_ids)) == 2  # identical emails, two messages
    assert all(m.endswith("@sender.test>") for b in first.batches for m in b.email_message_ids)
    # The node knows each batch the second time: the same spool IDs, nothing spooled again.
    assert [list(b.message_ids) for b in again.batches] == [list(b.message_ids) for b in first.batches]
    assert len(a.spooled) == 2 and len(a.calls) == 4
    assert {c.idempotency_key for c in a.calls} == {gmail.idempotency_key, yahoo.idempotency_key}
    # The emails the node received carry the Message-IDs the response lists.
    for b in first.batches:
        received = a.spooled[b.idempotency_key].request.emails
        assert [e.message_id for e in received] == list(b.email_message_ids)
    assert (again.successful_batches, again.new_pipelines_started) == (2, 0)


async def test_every_batch_lists_the_indexes_of_its_emails_across_keys_and_domains(
    router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    await contract_nodes.start("a", "127.0.0.2")
    await contract_nodes.all_passing()
    await sees(router, "a")
    emails = [
        email("x@gmail.com", ip="127.0.0.2"),
        email("y@yahoo.com", "z@gmail.com", "w@gmail.com", ip="127.0.0.2", message_id="<given@sender.test>"),
        email("v@gmail.com", pool="nope"),  # no node sends from pool "nope"
        email("u@gmail.com", ip="127.0.0.9"),  # no node sends from 127.0.0.9
        email("t@yahoo.com", ip="127.0.0.2"),
    ]
    reply = await route(router, *emails)
    shown = [
        (b.routing_key, list(b.email_indexes), b.status, b.email_count, b.recipient_count)
        for b in reply.batches
    ]
    assert shown == [
        ("", [2], FAILED, 1, 0),
        ("gmail.com_127_0_0_2", [0, 1], ACCEPTED, 2, 3),
        ("yahoo.com_127_0_0_2", [1, 4], ACCEPTED, 2, 2),
        ("gmail.com_127_0_0_9", [3], FAILED, 1, 1),
    ]
    unroutable, gmail, yahoo, nowhere = reply.batches
    assert unroutable.error == "no passing node sends from ip pool 'nope'"
    assert nowhere.error == "no passing node owns source IP 127.0.0.9"
    # The email to two domains is one message in both of its batches.
    assert gmail.email_message_ids[1] == yahoo.email_message_ids[0] == "<given@sender.test>"
    for b in reply.batches:
        assert len(b.email_message_ids) == len(b.email_indexes) == b.email_count and b.idempotency_key
    assert len({b.idempotency_key for b in reply.batches}) == 4
    assert (reply.total_emails, reply.total_batches, reply.accepted_recipients) == (5, 4, 5)
    assert (reply.successful_batches, reply.failed_batches, reply.unknown_batches) == (2, 2, 0)
