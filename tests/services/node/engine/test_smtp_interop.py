"""The SMTP sender against real receiving servers: aiosmtpd, Postfix's smtp-sink and a real Postfix,
with and without PIPELINING, some refusing recipients; every recipient's reply, and what arrived.

Each server variant is started once for the module (``real_servers``); tests tag their
addresses to find their own mail on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from benchmarks.smtpsink import SmtpSink
from devmesh.postfix import PostfixReceiver
from services.node.engine.mx import Destinations
from services.node.engine.reply import Reply
from services.node.engine.smtp import Message, SmtpConnection, SmtpSender
from tests.services.node.engine.real_servers import (
    ACCEPTED,
    DOMAIN,
    FULL,
    NOBODY,
    AiosmtpdServer,
    PostfixServer,
    RealServer,
    SmtpSinkServer,
    address,
)
from tests.support import SOURCE_IP, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENDER = "ann@sender.test"
UTF8_SENDER = "jörg@sender.test"

BY_ADDRESS = ["aiosmtpd", "aiosmtpd-no-pipelining", "postfix", "postfix-no-pipelining"]
SINKS = ["smtp-sink", "smtp-sink-no-pipelining", "smtp-sink-no-esmtp"]
# The servers that accept ann, bob and cat.
ACCEPTING = [*BY_ADDRESS, *SINKS]
REFUSING_ALL = ["smtp-sink-refusing-4xx", "smtp-sink-refusing-5xx"]
SMTPUTF8 = BY_ADDRESS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(request: pytest.FixtureRequest) -> AsyncIterator[RealServer]:
    """The server variant named by the test's parameter, started once for the module."""
    name: str = request.param
    work = Path(tempfile.mkdtemp(prefix=f"epoxi-interop-{name}-"))
    try:
        started = await _start(name, work)
        try:
            yield started
        finally:
            await started.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _start(name: str, work: Path) -> RealServer:
    if name.startswith("aiosmtpd"):
        return await AiosmtpdServer(pipelining=name == "aiosmtpd").start()
    # Postfix is installed by scripts/bootstrap: only the lack of root (which its master needs)
    # is a reason to skip.
    if name.startswith("postfix"):
        if os.geteuid() != 0:
            pytest.skip("a real Postfix needs root: its master runs as root and drops to user postfix")
        if not PostfixReceiver.available():
            pytest.fail("postfix is not installed (or has no user postfix): run scripts/bootstrap")
        return await PostfixServer(work, pipelining=name == "postfix").start()
    if not SmtpSink.available():
        pytest.fail("smtp-sink is not installed (it comes with postfix): run scripts/bootstrap")
    sinks = {
        "smtp-sink": SmtpSinkServer(name, work),
        "smtp-sink-no-pipelining": SmtpSinkServer(name, work, ["-p"], pipelining=False),
        "smtp-sink-no-esmtp": SmtpSinkServer(name, work, ["-e"], pipelining=False, esmtp=False),
        # -r and -f refuse a command every time, and stop announcing PIPELINING.
        "smtp-sink-refusing-4xx": SmtpSinkServer(
            name,
            work,
            ["-r", "RCPT", "-b", "452 4.2.2 mailbox full"],
            pipelining=False,
            refuse=(452, "4.2.2"),
        ),
        "smtp-sink-refusing-5xx": SmtpSinkServer(
            name,
            work,
            ["-f", "RCPT", "-B", "550 5.1.1 no such user"],
            pipelining=False,
            refuse=(550, "5.1.1"),
        ),
    }
    return await sinks[name].start()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest_asyncio.fixture(loop_scope="module")
async def conn(server: RealServer) -> AsyncIterator[SmtpConnection]:
    sender = SmtpSender(Destinations({"*": server.route}), "node.epoxi.test", timeout=10)
    c = sender.connection(DOMAIN, SOURCE_IP)
    yield c
    await c.close()


def message(subject: str, body: bytes = b"hello\r\n", *, sender: str = SENDER) -> bytes:
    head = (
        f"From: {sender}\r\n"
        "To: undisclosed-recipients:;\r\n"
        f"Subject: {subject}\r\n"
        "Date: Wed, 02 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@sender.test>\r\n"
        "\r\n"
    )
    return head.encode() + body


