"""The wire client against small scripted servers that record each read: what is pipelined, how
replies split across reads are matched, and what happens when the server misbehaves."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.node.engine.mx import Destinations, Host
from services.node.engine.reply import BAD_CONNECTION
from services.node.engine.smtp import Message, SmtpSender
from services.node.engine.smtp_client import (
    _MAX_REPLY_BYTES,
    BadReply,
    Disconnected,
    LostInTransaction,
    ReplyTimeout,
    SmtpClient,
    _Replies,
    crlf_lines,
    dot_stuffed,
    mailbox,
)


@dataclass
class Scripted:
    """A server that answers each command line: by the first of ``answers`` its line starts with,
    else as a plain server would; it never answers a line that starts with one of ``silent``."""

    extensions: Sequence[str] = ("PIPELINING",)
    answers: dict[bytes, bytes] = field(default_factory=dict)
    silent: Sequence[bytes] = ()
    reads: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    split_replies: bool = False
    # Hang up, unanswered, at the end of the first this many contents (a server going down).
    drop_after_contents: int = 0
    port: int = 0

    def answer(self, line: bytes) -> bytes | None:
        if line.startswith(tuple(self.silent)):
            return None
        for prefix, reply in self.answers.items():
            if line.startswith(prefix):
                return reply
        if line.startswith(b"EHLO"):
            return b"".join(
                [
                    b"250-scripted\r\n",
                    *(b"250-" + e.encode() + b"\r\n" for e in self.extensions),
                    b"250 OK\r\n",
                ]
            )
        if line == b"DATA":
            return b"354 go on\r\n"
        if line == b"QUIT":
            return b"221 bye\r\n"
        return b"250 2.0.0 ok\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"220 scripted ESMTP\r\n")
        buffer, in_data, bdat = b"", False, None
        while chunk := await reader.read(65536):
            self.reads.append(chunk)
            buffer += chunk
            out = b""
            while True:
                if bdat is not None:
                    if len(buffer) < bdat:
                        break
                    self.chunks.append(buffer[:bdat])
                    buffer, bdat = buffer[bdat:], None
                    out += b"250 2.0.0 chunk queued\r\n"
                    continue
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    buffer, in_data = buffer[end + 5 :], False
                    if self.drop_after_contents > 0:
                        self.drop_after_contents -= 1
                        writer.close()
                        return
                    out += b"250 2.0.0 queued\r\n"
                    continue
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                line, buffer = buffer[:end], buffer[end + 2 :]
                if line.startswith(b"BDAT "):
                    bdat = int(line.split()[1])
                    continue
                reply = self.answer(line)
                if reply is None:
                    continue
                out += reply
                in_data = line == b"DATA" and reply.startswith(b"354")
            if out:
                if self.split_replies:  # one octet at a time
                    for i in range(len(out)):
                        writer.write(out[i : i + 1])
                        await writer.drain()
                else:
                    writer.write(out)
        writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    servers: list[tuple[asyncio.Server, Scripted]] = []

    async def start(**options: object) -> Scripted:
        s = Scripted(**options)  # type: ignore[arg-type]
        server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        s.port = server.sockets[0].getsockname()[1]
        servers.append((server, s))
        return s

    yield start
    for server, s in servers:
        for w in s.writers:
            w.close()
        server.close()
        await server.wait_closed()


async def session(s: Scripted, within: float = 5.0) -> SmtpClient:
    client, greeting = await SmtpClient.open("127.0.0.1", s.port, source_address=None, within=within)
    assert greeting.code == 220
    assert (await client.ehlo("node.epoxi.test")).code == 250
    return client


async def test_with_pipelining_envelope_and_data_go_in_one_write(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted()
    client = await session(s)
    s.reads.clear()
    t = await client.transaction(b"a@x.test", [b"b@y.test", b"c@y.test"], b"Subject: hi\r\n\r\nbody\r\n")
    assert s.reads[0] == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    assert (t.mail.code, [r.code for r in t.rcpts], t.data and t.data.code) == (250, [250, 250], 250)
    await client.quit()


async def test_without_pipelining_each_command_waits_for_its_reply(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(extensions=())
    client = await session(s)
    s.reads.clear()
    await client.transaction(b"a@x.test", [b"b@y.test", b"c@y.test"], b"body\r\n")
    assert s.reads[:4] == [
        b"MAIL FROM:<a@x.test>\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        b"RCPT TO:<c@y.test>\r\n",
        b"DATA\r\n",
    ]
    await client.quit()


async def test_refused_recipients_keep_their_own_replies_and_data_goes_for_the_rest(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(answers={b"RCPT TO:<no@": b"550 5.1.1 no such user\r\n"})
    client = await session(s)
    t = await client.transaction(b"a@x.test", [b"no@y.test", b"yes@y.test"], b"body\r\n")
    assert [(r.code, r.text) for r in t.rcpts] == [(550, "5.1.1 no such user"), (250, "2.0.0 ok")]
    assert t.data is not None and (t.data.code, t.data.text) == (250, "2.0.0 queued")


async def test_when_every_recipient_is_refused_no_body_is_sent(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(
        answers={b"RCPT": b"550 5.1.1 no such user\r\n", b"DATA": b"554 5.5.1 no valid recipients\r\n"}
    )
    client = await session(s)
    s.reads.clear()
    t = await client.transaction(b"a@x.test", [b"no@y.test"], b"SECRET BODY\r\n")
    assert t.data is None and t.rcpts[0].code == 550
    assert (await client.rset()).code == 250  # the session goes on
    assert b"SECRET BODY" not in b"".join(s.reads)


async def test_replies_split_across_reads_and_multi_line_replies_are_matched_in_order(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(
        split_replies=True, answers={b"MAIL": b"250-first line\r\n250-second\r\n250 2.1.0 third\r\n"}
    )
    client = await session(s)
    assert client.offers("pipelining") and client.offers("PIPELINING")
    t = await client.transaction(b"a@x.test", [b"b@y.test"], b"body\r\n")
    assert t.mail.text == "first line\nsecond\n2.1.0 third"
    assert [r.code for r in t.rcpts] == [250] and t.data is not None and t.data.code == 250


async def test_a_refused_ehlo_falls_back_to_helo(scripted: Callable[..., Awaitable[Scripted]]) -> None:
    s = await scripted(answers={b"EHLO": b"502 5.5.1 no EHLO here\r\n"})
    client, _ = await SmtpClient.open("127.0.0.1", s.port, source_address=None, within=5)
    assert (await client.ehlo("node.epoxi.test")).code == 250
    assert client.extensions == {} and not client.offers("pipelining")


async def replies_later(replies: _Replies, gap: float, lines: Sequence[bytes]) -> None:
    for line in lines:
        await asyncio.sleep(gap)
        replies.data_received(line)


async def test_each_reply_has_the_whole_timeout_however_long_they_take_together() -> None:
    replies = _Replies()
    feeding = asyncio.create_task(replies_later(replies, 0.3, [b"250 %d\r\n" % i for i in range(4)]))
    got = [await replies.next(1.0) for _ in range(4)]  # 1.2 s in all, each within 0.3
    await feeding
    assert [r.text for r in got] == ["0", "1", "2", "3"]


async def test_a_shorter_timeout_after_a_longer_one_is_kept() -> None:
    replies = _Replies()
    asyncio.get_running_loop().call_soon(replies.data_received, b"250 soon\r\n")
    assert (await replies.next(30.0)).text == "soon"  # waited for: its 30 s timer is set
    async with asyncio.timeout(5):  # were the 30 s timer still the one that counts, this fires
        with pytest.raises(ReplyTimeout, match=r"0\.2s"):
            await replies.next(0.2)


async def test_a_reply_late_after_prompt_ones_times_out_and_a_closed_connection_stops_the_timer() -> None:
    replies = _Replies()
    replies.data_received(b"250 first\r\n250 second\r\n")
    assert [(await replies.next(0.3)).text for _ in range(2)] == ["first", "second"]
    with pytest.raises(ReplyTimeout):
        await replies.next(0.3)
    replies.data_received(b"250 late\r\n")
    assert (await replies.next(0.3)).text == "late"  # still usable: the caller decides
    waiting = asyncio.create_task(replies.next(30.0))
    await asyncio.sleep(0)
    assert replies._timer is not None
    replies.connection_lost(None)
    assert replies._timer is None
    with pytest.raises(Disconnected):
        await waiting


REPLIES = b"220 hi\r\n250-first line\r\n250-second\r\n250 2.1.0 third\r\n354 go on\n"


@given(st.lists(st.integers(min_value=0, max_value=len(REPLIES)), max_size=8))
def test_replies_read_the_same_however_the_segments_split_them(cuts: list[int]) -> None:
    replies, bounds = _Replies(), [0, *sorted(cuts), len(REPLIES)]
    for start, end in itertools.pairwise(bounds):
        replies.data_received(REPLIES[start:end])
    assert [(r.code, r.text) for r in replies._ready] == [
        (220, "hi"),
        (250, "first line\nsecond\n2.1.0 third"),
        (354, "go on"),
    ]
    assert not replies._buffer and not replies._lines  # nothing left half-read


async def test_a_reply_line_without_end_past_the_limit_is_refused() -> None:
    replies = _Replies()
    replies.data_received(b"250 start")
    for _ in range(_MAX_REPLY_BYTES // 65536 + 1):
        replies.data_received(b"x" * 65536)
    with pytest.raises(BadReply, match="too long"):
        await replies.next(5)


async def test_a_line_that_is_no_reply_is_refused() -> None:
    replies = _Replies()
    replies.data_received(b"250 fine\r\nHTTP/1.1 400 Bad Request\r\n")
    assert (await replies.next(5)).text == "fine"
    with pytest.raises(BadReply, match="not an SMTP reply"):
        await replies.next(5)


async def test_a_silent_server_times_out(scripted: Callable[..., Awaitable[Scripted]]) -> None:
    s = await scripted(silent=(b"MAIL",))
    client = await session(s, within=0.2)
    with pytest.raises(ReplyTimeout, match="Timed out"):
        await client.transaction(b"a@x.test", [b"b@y.test"], b"body\r\n")


async def test_garbage_is_a_bad_reply_and_a_closed_connection_is_disconnected(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(answers={b"MAIL": b"hello there\r\n"})
    client = await session(s)
    with pytest.raises(BadReply):
        await client.transaction(b"a@x.test", [b"b@y.test"], b"body\r\n")
    s2 = await scripted()
    client2 = await session(s2)
    await client2.quit()  # the server closes after 221
    with pytest.raises(Disconnected):
        await client2.transaction(b"a@x.test", [b"b@y.test"], b"body\r\n")


async def test_with_chunking_the_whole_transaction_is_one_write_and_the_content_verbatim(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(extensions=("PIPELINING", "CHUNKING"))
    client = await session(s)
    s.reads.clear()
    body = b".not stuffed\r\n.\r\nlf\nend"
    t = await client.transaction(b"a@x.test", [b"b@y.test"], body, chunking=True)
    sent = b".not stuffed\r\n.\r\nlf\r\nend\r\n"
    assert s.reads[0] == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT %d LAST\r\n" % len(sent) + sent
    assert s.chunks == [sent] and t.data is not None and t.data.text == "2.0.0 chunk queued"
    s.reads.clear()
    await client.transaction(b"a@x.test", [b"b@y.test"], body)  # not asked for: DATA
    assert s.reads[0].endswith(b"DATA\r\n")


async def test_a_connection_lost_after_part_of_a_transaction_is_not_a_dropped_idle_one(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    """Only a connection that broke before the server answered anything may be retried at once
    on a new one; after that the message's fate is unknown."""
    s = await scripted(extensions=())  # MAIL and RCPT answered one by one, then the hang-up
    client = await session(s)
    original = s.answer

    def hang_up_after_rcpt(line: bytes) -> bytes | None:
        if line.startswith(b"DATA"):
            for w in s.writers:
                w.close()
            return None
        return original(line)

    s.answer = hang_up_after_rcpt  # type: ignore[method-assign]
    with pytest.raises(LostInTransaction):
        await client.transaction(b"a@x.test", [b"b@y.test"], b"body\r\n")


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuffed(b".lead\r\nmid\r\n.\r\nend") == b"..lead\r\nmid\r\n..\r\nend\r\n.\r\n"
    assert dot_stuffed(b"lf\nonly\n.dot") == b"lf\r\nonly\r\n..dot\r\n.\r\n"
    assert dot_stuffed(b"cr\ralone\r\n") == b"cr\r\nalone\r\n.\r\n"
    assert dot_stuffed(b"") == b"\r\n.\r\n"
    canonical = b"Subject: x\r\n\r\nno dots\r\n"
    assert crlf_lines(canonical) is canonical  # nothing to change: not copied


