"""The ingress with Python's smtplib, in front of a real mesh (dev registry, router, node, sink):
each reply code, AUTH only over TLS, the user's source IP, and mail arriving byte for byte."""

from __future__ import annotations

import asyncio
import base64
import email.policy
import smtplib
from email.message import EmailMessage

import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.registry.client import Consul
from services.ingress.main import ConfigError, RunningIngress
from services.ingress.main import main as ingress_main
from services.router.main import RunningRouter
from tests.epoxi.runtime.certs import Pki
from tests.services.ingress.conftest import DEFAULT_IP, StartIngress, passing_routers
from tests.services.ingress.support import (
    ALICE_IP,
    MESSAGE,
    PASSWORDS,
    client_tls,
    connect,
    host_port,
    in_thread,
)
from tests.support import Nodes, eventually, unused_address

Replies = dict[str, tuple[int, bytes]]


async def send(address: str, pki: Pki, data: bytes, rcpt: list[str], user: str | None = "alice") -> Replies:
    def run() -> Replies:
        with connect(address, pki.ca, user) as smtp:
            return smtp.sendmail("alice@shop.test", rcpt, data)

    return await in_thread(run)


async def test_a_message_is_answered_250_with_its_queue_id_once_spooled(
    ingress: RunningIngress, pki: Pki, sink: Sink
) -> None:
    def run() -> tuple[int, bytes]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    code, text = await in_thread(run)
    assert code == 250, text
    assert text.startswith(b"2.0.0 Ok: queued as ")
    [m] = await sink.wait_for(1)
    assert (m.data, m.mail_from, m.rcpt_tos, m.peer) == (MESSAGE, "alice@shop.test", ["ann@a.test"], ALICE_IP)


