"""The SMTP sender against a real sink: source binding, reuse, per-recipient replies, failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from devmesh.sink import Sink
from services.node.engine.host_backoff import HostBackoff
from services.node.engine.mx import Destinations, Host
from services.node.engine.reply import Reply
from services.node.engine.smtp import SmtpSender, _parsed
from services.node.engine.smtp_client import Response
from tests.services.node.support import SOURCE_IP, smtp_to

DATA = b"From: ann@sender.test\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


async def test_mail_leaves_from_the_routing_keys_source_ip(sink: Sink) -> None:
    conn = smtp_to(sink).connection("example.com", SOURCE_IP)
    try:
        results = await conn.send("ann@sender.test", ["bob@example.com"], DATA)
        assert conn.local_address is not None and conn.local_address[0] == SOURCE_IP
    finally:
        await conn.close()
    assert results["bob@example.com"].accepted
    assert results["bob@example.com"].code == 250
    [received] = sink.received
    assert received.peer == SOURCE_IP
    assert (received.mail_from, received.rcpt_tos) == ("ann@sender.test", ["bob@example.com"])
    assert received.message()["Subject"] == "hi"


async def test_one_connection_carries_several_messages(sink: Sink) -> None:
    conn = smtp_to(sink).connection("example.com", SOURCE_IP)
    try:
        await conn.send("ann@sender.test", ["a@example.com"], DATA)
        first = conn.local_address
        await conn.send("ann@sender.test", ["b@example.com"], DATA)
        assert conn.local_address == first is not None
    finally:
        await conn.close()
    assert sink.recipients() == ["a@example.com", "b@example.com"]


async def test_each_recipient_gets_its_own_result(sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later", "gone@example.com": "550 5.1.1 no such user"}
    conn = smtp_to(sink).connection("example.com", SOURCE_IP)
    try:
        results = await conn.send(
            "ann@sender.test", ["ok@example.com", "later@example.com", "gone@example.com"], DATA
        )
    finally:
        await conn.close()
    assert results["ok@example.com"].accepted
    host = sink.host
    assert results["later@example.com"] == Reply(451, "4.3.0", "try later", host)
    assert results["gone@example.com"] == Reply(550, "5.1.1", "no such user", host)
    assert results["later@example.com"].temporary and results["gone@example.com"].permanent
    assert sink.recipients() == ["ok@example.com"]


async def test_a_refusing_server_leaves_the_connection_usable(sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    conn = smtp_to(sink).connection("example.com", SOURCE_IP)
    try:
        refused = await conn.send("ann@sender.test", ["gone@example.com"], DATA)
        accepted = await conn.send("ann@sender.test", ["ok@example.com"], DATA)
    finally:
        await conn.close()
    assert refused["gone@example.com"].permanent
    assert accepted["ok@example.com"].accepted
    assert sink.recipients() == ["ok@example.com"]


async def test_a_connection_failure_is_temporary() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens once it is closed
    sender = SmtpSender(Destinations({"*": Host("127.0.0.1", closed_port)}), "node.epoxi.test", timeout=5)
    conn = sender.connection("example.com", SOURCE_IP)
    results = await conn.send("ann@sender.test", ["a@example.com", "b@example.com"], DATA)
    await conn.close()
    assert all(r.temporary for r in results.values())
    assert (results["a@example.com"].code, results["a@example.com"].enhanced) == (0, "4.4.1")
    assert "cannot connect" in results["a@example.com"].text


async def test_the_ehlo_name_is_the_source_ips(sink: Sink) -> None:
    sender = smtp_to(sink, ehlo_names={SOURCE_IP: "mta2.epoxi.test"})
    for ip in (SOURCE_IP, "127.0.0.3"):
        conn = sender.connection("example.com", ip)
        await conn.send("ann@sender.test", ["a@example.com"], DATA)
        await conn.close()
    assert [(r.peer, r.helo) for r in sink.received] == [
        (SOURCE_IP, "mta2.epoxi.test"),
        ("127.0.0.3", "node.epoxi.test"),
    ]


async def test_a_connection_quits_after_its_message_limit(sink: Sink) -> None:
    conn = smtp_to(sink, max_messages_per_connection=2).connection("example.com", SOURCE_IP)
    try:
        for i in range(5):
            await conn.send("ann@sender.test", [f"r{i}@example.com"], DATA)
    finally:
        await conn.close()
    assert len(sink.recipients()) == 5
    assert sink.sessions == 3  # 2 + 2 + 1


class _Silent:
    """A server that accepts connections and never says a word, counting them."""

    def __init__(self) -> None:
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        await reader.read()  # until the client gives up


@pytest.fixture
async def silent() -> AsyncIterator[tuple[_Silent, int]]:
    s = _Silent()
    server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    yield s, server.sockets[0].getsockname()[1]
    for w in s.writers:
        w.close()
    server.close()
    await server.wait_closed()


async def test_a_server_that_times_out_is_temporary_and_left_alone(silent: tuple[_Silent, int]) -> None:
    server, port = silent
    sender = SmtpSender(
        Destinations({"*": Host("127.0.0.1", port)}),
        "node.epoxi.test",
        timeout=0.2,
        backoff=HostBackoff(3600),
    )
    conn = sender.connection("example.com", SOURCE_IP)
    first = (await conn.send("ann@sender.test", ["a@example.com"], DATA))["a@example.com"]
    second = (await conn.send("ann@sender.test", ["a@example.com"], DATA))["a@example.com"]
    await conn.close()
    assert (first.temporary, first.code, first.enhanced) == (True, 0, "4.4.1")
    assert "Timed out" in first.text
    assert (second.temporary, second.code, second.enhanced) == (True, 0, "4.4.1")
    assert "failed recently" in second.text
    assert server.accepted == 1


async def test_a_host_is_dialled_again_once_its_backoff_ends(silent: tuple[_Silent, int]) -> None:
    server, port = silent
    now = [0.0]
    backoff = HostBackoff(base=10, cap=40, clock=lambda: now[0])
    sender = SmtpSender(Destinations({"*": Host("127.0.0.1", port)}), "node.epoxi.test", 0.2, backoff=backoff)
    conn = sender.connection("example.com", SOURCE_IP)
    await conn.send("ann@sender.test", ["a@example.com"], DATA)
    now[0] = 9.0
    await conn.send("ann@sender.test", ["a@example.com"], DATA)
    assert server.accepted == 1
    now[0] = 10.0
    await conn.send("ann@sender.test", ["a@example.com"], DATA)
    assert server.accepted == 2
    now[0] = 29.0  # a second failure doubles the backoff: 10 + 20
    await conn.send("ann@sender.test", ["a@example.com"], DATA)
    assert server.accepted == 2
    now[0] = 30.0
    await conn.send("ann@sender.test", ["a@example.com"], DATA)
    assert server.accepted == 3
    await conn.close()


async def test_a_dropped_connection_is_temporary(sink: Sink) -> None:
    sink.drop_rule = lambda rcpt: rcpt == "drop@example.com"
    conn = smtp_to(sink).connection("example.com", SOURCE_IP)
    try:
        dropped = await conn.send("ann@sender.test", ["ok@example.com", "drop@example.com"], DATA)
        after = await conn.send("ann@sender.test", ["ok@example.com"], DATA)
    finally:
        await conn.close()
    assert all(r.temporary for r in dropped.values())
    assert dropped["ok@example.com"].enhanced == "4.4.2"
    assert after["ok@example.com"].accepted  # on a new connection
    assert sink.sessions == 2


def test_a_repeated_reply_is_parsed_once_and_a_long_one_every_time() -> None:
    ok = Response(250, "2.1.5 Ok")
    first = _parsed(ok, "mx1.example.com")
    assert first == Reply(250, "2.1.5", "Ok", "mx1.example.com")
    assert _parsed(ok, "mx1.example.com") is first
    assert _parsed(ok, "mx2.example.com").host == "mx2.example.com"
    long = Response(550, "5.1.1 " + "x" * 300)
    assert _parsed(long, "mx1.example.com") is not _parsed(long, "mx1.example.com")
    assert _parsed(long, "mx1.example.com") == Reply(550, "5.1.1", "x" * 300, "mx1.example.com")