def as_sent(data: bytes) -> bytes:
    """The content a server holds for ``data``: the client ends its last line."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def codes(results: dict[str, Reply]) -> dict[str, tuple[int, str]]:
    return {r: (reply.code, reply.enhanced) for r, reply in results.items()}


async def tagged(server: RealServer, tag: str) -> dict[str, list[bytes]]:
    """What the server delivered to this test's addresses, each recipient's messages sorted (a
    server's files do not keep their order at the clock's resolution)."""
    return {r: sorted(messages) for r, messages in (await server.delivered()).items() if f"+{tag}@" in r}


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
async def test_one_recipient(server: RealServer, conn: SmtpConnection, tag: str) -> None:
    ann = address("ann", tag)
    data = message("one recipient")
    results = await conn.send(SENDER, [ann], data)
    assert codes(results) == {ann: ACCEPTED}
    assert results[ann].host == server.route.host
    assert await tagged(server, tag) == {ann: [data]}


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
async def test_each_recipient_gets_its_own_reply(server: RealServer, conn: SmtpConnection, tag: str) -> None:
    recipients = [address(u, tag) for u in ("ann", NOBODY, "bob", FULL, "cat")]
    data = message("five recipients")
    results = await conn.send(SENDER, recipients, data)
    assert codes(results) == {r: server.refusal(r) or ACCEPTED for r in recipients}
    accepted = [r for r in recipients if server.refusal(r) is None]
    if server.refuses_by_address:  # the sinks take them all
        assert accepted == [address(u, tag) for u in ("ann", "bob", "cat")]
        assert results[address(NOBODY, tag)].permanent and results[address(FULL, tag)].temporary
    assert all(results[r].host == server.route.host for r in recipients)
    assert await tagged(server, tag) == {r: [data] for r in accepted}


@pytest.mark.parametrize("server", [*BY_ADDRESS, *REFUSING_ALL], indirect=True)
async def test_every_recipient_refused_leaves_the_connection_usable(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    users = (NOBODY, FULL) if server.refuses_by_address else ("ann", "bob")
    refused = [address(u, tag) for u in users]
    results = await conn.send(SENDER, refused, message("refused"))
    assert codes(results) == {r: server.refusal(r) for r in refused}
    first = conn.local_address
    assert first is not None

    ann = address("ann", tag)
    after = message("after the refusal")
    results = await conn.send(SENDER, [ann], after)
    assert conn.local_address == first  # the same connection carried it
    if server.refuses_by_address:
        assert codes(results) == {ann: ACCEPTED}
        assert await tagged(server, tag) == {ann: [after]}
    else:  # refused again, by the server itself: it still talks to us
        assert codes(results) == {ann: server.refusal(ann)}
        assert results[ann].host == server.route.host
        assert await tagged(server, tag) == {}


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
async def test_several_messages_over_one_connection(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    sent: dict[str, list[bytes]] = {}
    addresses: set[tuple[str, int] | None] = set()
    for user in ("ann", "bob", "cat", "ann"):
        rcpt = address(user, tag)
        data = message(f"for {user}, message {len(addresses)}")
        assert codes(await conn.send(SENDER, [rcpt], data)) == {rcpt: ACCEPTED}
        sent.setdefault(rcpt, []).append(data)
        addresses.add(conn.local_address)
    assert len(addresses) == 1 and None not in addresses
    assert await tagged(server, tag) == {r: sorted(messages) for r, messages in sent.items()}


def _dots() -> bytes:
    # Lines that are, or start with, a dot; a CR LF . CR LF inside; the last line not ended.
    return b".\r\n..\r\n.leading dot\r\nmiddle\r\n.\r\n\r\n. \r\n...\r\nthe last line, not ended"


def _hundred_kb() -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    lines = [b"." + line if i % 97 == 0 else line for i in range(100 * 1024 // len(line))]
    return b"".join(lines)


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
@pytest.mark.parametrize("body", [_dots(), _hundred_kb()], ids=["dots", "100KB"])
async def test_content_arrives_byte_exact(
    server: RealServer, conn: SmtpConnection, tag: str, body: bytes
) -> None:
    recipients = [address("ann", tag), address("bob", tag)]
    data = message("exact", body)
    assert codes(await conn.send(SENDER, recipients, data)) == dict.fromkeys(recipients, ACCEPTED)
    assert await tagged(server, tag) == {r: [as_sent(data)] for r in recipients}


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
async def test_an_8bit_body_goes_where_8bitmime_is_offered(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    ann = address("ann", tag)
    data = message("8-bit body", "Grüße aus Köln, ça va ? 日本語\r\n".encode())
    results = await conn.send(SENDER, [ann], data)
    if server.eight_bit_mime:
        assert codes(results) == {ann: ACCEPTED}
        assert await tagged(server, tag) == {ann: [data]}
    else:  # the node does not downgrade: it bounces, sending nothing
        assert codes(results) == {ann: (0, "5.6.3")}
        assert await tagged(server, tag) == {}


@pytest.mark.parametrize("server", SMTPUTF8, indirect=True)
async def test_a_utf8_message_goes_where_smtputf8_is_offered(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    recipients = [address("jörg", tag), address("ann", tag), address(NOBODY, tag)]
    data = message("Grüße, jörg", "Ünïcödé body, 日本語\r\n".encode(), sender=UTF8_SENDER)
    data = data.replace(b"Subject: Gr", "Subject: ✉ Gr".encode())  # raw UTF-8 in the header (RFC 6532)
    results = await conn.send(UTF8_SENDER, recipients, data)
    assert codes(results) == {r: server.refusal(r) or ACCEPTED for r in recipients}
    assert await tagged(server, tag) == {r: [data] for r in recipients[:2]}
    if isinstance(server, AiosmtpdServer):
        [received] = [t for t in server.received if t.data == data]
        assert received.mail_from == UTF8_SENDER
        assert set(received.mail_options) >= {"SMTPUTF8", "BODY=8BITMIME"}


@pytest.mark.parametrize("server", ["postfix-no-pipelining"], indirect=True)
async def test_no_bdat_where_chunking_is_not_offered(server: RealServer, tag: str) -> None:
    assert isinstance(server, PostfixServer)
    source_ip = "127.0.0.9"  # this test's sessions, told apart in Postfix's log
    sender = SmtpSender(Destinations({"*": server.route}), "node.epoxi.test", timeout=10)
    conn = sender.connection(DOMAIN, source_ip)
    try:
        for users in (("ann", NOBODY), ("bob",)):
            recipients = [address(u, tag) for u in users]
            results = await conn.send(SENDER, recipients, message("no chunking", _hundred_kb()))
            assert codes(results) == {r: server.refusal(r) or ACCEPTED for r in recipients}
    finally:
        await conn.close()

    async def ours() -> list[dict[str, str]]:  # smtpd logs a session once it has ended
        return [counts for ip, counts in server.backend.sessions() if ip == source_ip]

    [session] = await eventually(ours)
    assert "bdat" not in session
    assert (session["mail"], session["rcpt"], session["data"]) == ("2", "2/3", "2")


def _commands_since(server: AiosmtpdServer, start: int) -> list[list[str]]:
    return server.commands.reads[start:]


@pytest.mark.parametrize("server", ["aiosmtpd-no-pipelining"], indirect=True)
async def test_without_pipelining_each_command_waits_for_its_reply(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    assert isinstance(server, AiosmtpdServer)
    start = len(server.commands.reads)
    recipients: Sequence[str] = [address(u, tag) for u in ("ann", NOBODY, "bob")]
    await conn.send(SENDER, recipients, message("one at a time"))
    await conn.send(SENDER, [address(NOBODY, tag)], message("refused"))  # then RSET
    reads = _commands_since(server, start)
    assert [v for read in reads for v in read].count("RCPT") == 4
    assert all(len(read) == 1 for read in reads), reads


@pytest.mark.parametrize("server", ["aiosmtpd"], indirect=True)
async def test_with_pipelining_the_envelope_goes_in_one_write(
    server: RealServer, conn: SmtpConnection, tag: str
) -> None:
    assert isinstance(server, AiosmtpdServer)
    start = len(server.commands.reads)
    recipients = [address(u, tag) for u in ("ann", NOBODY, "bob")]
    results = await conn.send(SENDER, recipients, message("pipelined"))
    assert codes(results) == {r: server.refusal(r) or ACCEPTED for r in recipients}
    assert ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"] in _commands_since(server, start)


@pytest.mark.parametrize("server", ["postfix"], indirect=True)
async def test_with_chunking_the_content_goes_as_bdat_byte_exact(server: RealServer, tag: str) -> None:
    assert isinstance(server, PostfixServer)
    source_ip = "127.0.0.10"  # this test's sessions, told apart in Postfix's log
    sender = SmtpSender(Destinations({"*": server.route}), "node.epoxi.test", timeout=10, chunking=True)
    conn = sender.connection(DOMAIN, source_ip)
    dotted = message("chunked", b".starts with a dot\r\n.\r\n" + _hundred_kb() + b"no final line end")
    refused_only = [address(NOBODY, tag)]
    mixed = [address(u, tag) for u in ("ann", NOBODY, "bob")]
    try:
        results = await conn.send(SENDER, mixed, dotted)
        assert codes(results) == {r: server.refusal(r) or ACCEPTED for r in mixed}
        results = await conn.send(SENDER, refused_only, message("refused"))
        assert codes(results) == {r: server.refusal(r) for r in refused_only}
        ann = address("ann", tag)
        after = message("after the refusal")
        assert codes(await conn.send(SENDER, [ann], after)) == {ann: ACCEPTED}
    finally:
        await conn.close()
    assert await tagged(server, tag) == {
        ann: sorted([as_sent(dotted), after]),
        address("bob", tag): [as_sent(dotted)],
    }

    async def ours() -> list[dict[str, str]]:
        return [counts for ip, counts in server.backend.sessions() if ip == source_ip]

    [session] = await eventually(ours)
    # Three BDATs, the one after every RCPT was refused refused too (its content still sent).
    assert (session["bdat"], session.get("data")) == ("2/3", None), session


class _Queue:
    """The lane's side of ``follow``: the messages still to send, each handed over when asked."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.announced = 0

    def follow(self) -> Message | None:
        if len(self.messages) < 2:
            return None
        self.announced += 1
        return self.messages[1]

    async def send_all(self, conn: SmtpConnection) -> list[dict[str, Reply]]:
        results = []
        while self.messages:
            results.append(await conn.send(*self.messages[0], self.follow))
            self.messages.pop(0)
        return results


