"""Raw mail (Email.raw, RouteRawEmail) and the Idempotency-Key, over real gRPC: the router, real
nodes and a real SMTP sink. A raw message reaches the sink byte for byte, and a retried call
with the same Idempotency-Key spools nothing twice."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.api import httpbody_pb2

from devmesh.sink import Sink
from epoxi import policy_store
from epoxi.registry.client import Consul
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, node_pb2, router_pb2, router_pb2_grpc
from services.node.outbound import DeliveryConfig
from services.router.main import RunningRouter
from services.router.raw import raw_email
from tests.services.router.support import route, sees
from tests.support import Nodes, eventually, stored_policy

IP = "127.0.0.2"

MESSAGE = (
    "From: =?utf-8?q?J=C3=B6rg?= <jorg@sender.test>\r\n"
    "To: ann@a.test, Bob <bob@b.test>\r\n"
    "Bcc: hidden@a.test\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    "Message-ID: <raw-1@sender.test>\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=x;\r\n"
    "\tbh=abc; b=def\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "..a line that starts with a dot\r\n"
    ".\r\n"
    "Grüße, größer als 8 Bit\r\n"
).encode()


def raw(
    content: bytes, *rcpt_to: str, mail_from: str = "bounce@sender.test", **fields: object
) -> email_pb2.Email:
    return email_pb2.Email(
        raw=email_pb2.RawMessage(mail_from=mail_from, rcpt_to=list(rcpt_to), content=content),
        delivery=email_pb2.Delivery(ip=IP),
        **fields,  # type: ignore[arg-type]
    )


async def call(
    router: RunningRouter,
    request: router_pb2.RouteEmailsRequest | router_pb2.RouteRawEmailRequest,
    metadata: Sequence[tuple[str, str]] = (),
) -> router_pb2.RouteEmailsResponse:
    async with channel(router.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        if isinstance(request, router_pb2.RouteRawEmailRequest):
            reply: router_pb2.RouteRawEmailResponse = await stub.RouteRawEmail(
                request, metadata=metadata, timeout=30
            )
            return reply.summary
        result: router_pb2.RouteEmailsResponse = await stub.RouteEmails(
            request, metadata=metadata, timeout=30
        )
        return result


async def invalid(router: RunningRouter, request: object, metadata: Sequence[tuple[str, str]] = ()) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(router, request, metadata)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details() or ""


@pytest.fixture
async def node(nodes: Nodes, router: RunningRouter, consul: Consul) -> Nodes:
    # Pipelines the node starts for new mail batch without waiting.
    await policy_store.put_policy(consul, policy_store.DEFAULT_POLICY, stored_policy())
    await nodes.start("n1", IP, retry_base=0.05)
    await sees(router, "n1")
    return nodes


async def test_a_raw_email_reaches_the_sink_byte_for_byte(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    reply = await route(router, raw(MESSAGE, "ann@a.test", "hidden@a.test", "bob@b.test"))
    assert reply.successful_batches == 2, reply
    assert {b.routing_key: list(b.email_message_ids) for b in reply.batches} == {
        "a.test_127_0_0_2": ["<raw-1@sender.test>"],
        "b.test_127_0_0_2": ["<raw-1@sender.test>"],
    }
    assert reply.accepted_recipients == 3
    got = await sink.wait_for(3)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["ann@a.test", "bob@b.test", "hidden@a.test"]
    assert all(m.data == MESSAGE and m.mail_from == "bounce@sender.test" for m in got)

    # Queue inspection reads the raw header.
    [a_id] = next(b for b in reply.batches if b.routing_key.startswith("a.test")).message_ids
    found = await node.stub("n1").GetMessage(node_pb2.GetMessageRequest(message_id=a_id), timeout=5)
    assert (found.message.subject, found.message.message_id_header) == ("Grüße", "<raw-1@sender.test>")


async def test_lf_line_ends_become_crlf_and_a_null_sender_is_kept(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    reply = await route(router, raw(b"Subject: lf\n\nbody", "ann@a.test", mail_from=""))
    assert reply.successful_batches == 1, reply
    [m] = await sink.wait_for(1)
    assert (m.data, m.mail_from) == (b"Subject: lf\r\n\r\nbody\r\n", "<>")
    # No Message-ID field: one derived from the content and envelope, the same each time.
    again = await route(router, raw(b"Subject: lf\n\nbody", "ann@a.test", mail_from=""))
    assert again.batches[0].email_message_ids == reply.batches[0].email_message_ids
    assert again.batches[0].message_ids == reply.batches[0].message_ids  # spooled once


async def test_one_message_in_two_transactions_to_other_recipients_is_sent_twice(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    first = await route(router, raw(MESSAGE, "ann@a.test"))
    second = await route(router, raw(MESSAGE, "hidden@a.test"))
    assert first.batches[0].message_ids != second.batches[0].message_ids
    got = await sink.wait_for(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["ann@a.test", "hidden@a.test"]


async def test_raw_email_problems_name_the_field(router: RunningRouter) -> None:
    details = await invalid(
        router,
        router_pb2.RouteEmailsRequest(
            emails=[
                raw(MESSAGE, "Ann <ann@a.test>", mail_from="not an address", subject="s"),
                raw(b"no header here\r\n", "ann@a.test"),
                raw(b"Subject: x\r\n\r\n" + b"x" * 999 + b"\r\n", "ann@a.test"),
                raw(b"Subject: x\r\n\r\nbare\rcr\r\n"),
            ]
        ),
    )
    for expected in (
        "emails[0].subject must be empty with raw set",
        "emails[0].raw.mail_from 'not an address' is not an email address",
        "emails[0].raw.rcpt_to[0] 'Ann <ann@a.test>' is not a bare addr-spec",
        "emails[1].raw.content does not start with a header field",
        "emails[2].raw.content has a line longer than 998 octets",
        "emails[3].raw.rcpt_to is empty",
        "emails[3].raw.content has a CR not followed by LF",
    ):
        assert expected in details, details


async def test_the_same_idempotency_key_spools_nothing_twice(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    request = router_pb2.RouteEmailsRequest(emails=[raw(MESSAGE, "ann@a.test")])
    first = await call(router, request, [("idempotency-key", "order-42")])
    again = await call(router, request, [("idempotency-key", "order-42")])
    other = await call(router, request, [("idempotency-key", "order-43")])
    assert first.batches[0].message_ids == again.batches[0].message_ids
    assert first.batches[0].idempotency_key == again.batches[0].idempotency_key
    assert other.batches[0].message_ids != first.batches[0].message_ids
    plain = await call(router, request)
    assert (
        len(
            {
                first.batches[0].idempotency_key,
                other.batches[0].idempotency_key,
                plain.batches[0].idempotency_key,
            }
        )
        == 3
    )
    stats = await node.stub("n1").GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
    t = stats.totals
    assert t.queued + t.in_flight + t.deferred + t.delivered == 3  # order-42 once, order-43, no key


@pytest.mark.parametrize(
    ("key", "problem"),
    # gRPC itself refuses to send a value that is not printable ASCII.
    [
        ("", "is empty"),
        ("x" * 256, "at most 255"),
    ],
)
async def test_a_bad_idempotency_key_is_invalid(router: RunningRouter, key: str, problem: str) -> None:
    request = router_pb2.RouteEmailsRequest(emails=[raw(MESSAGE, "ann@a.test")])
    details = await invalid(router, request, [("idempotency-key", key)])
    assert "idempotency-key" in details and problem in details, details


def raw_request(
    data: bytes, content_type: str = "message/rfc822", **fields: object
) -> router_pb2.RouteRawEmailRequest:
    return router_pb2.RouteRawEmailRequest(
        message=httpbody_pb2.HttpBody(content_type=content_type, data=data),
        delivery=email_pb2.Delivery(ip=IP),
        **fields,  # type: ignore[arg-type]
    )


async def test_route_raw_email_takes_the_envelope_from_the_header_and_drops_bcc(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    summary = await call(router, raw_request(MESSAGE))
    assert (summary.total_emails, summary.successful_batches, summary.accepted_recipients) == (1, 2, 3)
    got = await sink.wait_for(3)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["ann@a.test", "bob@b.test", "hidden@a.test"]
    without_bcc = MESSAGE.replace(b"Bcc: hidden@a.test\r\n", b"")
    assert all(m.data == without_bcc and m.mail_from == "jorg@sender.test" for m in got)


async def test_route_raw_email_with_an_envelope_leaves_the_bytes_alone(
    router: RunningRouter, node: Nodes, sink: Sink
) -> None:
    summary = await call(router, raw_request(MESSAGE, mail_from="<>", rcpt_to=["hidden@a.test"]))
    assert summary.successful_batches == 1, summary
    [m] = await sink.wait_for(1)
    assert (m.data, m.mail_from, m.rcpt_tos) == (MESSAGE, "<>", ["hidden@a.test"])


async def test_route_raw_email_refuses_what_it_cannot_route(router: RunningRouter) -> None:
    details = await invalid(router, raw_request(MESSAGE, content_type="text/plain"))
    assert "message.content_type 'text/plain' is not message/rfc822" in details
    details = await invalid(router, raw_request(b"Subject: no one\r\n\r\nhi\r\n"))
    assert "mail_from is empty, and the From field has 0 addresses" in details
    assert "rcpt_to is empty, and the To, Cc and Bcc fields have no address" in details
    details = await invalid(router, raw_request(b""))
    assert "message.data is empty" in details


async def test_a_bounced_raw_email_gets_a_dsn_unless_its_sender_is_null(
    router: RunningRouter, nodes: Nodes, sink: Sink, consul: Consul
) -> None:
    await policy_store.put_policy(consul, "default", stored_policy())  # the DSN's pipeline: 20 ms batches
    await nodes.start(
        "n1", IP, retry_base=0.05, delivery=DeliveryConfig(dsn_from="MAILER-DAEMON@n1.epoxi.test")
    )
    await sees(router, "n1")
    sink.replies["gone@a.test"] = "550 5.1.1 no such user"
    reply = await route(
        router,
        raw(MESSAGE, "gone@a.test"),
        raw(MESSAGE.replace(b"raw-1", b"raw-2"), "gone@a.test", mail_from=""),
    )
    assert reply.successful_batches == 1, reply
    [dsn] = await sink.wait_for(1)
    assert (dsn.mail_from, dsn.rcpt_tos) == ("<>", ["bounce@sender.test"])
    assert b"Message-ID: <raw-1@sender.test>" in dsn.data  # the raw message's own header, attached
    assert b"550 5.1.1 no such user" in dsn.data

    async def both_bounced() -> bool:
        stats: node_pb2.GetQueueStatsResponse = await nodes.stub("n1").GetQueueStats(
            node_pb2.GetQueueStatsRequest(), timeout=5
        )
        return stats.totals.bounced == 2 and stats.totals.delivered == 1  # the two, and the DSN

    await eventually(both_bounced)
    assert [m.rcpt_tos for m in sink.received] == [["bounce@sender.test"]]  # none for the null sender


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (b"To: a@a.test\r\nBcc: b@a.test,\r\n c@a.test\r\n", b"To: a@a.test\r\n"),  # folded, last
        (b"BCC : b@a.test\r\nTo: a@a.test\r\n", b"To: a@a.test\r\n"),
        (b"To: a@a.test\nBcc: b@a.test\n", b"To: a@a.test\n"),  # LF line ends
    ],
)
def test_the_bcc_fields_go_when_the_recipients_come_from_the_header(head: bytes, kept: bytes) -> None:
    body = b"\r\nhi\r\n" if b"\r\n" in head else b"\nhi\n"
    email, problems = raw_email(
        raw_request(
            b"From: f@f.test\r\n" + head + body if b"\r\n" in head else b"From: f@f.test\n" + head + body
        )
    )
    assert problems == []
    assert sorted(email.raw.rcpt_to) == (
        ["a@a.test", "b@a.test", "c@a.test"] if b"c@" in head else ["a@a.test", "b@a.test"]
    )
    assert email.raw.content.endswith(kept + body)
    assert b"b@a.test" not in email.raw.content