async def test_an_attachment_and_non_ascii_headers_arrive_byte_for_byte(
    ingress: RunningIngress, pki: Pki, sink: Sink
) -> None:
    message = EmailMessage()
    message["From"] = "Jörg <jörg@shop.test>"  # SMTPUTF8: a UTF-8 local part and header
    message["To"] = "ann@a.test"
    message["Subject"] = "Grüße, =?utf-8?q?schon_kodiert?="
    message["Message-ID"] = "<attach-1@shop.test>"
    message.set_content("Hallo, anbei die Rechnung.\n")
    message.add_attachment(
        bytes(range(256)) * 40, maintype="application", subtype="pdf", filename="Rechnung März.pdf"
    )
    data = message.as_bytes(policy=email.policy.SMTPUTF8)
    assert not data.isascii()

    def run() -> dict[str, tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            return smtp.sendmail(
                "jörg@shop.test", ["ann@a.test", "bob@b.test"], data, mail_options=["SMTPUTF8"]
            )

    assert await in_thread(run) == {}
    got = await sink.wait_for(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["ann@a.test", "bob@b.test"]
    assert all(m.data == data and m.mail_from == "jörg@shop.test" for m in got)
    # An RFC 2047 subject, ASCII, from another client library: untouched too.
    encoded = MESSAGE.replace(b"Subject: order 1", b"Subject: =?utf-8?b?R3LDvMOfZQ==?=")
    assert await send(ingress.smtp_address, pki, encoded, ["cat@a.test"]) == {}
    got = await sink.wait_for(3)
    assert got[-1].data == encoded


async def test_an_oversized_message_is_552_at_mail_and_at_data(
    start: StartIngress, mesh_node: Nodes, pki: Pki
) -> None:
    ingress = await start(max_email_bytes=64 * 1024)

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            at_mail = smtp.mail("alice@shop.test", ["SIZE=1000000"])
            smtp.rset()
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            at_data = smtp.data(MESSAGE + b"x" * 900 + b"\r\n" + (b"y" * 990 + b"\r\n") * 100)
            smtp.rset()
            return at_mail, at_data, smtp.noop()

    at_mail, at_data, noop = await in_thread(run)
    assert at_mail[0] == 552 and at_mail[1].startswith(b"5.3.4 "), at_mail
    assert at_data[0] == 552 and at_data[1].startswith(b"5.3.4 "), at_data
    assert noop[0] == 250  # the session goes on


async def test_auth_is_offered_and_taken_only_over_tls(ingress: RunningIngress, pki: Pki, sink: Sink) -> None:
    def run() -> list[object]:
        host, port = host_port(ingress.smtp_address)
        with smtplib.SMTP(host, port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            seen: list[object] = [
                smtp.has_extn("auth"),
                smtp.has_extn("starttls"),
                smtp.has_extn("pipelining"),
            ]
            seen.append(smtp.docmd("AUTH", "PLAIN " + _plain("alice")))
            seen.append(smtp.mail("alice@shop.test"))
            smtp.starttls(context=client_tls(pki.ca))
            smtp.ehlo()
            seen.append(sorted(smtp.esmtp_features.get("auth", "").split()))
            try:
                smtp.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as e:
                seen.append((e.smtp_code, e.smtp_error))
            smtp.login("alice", PASSWORDS["alice"])
            seen.append(smtp.sendmail("alice@shop.test", ["ann@a.test"], MESSAGE))
            return seen

    offered, starttls, pipelining, auth_plain, mail, mechanisms, wrong, sent = await in_thread(run)
    assert (offered, starttls, pipelining) == (False, True, True)
    assert auth_plain == (538, b"5.7.11 Encryption required for requested authentication mechanism")
    assert mail == (530, b"5.7.0 Authentication required")
    assert mechanisms == ["LOGIN", "PLAIN"]
    assert wrong == (535, b"5.7.8 Authentication credentials invalid")
    assert sent == {}
    [m] = await sink.wait_for(1)
    assert m.peer == ALICE_IP


def _plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0{PASSWORDS[user]}".encode()).decode()


async def test_implicit_tls_offers_auth_at_once_and_login_works(
    ingress: RunningIngress, pki: Pki, sink: Sink
) -> None:
    def run() -> dict[str, tuple[int, bytes]]:
        host, port = host_port(ingress.smtps_address)
        with smtplib.SMTP_SSL(host, port, local_hostname="client.test", context=client_tls(pki.ca)) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.login("bob", PASSWORDS["bob"])  # smtplib tries CRAM-MD5, PLAIN, then LOGIN
            return smtp.sendmail("bob@shop.test", ["ann@a.test"], MESSAGE)

    assert await in_thread(run) == {}
    [m] = await sink.wait_for(1)
    assert m.peer == DEFAULT_IP  # bob sends from the default pool: the node's one IP there


async def test_many_messages_on_one_connection(ingress: RunningIngress, pki: Pki, sink: Sink) -> None:
    def run() -> list[dict[str, tuple[int, bytes]]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            return [
                smtp.sendmail(
                    "alice@shop.test", [f"r{i}@a.test"], MESSAGE.replace(b"order-1", f"order-{i}".encode())
                )
                for i in range(10)
            ]

    assert await in_thread(run) == [{}] * 10
    got = await sink.wait_for(10)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(f"r{i}@a.test" for i in range(10))


async def test_452_past_the_recipient_limit(ingress: RunningIngress, pki: Pki, sink: Sink) -> None:
    def run() -> list[tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            replies = [smtp.rcpt(f"r{i}@a.test") for i in range(4)]
            replies.append(smtp.data(MESSAGE))
            return replies

    replies = await in_thread(run)
    assert [c for c, _ in replies[:3]] == [250, 250, 250]
    assert replies[3][0] == 452 and replies[3][1].startswith(b"4.5.3 Too many recipients"), replies[3]
    assert replies[4][0] == 250  # the first three go
    got = await sink.wait_for(3)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["r0@a.test", "r1@a.test", "r2@a.test"]


async def test_bad_addresses_are_550_or_553(ingress: RunningIngress, pki: Pki) -> None:
    def run() -> list[tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            replies = [smtp.mail("not..valid@shop.test")]
            smtp.rset()
            smtp.mail("alice@shop.test")
            replies.append(smtp.rcpt("ann@-bad-.test"))
            replies.append(smtp.rcpt("no-domain"))
            replies.append(smtp.docmd("RCPT TO:<a b@c>"))
            return replies

    bad_sender, bad_domain, no_domain, malformed = await in_thread(run)
    assert bad_sender[0] == 553 and bad_sender[1].startswith(b"5.1.7 Sender 'not..valid@shop.test'"), (
        bad_sender
    )
    assert bad_domain[0] == 550 and bad_domain[1].startswith(b"5.1.2 "), bad_domain
    assert no_domain[0] == 553 and no_domain[1].startswith(b"5.1.3 "), no_domain
    assert malformed[0] == 553 and malformed[1].startswith(b"5.1.3 "), malformed


async def test_the_null_sender_is_taken(ingress: RunningIngress, pki: Pki, sink: Sink) -> None:
    def run() -> dict[str, tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            return smtp.sendmail("<>", ["ann@a.test"], MESSAGE)

    assert await in_thread(run) == {}
    [m] = await sink.wait_for(1)
    assert m.mail_from == "<>"


async def test_451_when_no_node_can_take_it(
    start: StartIngress, router: RunningRouter, pki: Pki, consul: Consul
) -> None:
    # A router, and no node at all.

    await eventually(lambda: passing_routers(consul))
    ingress = await start()

    def run() -> tuple[int, bytes]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    code, text = await in_thread(run)
    assert code == 451 and text.startswith(b"4.3.0 Try again later"), text
    assert b"no passing node owns source IP 127.0.0.3" in text


async def test_451_when_the_registry_is_down(
    start: StartIngress, pki: Pki, registry: RunningRegistry
) -> None:
    ingress = await start()
    await registry.close()  # cleaning up twice is harmless: the fixture closes it again

    def run() -> tuple[int, bytes]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    code, text = await in_thread(run)
    assert code == 451 and b"the registry cannot be reached" in text, text


async def test_451_when_the_router_is_unreachable(start: StartIngress, pki: Pki) -> None:

    ingress = await start(router=unused_address())

    def run() -> tuple[int, bytes]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    code, text = await in_thread(run)
    assert code == 451 and b"UNAVAILABLE" in text, text


async def test_the_operator_enabled_header_chooses_the_source_ip(
    start: StartIngress, mesh_node: Nodes, pki: Pki, sink: Sink, consul: Consul
) -> None:

    await eventually(lambda: passing_routers(consul))
    ingress = await start(source_ip_header="X-Epoxi-Source-IP")
    chosen = b"X-Epoxi-Source-IP: " + DEFAULT_IP.encode() + b"\r\n" + MESSAGE
    bad = b"X-Epoxi-Source-IP: nowhere\r\n" + MESSAGE

    def run() -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes]]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            sent = smtp.sendmail("alice@shop.test", ["ann@a.test"], chosen)
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return sent, smtp.data(bad)

    sent, refused = await in_thread(run)
    assert sent == {}
    assert refused[0] == 554 and b"X-Epoxi-Source-IP field 'nowhere' is not an IP address" in refused[1]
    [m] = await sink.wait_for(1)
    assert (m.peer, m.data) == (DEFAULT_IP, chosen)  # alice's own IP would be 127.0.0.3


async def test_anonymous_submission_only_when_configured(
    start: StartIngress, mesh_node: Nodes, pki: Pki, sink: Sink, consul: Consul
) -> None:

    await eventually(lambda: passing_routers(consul))
    ingress = await start(users_file=None, allow_anonymous=True, smtps_listen=None)

    def run() -> tuple[bool, dict[str, tuple[int, bytes]]]:
        host, port = host_port(ingress.smtp_address)
        with smtplib.SMTP(host, port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            return smtp.has_extn("auth"), smtp.sendmail("app@shop.test", ["ann@a.test"], MESSAGE)

    assert await in_thread(run) == (False, {})
    [m] = await sink.wait_for(1)
    assert m.peer == DEFAULT_IP


async def test_settings_that_cannot_work_are_refused(start: StartIngress) -> None:

    with pytest.raises(ConfigError, match="nobody could submit mail"):
        await start(users_file=None)
    with pytest.raises(ConfigError, match="AUTH is offered only over TLS"):
        await start(smtp_tls_cert=None, smtp_tls_key=None, smtps_listen=None)


async def test_a_message_without_a_header_section_is_554(ingress: RunningIngress, pki: Pki) -> None:
    def run() -> tuple[int, bytes]:
        with connect(ingress.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(b"just a body\r\n")

    code, text = await in_thread(run)
    assert code == 554 and b"does not start with a header field" in text, text


async def test_auth_login_works_and_tls_can_be_required(
    start: StartIngress, mesh_node: Nodes, pki: Pki, sink: Sink, consul: Consul
) -> None:
    await eventually(lambda: passing_routers(consul))
    ingress = await start(require_tls=True)

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes], dict[str, tuple[int, bytes]]]:
        host, port = host_port(ingress.smtp_address)
        with smtplib.SMTP(host, port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            before = smtp.mail("alice@shop.test")
            smtp.starttls(context=client_tls(pki.ca))
            smtp.ehlo()
            smtp.user, smtp.password = "alice", PASSWORDS["alice"]
            login = smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
            return before, login, smtp.sendmail("alice@shop.test", ["ann@a.test"], MESSAGE)

    before, login, sent = await in_thread(run)
    assert before == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert login[0] == 235
    assert sent == {}
    [m] = await sink.wait_for(1)
    assert m.peer == ALICE_IP


def test_the_program_refuses_settings_that_cannot_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert ingress_main(["--smtp-listen", "127.0.0.1:0"]) == 2
    assert "nobody could submit mail" in capsys.readouterr().err


async def test_451_when_the_router_does_not_answer_in_time(start: StartIngress, pki: Pki) -> None:
    # A "router" that takes the connection and never says a word: the call can only time out.
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        ingress = await start(router=f"127.0.0.1:{port}", router_timeout=0.5)

        def run() -> tuple[int, bytes]:
            with connect(ingress.smtp_address, pki.ca) as smtp:
                smtp.mail("alice@shop.test")
                smtp.rcpt("ann@a.test")
                return smtp.data(MESSAGE)

        code, text = await in_thread(run)
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()
    assert code == 451 and b"DEADLINE_EXCEEDED" in text, text