def _data_sender(server: RealServer) -> SmtpConnection:
    # DATA, not BDAT: the next envelope rides on DATA's content (Postfix offers CHUNKING).
    sender = SmtpSender(Destinations({"*": server.route}), "node.epoxi.test", timeout=10, chunking=False)
    return sender.connection(DOMAIN, SOURCE_IP)


@pytest.mark.parametrize("server", ACCEPTING, indirect=True)
async def test_the_next_envelope_goes_with_the_content_and_every_reply_stays_exact(
    server: RealServer, tag: str
) -> None:
    batches = [
        ["ann"],
        ["bob", NOBODY, "cat"],  # announced with ann's content, one recipient refused
        [FULL],  # refused everywhere that refuses by address: no content, so nothing rides on it
        ["ann", "bob"],
    ]
    messages = [
        Message(SENDER, [address(u, tag) for u in users], message(f"chained {i}"))
        for i, users in enumerate(batches)
    ]
    queue = _Queue(list(messages))
    conn = _data_sender(server)
    try:
        results = await queue.send_all(conn)
        addresses = {conn.local_address}
    finally:
        await conn.close()
    for m, got in zip(messages, results, strict=True):
        assert codes(got) == {r: server.refusal(r) or ACCEPTED for r in m.recipients}
    expected: dict[str, list[bytes]] = {}
    for m in messages:
        for r in m.recipients:
            if server.refusal(r) is None:
                expected.setdefault(r, []).append(as_sent(m.data))
    assert await tagged(server, tag) == {r: sorted(d) for r, d in expected.items()}
    # Asked each time a content went, pipelining; the last message had none to follow it.
    with_content = [m for m in messages[:-1] if any(server.refusal(r) is None for r in m.recipients)]
    assert queue.announced == (len(with_content) if server.pipelining else 0)
    assert None not in addresses


