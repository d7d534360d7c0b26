"""Bounces produce RFC 3464 delivery status notifications, delivered back to the sender."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import SMTPUTF8 as smtputf8_policy
from email.policy import default as default_policy
from email.utils import formatdate
from typing import Any

import pytest

from devmesh.sink import Received, Sink
from epoxi import rendering
from services.node.engine.dsn import build, original_headers
from services.node.engine.reply import Reply
from services.node.engine.spool import Counts, NewMessage, Outcome, State
from services.node.supervisor import PipelineSupervisor
from tests.services.node.support import SENDER_KEY, SOURCE_IP, MakeSupervisor, email, fast_policy
from tests.support import eventually

ORIGINAL = rendering.render(email("gone@example.com", "ok@example.com", subject="Quarterly report"))


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
    bounced = {
        "gone@example.com": Outcome(
            1, State.BOUNCED, 1, 1.7e9, Reply.parse(550, "5.1.1 no such user", "mx.example.com"), 1.7e9
        ),
        "later@example.com": Outcome(
            2, State.BOUNCED, 3, 1.7e9 + 60, Reply.local("connection lost", "4.4.2"), 1.7e9 + 60
        ),
    }
    data = build(
        reporting_mta="n1.epoxi.test",
        dsn_from="MAILER-DAEMON@n1.epoxi.test",
        sender="ann@sender.test",
        original=ORIGINAL,
        arrival=1.7e9 - 3600,
        bounced=bounced,
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
    assert later["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:14:20 GMT"
    human, _, headers = dsn.get_payload()
    assert "<gone@example.com> (host mx.example.com said): 550 5.1.1 no such user" in human.get_content()
    original = parse(headers.get_content().encode())
    assert original["Subject"] == "Quarterly report"
    assert b"hello" not in data  # the header only, not the body


def status_blocks(part: Any) -> list[str]:
    """The blocks of a message/global-delivery-status part, as UTF-8 text."""
    raw = part.as_bytes(policy=smtputf8_policy)
    body = raw[raw.index(b"\r\n\r\n") + 4 :].decode("utf-8")
    return [b for b in body.split("\r\n\r\n") if b.strip()]


def test_a_dsn_for_a_utf8_address_is_global() -> None:
    utf8 = "björn@example.com"
    bounced = {
        utf8: Outcome(1, State.BOUNCED, 1, 1.7e9, Reply.local("no SMTPUTF8 at mx", "5.6.7"), 1.7e9),
        "bob@example.com": Outcome(
            2, State.BOUNCED, 1, 1.7e9, Reply.parse(550, "5.1.1 no such user", "mx.example.com"), 1.7e9
        ),
    }
    sender = "jörg@xn--mnchen-3ya.de"
    data = build(
        reporting_mta="n1.epoxi.test",
        dsn_from="MAILER-DAEMON@n1.epoxi.test",
        sender=sender,
        original=f"From: {sender}\r\nTo: {utf8}\r\nSubject: Grüße\r\n\r\nhallo\r\n".encode(),
        arrival=1.7e9 - 3600,
        bounced=bounced,
    )
    assert f"\r\nTo: {sender}\r\n".encode() in data  # RFC 6532: UTF-8 as it is
    dsn = parse(data)
    assert (dsn.get_content_type(), dsn.get_param("report-type")) == (
        "multipart/report",
        "global-delivery-status",
    )
    human, status, headers = dsn.get_payload()
    assert (status.get_content_type(), status["Content-Transfer-Encoding"]) == (
        "message/global-delivery-status",
        "8bit",
    )
    per_message, first, second = status_blocks(status)
    assert per_message.startswith("Reporting-MTA: dns; n1.epoxi.test\r\n")
    assert f"Final-Recipient: utf-8; {utf8}\r\n" in first and "Status: 5.6.7\r\n" in first
    assert "Diagnostic-Code: X-Epoxi; 5.6.7 no SMTPUTF8 at mx" in first
    assert "Final-Recipient: rfc822; bob@example.com\r\n" in second  # ASCII stays rfc822
    assert f"<{utf8}>: 5.6.7 no SMTPUTF8 at mx" in human.get_content()
    assert "Subject: Grüße" in headers.get_content()


def test_original_headers_stop_at_the_body() -> None:
    assert original_headers(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == "A: 1\nB: 2\n"
    assert original_headers(b"A: 1\n\nbody") == "A: 1\n"


@pytest.fixture
def supervisor(make_supervisor: MakeSupervisor) -> PipelineSupervisor:
    return make_supervisor()


def received_by(sink: Sink, rcpt: str) -> list[Received]:
    return [r for r in sink.received if rcpt in r.rcpt_tos]


async def test_a_bounce_sends_a_dsn_to_the_sender(supervisor: PipelineSupervisor, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    [mid] = await supervisor.enqueue(
        p, [email("gone@example.com", "ok@example.com", subject="Quarterly report")]
    )

    async def dsn_arrived() -> list[Received]:
        return received_by(sink, "ann@sender.test")

    [received] = await eventually(dsn_arrived)
    assert received.mail_from == "<>"  # the null path: a DSN never bounces back
    assert [r.rcpt_tos for r in received_by(sink, "ok@example.com")] == [["ok@example.com"]]
    dsn = received.message()
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, gone = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; n1.epoxi.test"
    stored = await supervisor.spool.message(mid)
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
    assert await supervisor.pipelines[SENDER_KEY].counts() == Counts(delivered=1)
    assert await p.counts() == Counts(delivered=1, bounced=1)


async def test_giving_up_after_retries_sends_a_dsn_too(supervisor: PipelineSupervisor, sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later"}
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(max_retries=1))
    await supervisor.enqueue(p, [email("later@example.com")])

    async def dsn_arrived() -> list[Received]:
        return received_by(sink, "ann@sender.test")

    [received] = await eventually(dsn_arrived)
    _, later = delivery_status(received.message())
    assert (later["Action"], later["Status"]) == ("failed", "4.3.0")
    assert later["Diagnostic-Code"] == "smtp; 451 4.3.0 try later"


async def test_mail_from_the_null_path_gets_no_dsn(supervisor: PipelineSupervisor, sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await supervisor.enqueue_rendered(p, [NewMessage("", ["gone@example.com"], ORIGINAL)])

    async def bounced() -> bool:
        return (await p.counts()) == Counts(bounced=1)

    await eventually(bounced)
    assert list(supervisor.pipelines) == [p.routing_key]  # no pipeline started for a DSN
    assert await supervisor.spool.all_counts() == {p.routing_key: Counts(bounced=1)}


async def test_without_a_dsn_sender_a_bounce_is_only_recorded(
    make_supervisor: MakeSupervisor, sink: Sink
) -> None:
    supervisor = make_supervisor(dsn=False)
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await supervisor.enqueue(p, [email("gone@example.com")])

    async def bounced() -> bool:
        return (await p.counts()) == Counts(bounced=1)

    await eventually(bounced)
    assert list(supervisor.pipelines) == [p.routing_key]
    assert sink.received == []
