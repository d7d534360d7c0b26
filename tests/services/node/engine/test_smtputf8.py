"""SMTPUTF8 and 8BITMIME against real aiosmtpd servers: mail goes with the extensions it needs when
the server offers them, and bounces at once with the node's own 5.6.x reply when it does not."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest

from services.node.engine.mx import Destinations, Host
from services.node.engine.reply import Reply
from services.node.engine.smtp import SmtpSender
from services.node.engine.spool import NewMessage, State
from tests.services.node.esmtp_sink import EsmtpSink, Transaction
from tests.services.node.support import MakeSupervisor, fast_policy
from tests.support import SOURCE_IP, eventually

UTF8_SENDER = "jörg@xn--mnchen-3ya.de"
UTF8_RCPT = "björn@example.com"


def message(header: str, body: bytes = b"hello\r\n") -> bytes:
    return header.replace("\n", "\r\n").encode("utf-8") + b"\r\n" + body


ASCII_HEADER = "From: ann@sender.test\nTo: bob@example.com\nSubject: hi\n"
UTF8_HEADER = f"From: {UTF8_SENDER}\nTo: {UTF8_RCPT}, bob@example.com\nSubject: Grüße\n"


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., EsmtpSink]]:
    """``make(smtputf8=..., eight_bit_mime=..., replies=...)``: an ``EsmtpSink``, stopped at the end
    (``send`` starts it)."""
    async with AsyncExitStack() as stack:

        def make(**fields: Any) -> EsmtpSink:
            s = EsmtpSink(**fields)
            stack.push_async_callback(s.stop)
            return s

        yield make


async def send(server: EsmtpSink, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
    if server.port == 0:
        await server.start()
    smtp = SmtpSender(Destinations({"*": Host(server.host, server.port)}), "node.epoxi.test", timeout=5)
    conn = smtp.connection("example.com", SOURCE_IP)
    try:
        return await conn.send(sender, recipients, data)
    finally:
        await conn.close()


async def test_a_utf8_envelope_and_header_go_with_smtputf8_when_offered(
    servers: Callable[..., EsmtpSink],
) -> None:
    server = servers(smtputf8=True)
    data = message(UTF8_HEADER)
    results = await send(server, UTF8_SENDER, [UTF8_RCPT, "bob@example.com"], data)
    assert all(r.accepted for r in results.values()), results
    [t] = server.received
    assert (t.mail_from, t.rcpt_tos) == (UTF8_SENDER, [UTF8_RCPT, "bob@example.com"])
    assert t.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]  # a UTF-8 header is 8-bit content
    assert t.data == data


async def test_ascii_mail_goes_without_extension_parameters(servers: Callable[..., EsmtpSink]) -> None:
    server = servers(smtputf8=True)
    results = await send(server, "ann@sender.test", ["bob@example.com"], message(ASCII_HEADER))
    assert results["bob@example.com"].accepted
    assert [t.mail_options for t in server.received] == [[]]


async def test_a_utf8_sender_bounces_every_recipient_without_smtputf8(
    servers: Callable[..., EsmtpSink],
) -> None:
    server = servers(smtputf8=False)
    results = await send(server, UTF8_SENDER, ["bob@example.com", UTF8_RCPT], message(ASCII_HEADER))
    why = f"127.0.0.1 does not offer SMTPUTF8, which the sender {UTF8_SENDER} needs"
    assert results == dict.fromkeys(["bob@example.com", UTF8_RCPT], Reply.local(why, "5.6.7"))
    assert all(r.permanent and r.status_code == "5.6.7" for r in results.values())
    assert server.received == []


async def test_a_utf8_header_bounces_with_5_6_9_without_smtputf8(servers: Callable[..., EsmtpSink]) -> None:
    server = servers(smtputf8=False)
    header = "From: ann@sender.test\nTo: bob@example.com\nSubject: Grüße\n"
    results = await send(server, "ann@sender.test", ["bob@example.com"], message(header))
    why = "127.0.0.1 does not offer SMTPUTF8, which the message's UTF-8 header needs"
    assert results == {"bob@example.com": Reply.local(why, "5.6.9")}
    assert results["bob@example.com"].permanent
    assert server.received == []


async def test_only_a_utf8_recipient_bounces_when_the_rest_is_ascii(
    servers: Callable[..., EsmtpSink],
) -> None:
    server = servers(smtputf8=False)
    # A Bcc: the recipient's address is in the envelope only.
    results = await send(server, "ann@sender.test", [UTF8_RCPT, "bob@example.com"], message(ASCII_HEADER))
    why = f"127.0.0.1 does not offer SMTPUTF8, which the recipient {UTF8_RCPT} needs"
    assert results[UTF8_RCPT] == Reply.local(why, "5.6.7")
    assert results["bob@example.com"].accepted
    [t] = server.received
    assert (t.rcpt_tos, t.mail_options) == (["bob@example.com"], [])


async def test_an_8bit_body_goes_with_body_8bitmime(servers: Callable[..., EsmtpSink]) -> None:
    server = servers(smtputf8=False)
    data = message(ASCII_HEADER, "Grüße\r\n".encode())
    results = await send(server, "ann@sender.test", ["bob@example.com"], data)
    assert results["bob@example.com"].accepted
    [t] = server.received
    assert (t.mail_options, t.data) == (["BODY=8BITMIME"], data)


async def test_an_8bit_body_bounces_with_5_6_3_without_8bitmime(servers: Callable[..., EsmtpSink]) -> None:
    server = servers(smtputf8=False, eight_bit_mime=False)
    data = message(ASCII_HEADER, "Grüße\r\n".encode())
    results = await send(server, "ann@sender.test", ["bob@example.com"], data)
    why = "127.0.0.1 does not offer 8BITMIME, which the message's 8-bit body needs"
    assert results == {"bob@example.com": Reply.local(why, "5.6.3")}
    assert server.received == []


async def test_an_address_that_cannot_go_on_a_command_line_bounces(servers: Callable[..., EsmtpSink]) -> None:
    server = servers()
    data = message(ASCII_HEADER)
    results = await send(server, "ann@sender.test", ["a b@example.com", "bob@example.com"], data)
    assert (results["a b@example.com"].status_code, results["a b@example.com"].permanent) == ("5.1.3", True)
    assert "not permitted in an SMTP mailbox" in results["a b@example.com"].text
    assert results["bob@example.com"].accepted
    refused_sender = await send(server, "a b@sender.test", ["bob@example.com"], data)
    assert refused_sender["bob@example.com"].status_code == "5.1.7"
    assert refused_sender["bob@example.com"].permanent
    assert server.recipients() == ["bob@example.com"]


async def test_a_pipeline_bounces_utf8_mail_at_once_and_tells_the_sender_why(
    make_supervisor: MakeSupervisor, servers: Callable[..., EsmtpSink]
) -> None:
    server = await servers(smtputf8=False).start()
    smtp = SmtpSender(Destinations({"*": Host(server.host, server.port)}), "node.epoxi.test", timeout=5)
    supervisor = make_supervisor(sender=smtp)
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(max_retries=3))
    original = NewMessage("ann@sender.test", [UTF8_RCPT, "bob@example.com"], message(ASCII_HEADER))
    [mid] = await supervisor.enqueue_rendered(p, [original])

    async def dsn() -> Transaction | None:
        return next((t for t in server.received if t.rcpt_tos == ["ann@sender.test"]), None)

    report = await eventually(dsn)
    found = await supervisor.spool.message(mid)
    assert found is not None
    row, attempts = found
    why = f"127.0.0.1 does not offer SMTPUTF8, which the recipient {UTF8_RCPT} needs"
    assert {(d.recipient, d.state, d.attempts, d.reply) for d in row.deliveries} == {
        (UTF8_RCPT, State.BOUNCED, 1, Reply.local(why, "5.6.7")),  # no retry
        ("bob@example.com", State.DELIVERED, 1, Reply(250, "2.0.0", "OK")),  # the spool keeps no host
    }
    assert [(a.recipient, a.result) for a in attempts if a.recipient == UTF8_RCPT] == [
        (UTF8_RCPT, State.BOUNCED)
    ]
    # The report is 8-bit (RFC 6533's UTF-8 delivery status) under an ASCII header.
    assert (report.mail_from, report.mail_options) == ("<>", ["BODY=8BITMIME"])
    dsn_message = BytesParser(policy=default_policy).parsebytes(report.data)
    assert dsn_message.get_param("report-type") == "global-delivery-status"
    status = " ".join(report.data.decode("utf-8").split())  # unfolded
    assert f"Final-Recipient: utf-8; {UTF8_RCPT} Action: failed Status: 5.6.7" in status
    assert f"Diagnostic-Code: X-Epoxi; 5.6.7 {why} " in status


async def test_a_reply_that_is_not_utf8_is_recorded_and_reported(
    make_supervisor: MakeSupervisor, servers: Callable[..., EsmtpSink]
) -> None:
    server = servers(replies={"gone@example.com": b"550 5.1.1 Empf\xe4nger unbekannt"})  # Latin-1
    await server.start()
    smtp = SmtpSender(Destinations({"*": Host(server.host, server.port)}), "node.epoxi.test", timeout=5)
    supervisor = make_supervisor(sender=smtp)
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    [mid] = await supervisor.enqueue_rendered(
        p, [NewMessage("ann@sender.test", ["gone@example.com"], message(ASCII_HEADER))]
    )

    async def dsn() -> Transaction | None:
        return next((t for t in server.received if t.rcpt_tos == ["ann@sender.test"]), None)

    report = await eventually(dsn)
    found = await supervisor.spool.message(mid)
    assert found is not None
    [delivery] = found[0].deliveries
    assert (delivery.state, delivery.reply) == (
        State.BOUNCED,
        Reply(550, "5.1.1", "Empf\ufffdnger unbekannt"),
    )
    assert "Diagnostic-Code: smtp; 550 5.1.1 Empf\ufffdnger unbekannt" in report.data.decode("utf-8")