@pytest.mark.parametrize("server", ["aiosmtpd"], indirect=True)
async def test_with_pipelining_a_message_is_one_write_on_a_busy_connection(
    server: RealServer, tag: str
) -> None:
    assert isinstance(server, AiosmtpdServer)
    start = len(server.commands.reads)
    queue = _Queue([Message(SENDER, [address("ann", tag)], message(f"busy {i}")) for i in range(4)])
    conn = _data_sender(server)
    try:
        await queue.send_all(conn)
    finally:
        await conn.close()
    reads = _commands_since(server, start)
    assert reads.count([".", "MAIL", "RCPT", "DATA"]) == 3, reads
    assert len(await tagged(server, tag)) == 1 and len((await tagged(server, tag))[address("ann", tag)]) == 4


@pytest.mark.parametrize("server", ["aiosmtpd", "smtp-sink", "postfix"], indirect=True)
async def test_an_announced_message_is_aborted_when_another_is_sent_or_the_connection_closes(
    server: RealServer, tag: str
) -> None:
    ann, bob, cat = (address(u, tag) for u in ("ann", "bob", "cat"))
    first, announced, other = (Message(SENDER, [r], message(f"for {r}")) for r in (ann, bob, cat))
    conn = _data_sender(server)
    try:
        assert codes(await conn.send(*first, lambda: announced)) == {ann: ACCEPTED}
        before = conn.local_address
        # Not the message announced: its open DATA is dropped with the connection, and this one
        # goes on a new connection.
        assert codes(await conn.send(*other)) == {cat: ACCEPTED}
        assert conn.local_address != before
        assert codes(await conn.send(*first, lambda: announced)) == {ann: ACCEPTED}
    finally:
        await conn.close()  # with bob's DATA open: no QUIT (it would be his content), no mail
    assert await tagged(server, tag) == {ann: [as_sent(first.data)] * 2, cat: [as_sent(other.data)]}
