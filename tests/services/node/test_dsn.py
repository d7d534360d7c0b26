"""Bounces produce RFC 3464 delivery status notifications, delivered back to the sender."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import Message
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import formatdate
from typing import Any

import pytest

from devmesh.sink import Received, Sink
from epoxi import rendering
from services.node.engine.delivery import Destinations, Host, Result, SmtpSender, Status
from services.node.engine.dsn import Bouncer, Failure, build, original_headers
from services.node.engine.pipeline import Retry
from services.node.engine.spool import Counts, NewMessage, Spool
from services.node.supervisor import Node
from tests.services.node.conftest import SOURCE_IP, email, fast_policy
from tests.support import eventually

ORIGINAL = rendering.render(email("gone@example.com", "ok@example.com", subject="Quarterly report"))
SENDER_KEY = "sender.test_127_0_0_2"


def parse(data: bytes) -> Any:
    return BytesParser(policy=default_policy).parsebytes(data)


def delivery_status(dsn: Any) -> list[Message]:
    """The blocks of the message/delivery-status part: per message, then per recipient."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, headers = dsn.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks: list[Message] = status.get_payload()
    return blocks


def test_a_dsn_reports_each_failed_recipient() -> None:
    failures = [
        Failure("gone@example.com", Result.of_reply(550, "5.1.1 no such user", "mx.example.com"), 1.7e9),
        Failure("later@example.com", Result.transient("connection lost", "4.4.2"), 1.7e9 + 60),
    ]
    data = build(
        reporting_mta="n1.epoxi.test",
        dsn_from="MAILER-DAEMON@n1.epoxi.test",
        sender="ann@sender.test",
        original=ORIGINAL,
        arrival=1.7e9 - 3600,
        failures=failures,
    )
    dsn = parse(data)
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@n1.epoxi.test>"
    assert (dsn["To"], dsn["Auto-Submitted"]) == ("ann@sender.test", "auto-replied")
    per_message, gone, later = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; n1.epoxi.test"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 21:13:20 GMT"
    assert dict(gone.items()) == {
        "Final-Recipient": "rfc822; gone@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:13:20 GMT",
    }
    assert (later["Status"], later["Diagnostic-Code"]) == ("4.4.2", "X-Epoxi; 4.4.2 connection lost")
    assert "Remote-MTA" not in later
    human, _, headers = dsn.get_payload()
    assert "<gone@example.com> (host mx.example.com said): 550 5.1.1 no such user" in human.get_content()
    original = parse(headers.get_content().encode())
    assert original["Subject"] == "Quarterly report"
    assert b"hello" not in data  # the header only, not the body


def test_original_headers_stop_at_the_body() -> None:
    assert original_headers(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == "A: 1\nB: 2\n"
    assert original_headers(b"A: 1\n\nbody") == "A: 1\n"


@pytest.fixture
async def node(spool: Spool, sink: Sink) -> AsyncIterator[Node]:
    n = Node(
        id="n1",
        address="127.0.0.1:1",
        egress_ips=[SOURCE_IP],
        ip_pool="default",
        spool=spool,
        sender=SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "n1.epoxi.test", timeout=5),
        retry=Retry(0.01, 0.05),
        stop_grace=1.0,
    )
    n.bouncer = Bouncer(n, "MAILER-DAEMON@n1.epoxi.test", "n1.epoxi.test", fast_policy(SENDER_KEY))
    yield n
    await n.close()


def received_by(sink: Sink, rcpt: str) -> list[Received]:
    return [r for r in sink.received if rcpt in r.rcpt_tos]


async def test_a_bounce_sends_a_dsn_to_the_sender(node: Node, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await node.start_pipeline("example.com", SOURCE_IP, fast_policy())
    [mid] = await node.enqueue(p, [email("gone@example.com", "ok@example.com", subject="Quarterly report")])

    async def dsn_arrived() -> list[Received]:
        return received_by(sink, "ann@sender.test")

    [received] = await eventually(dsn_arrived)
    assert received.mail_from == "<>"  # the null path: a DSN never bounces back
    assert [r.rcpt_tos for r in received_by(sink, "ok@example.com")] == [["ok@example.com"]]
    dsn = received.message()
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, gone = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; n1.epoxi.test"
    stored = await node.spool.message(mid)
    assert stored is not None
    assert per_message["Arrival-Date"] == formatdate(stored[0].created_at, usegmt=True)
    assert (gone["Final-Recipient"], gone["Action"], gone["Status"]) == (
        "rfc822; gone@example.com",
        "failed",
        "5.1.1",
    )
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    _, _, headers = dsn.get_payload()
    assert "Subject: Quarterly report" in headers.get_content()
    # The DSN went through its own pipeline: (sender's domain, the same source IP), started for it.
    assert await node.pipelines[SENDER_KEY].counts() == Counts(delivered=1)
    assert await p.counts() == Counts(delivered=1, bounced=1)


async def test_giving_up_after_retries_sends_a_dsn_too(node: Node, sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later"}
    p, _ = await node.start_pipeline("example.com", SOURCE_IP, fast_policy(max_retries=1))
    await node.enqueue(p, [email("later@example.com")])

    async def dsn_arrived() -> list[Received]:
        return received_by(sink, "ann@sender.test")

    [received] = await eventually(dsn_arrived)
    _, later = delivery_status(received.message())
    assert (later["Action"], later["Status"]) == ("failed", "4.3.0")
    assert later["Diagnostic-Code"] == "smtp; 451 4.3.0 try later"


async def test_mail_from_the_null_path_gets_no_dsn(node: Node, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await node.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await node.enqueue_rendered(p, [NewMessage("", ["gone@example.com"], ORIGINAL)])

    async def bounced() -> bool:
        return (await p.counts()) == Counts(bounced=1)

    await eventually(bounced)
    assert list(node.pipelines) == [p.routing_key]  # no pipeline started for a DSN
    assert await node.spool.all_counts() == {p.routing_key: Counts(bounced=1)}


async def test_without_a_dsn_sender_a_bounce_is_only_recorded(node: Node, sink: Sink) -> None:
    node.bouncer = None
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await node.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await node.enqueue(p, [email("gone@example.com")])

    async def bounced() -> bool:
        return (await p.counts()) == Counts(bounced=1)

    await eventually(bounced)
    assert list(node.pipelines) == [p.routing_key]
    assert sink.received == []


def test_the_status_of_a_result_without_an_enhanced_code_comes_from_its_class() -> None:
    assert Result.of_reply(554, "rejected").status_code == "5.0.0"
    assert Result(Status.TEMPORARY, 421, "busy").status_code == "4.0.0"