@given(st.binary(max_size=64).map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)))
def test_line_ends_are_made_crlf_and_dots_doubled_whatever_the_body(data: bytes) -> None:
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if len(lines) > 1 and lines[-1] == b"":
        lines.pop()  # the last line's end
    assert crlf_lines(data) == b"".join(line + b"\r\n" for line in lines)
    assert (
        dot_stuffed(data)
        == b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines) + b".\r\n"
    )


@pytest.mark.parametrize(
    "address", ["a b@x.test", "a\r\nRCPT TO:<evil@x.test>", "<a@x.test>", "a\x00@x.test"]
)
def test_an_address_that_cannot_go_on_a_command_line_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not permitted in an SMTP mailbox"):
        mailbox(address, "ascii")
    with pytest.raises(UnicodeEncodeError):
        mailbox("grüße@x.test", "ascii")
    assert mailbox("grüße@x.test", "utf-8") == "grüße@x.test".encode()


async def test_a_server_lost_after_a_content_and_the_next_envelope_loses_that_transaction_only(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    s = await scripted(drop_after_contents=1)
    sender = SmtpSender(Destinations({"*": Host("127.0.0.1", s.port)}), "node.epoxi.test", timeout=5)
    conn = sender.connection("y.test", "127.0.0.1")
    following = Message("a@x.test", ["c@y.test"], b"two\r\n")
    try:
        first = await conn.send("a@x.test", ["b@y.test"], b"one\r\n", lambda: following)
        # The content went with the next envelope, and the server hung up unanswered: the first
        # message's fate is unknown (temporary), and the next, never sent, goes on a new session.
        assert b"one\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n" in b"".join(s.reads)
        lost = first["b@y.test"]
        assert (lost.code, lost.enhanced, lost.permanent) == (0, BAD_CONNECTION, False)  # the node's own
        assert "lost during the transaction" in lost.text
        second = await conn.send(*following)
        assert second["c@y.test"].code == 250
    finally:
        await conn.close()
    assert len(s.writers) == 2
    assert b"".join(s.reads).count(b"two\r\n.\r\n") == 1
