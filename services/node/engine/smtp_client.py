"""The SMTP client of the delivery path: asyncio's Protocol, with PIPELINING (RFC 2920).

aiosmtplib reads one reply per command it writes and drops what arrives while a reply waits to
be picked up, so it cannot pipeline: every message costs four round trips (MAIL, RCPT, DATA,
the end of data) and as many writes. This client keeps every reply the server sends, in order,
so when the server offers PIPELINING a transaction is two writes and two round trips: MAIL
FROM, every RCPT TO and DATA at once, then the body. Without PIPELINING it says one command and
waits for its reply, as RFC 5321 asks.

With PIPELINING, the next transaction's commands can go in the same write as this one's content
(``then``; RFC 2920 3.1 lets content open a group), so a connection kept busy costs one write
and one round trip a message. Those commands end with DATA, so from then on the connection is
committed to that next transaction: the next ``transaction`` must be the one announced (else
the connection is closed, which is the only way to abort an open DATA), and ``quit`` closes
without QUIT.

It does what the node needs and no more: connect from a source address, the greeting, EHLO
(HELO when EHLO is refused), STARTTLS on the same socket, a transaction, RSET, QUIT. Each reply
is awaited for at most ``timeout`` seconds. Errors are ``SmtpError``s: ``Disconnected`` (the
server closed the connection or it broke), ``ReplyTimeout``, ``BadReply`` (not SMTP).
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

# Octets a bare mailbox on a command line may not carry: CR and LF end the line (RFC 5321 4.1.1),
# whitespace and angle brackets end the path, and no address has control characters.
_NOT_IN_MAILBOX = re.compile(rb"[\x00-\x20\x7f<>]")
_MAX_REPLY_BYTES = 1 << 20


class SmtpError(Exception):
    """The session with the server cannot go on as SMTP."""


class Disconnected(SmtpError):
    """The server closed the connection, or it broke."""


class LostInTransaction(SmtpError):
    """The connection broke after the server had answered part of a transaction: what it did
    with the message is not known, so it must not be sent again at once on another connection."""


class ReplyTimeout(SmtpError, TimeoutError):
    """No (complete) reply within the timeout."""


class BadReply(SmtpError):
    """The server sent something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Response:
    """One SMTP reply: its code, and its text (the lines of a multi-line reply joined by LF)."""

    code: int
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


@dataclass(frozen=True, slots=True)
class Transaction:
    """The server's replies to one transaction: MAIL, each RCPT in order, and the end of DATA
    (None when DATA was not reached: MAIL refused, or every RCPT)."""

    mail: Response
    rcpts: list[Response]
    data: Response | None


class _Replies(asyncio.Protocol):
    """Parses replies as they arrive and queues them; ``next()`` takes them in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._ready: collections.deque[Response] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: SmtpError | None = None
        self.taken = 0  # replies handed out so far
        # The reply awaited now is due by _deadline. One timer watches it and is moved only when
        # it fires early (a later wait moved the deadline) or is due after a shorter wait's: a
        # timer made and cancelled per reply was about 3% of a node's event loop.
        self._deadline = 0.0
        self._within = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-", b"\r"):
                self._fail(BadReply(f"not an SMTP reply: {line[:80]!r}"))
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                self._complete()
        del buffer[:start]
        if len(buffer) > _MAX_REPLY_BYTES:
            self._fail(BadReply("reply line too long"))

    def _complete(self) -> None:
        lines, self._lines = self._lines, []
        code = int(lines[0][:3])
        text = "\n".join(line[4:].strip(b" \t\r").decode("utf-8", "surrogateescape") for line in lines)
        self._ready.append(Response(code, text))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._error = self._error or Disconnected(f"connection lost: {exc}" if exc else "connection closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def eof_received(self) -> bool:
        self._error = self._error or Disconnected("the server closed the connection")
        self._wake()
        return False

    def _fail(self, error: SmtpError) -> None:
        self._error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, within: float) -> Response:
        while not self._ready:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._deadline = deadline = loop.time() + within
            self._within = within
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._expire)
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.taken += 1
        return self._ready.popleft()

    def _expire(self) -> None:
        """The timer is due: the reply waited for is late, or the deadline moved on since."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait sets a timer again
        loop = waiter.get_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        waiter.set_exception(ReplyTimeout(f"Timed out waiting {self._within:g}s for a reply"))

    @property
    def pending(self) -> bool:
        return bool(self._ready or self._lines or self._buffer)


def _envelope_lines(
    sender: bytes, recipients: Sequence[bytes], mail_options: Sequence[str]
) -> tuple[bytes, list[bytes]]:
    mail = b"MAIL FROM:<" + sender + b">"
    if mail_options:
        mail += b" " + " ".join(mail_options).encode("ascii")
    return mail, [b"RCPT TO:<" + r + b">" for r in recipients]


def _grouped(mail: bytes, rcpts: list[bytes]) -> bytes:
    return b"\r\n".join([mail, *rcpts, b"DATA"]) + b"\r\n"


def mailbox(address: str, encoding: str) -> bytes:
    """``address`` for MAIL FROM:<> or RCPT TO:<>; ValueError when it cannot go there as it is
    (whitespace, angle brackets, control characters, or octets ``encoding`` cannot carry)."""
    encoded = address.encode(encoding)
    if _NOT_IN_MAILBOX.search(encoded):
        raise ValueError(f"address {address!r} contains characters not permitted in an SMTP mailbox")
    return encoded


def crlf_lines(data: bytes) -> bytes:
    """``data`` with CRLF line ends (a lone CR or LF becomes CRLF), its last line ended.

    Spooled mail is canonical already, so the line ends are counted (three scans, no copy) and
    the body is copied only when some are bare."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _stuffed(data: bytes) -> bytes:
    """``data`` with CRLF line ends and a "." doubled at the start of a line; copied only when
    it has to change."""
    data = crlf_lines(data)
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") if b"\r\n." in data else data


def dot_stuffed(data: bytes) -> bytes:
    """``data`` as DATA carries it: CRLF line ends, a "." doubled at the start of a line, the
    final CRLF and the ".\\r\\n" that ends it."""
    return _stuffed(data) + b".\r\n"


class SmtpClient:
    """One SMTP session: ``client, greeting = await SmtpClient.open(...)``, then ``ehlo``."""

    def __init__(self, replies: _Replies, timeout: float) -> None:
        self._replies = replies
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self._ahead: bytes | None = None  # the next transaction's commands, already written

    @classmethod
    async def open(
        cls, host: str, port: int, *, source_address: tuple[str, int] | None, within: float
    ) -> tuple[Self, Response]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                _, replies = await loop.create_connection(_Replies, host, port, local_addr=source_address)
        except TimeoutError:
            raise ReplyTimeout(f"Timed out connecting to {host}:{port} after {within:g}s") from None
        client = cls(replies, within)
        try:
            greeting = await replies.next(within)
        except BaseException:
            client.close()
            raise
        return client, greeting

    @property
    def connected(self) -> bool:
        t = self._replies.transport
        return t is not None and not t.is_closing()

    @property
    def sockname(self) -> tuple[str, int] | None:
        t = self._replies.transport
        if t is None:
            return None
        host, port, *_ = t.get_extra_info("sockname")
        return str(host), int(port)

    def offers(self, keyword: str) -> bool:
        return keyword.lower() in self.extensions

    def _write(self, data: bytes) -> None:
        t = self._replies.transport
        if t is None or t.is_closing():
            raise Disconnected("connection closed")
        t.write(data)

    async def command(self, line: bytes) -> Response:
        self._write(line + b"\r\n")
        return await self._replies.next(self.timeout)

    async def ehlo(self, name: str) -> Response:
        """EHLO, and HELO when EHLO is refused; ``extensions`` holds what the server offers."""
        reply = await self.command(b"EHLO " + name.encode("ascii"))
        if reply.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.lower()] = params
            return reply
        self.esmtp, self.extensions = False, {}
        return await self.command(b"HELO " + name.encode("ascii"))

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> Response:
        """STARTTLS, and the TLS handshake on this connection when the server agrees (220)."""
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            return reply
        replies = self._replies
        if replies.pending:
            raise BadReply("the server sent more after its 220 to STARTTLS")  # RFC 3207 5: an attack
        assert replies.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            replies.transport,
            replies,
            context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=self.timeout,
        )
        if transport is None:
            raise Disconnected("the connection closed during the TLS handshake")
        replies.transport = transport
        self.extensions, self.esmtp = {}, False  # RFC 3207 4.2: forget them; EHLO again
        return reply

    @property
    def ahead(self) -> bool:
        """The next transaction's commands went with the last content (its DATA is open)."""
        return self._ahead is not None

    def commands(self, sender: bytes, recipients: Sequence[bytes], mail_options: Sequence[str] = ()) -> bytes:
        """A pipelined transaction's commands: MAIL FROM, each RCPT TO, and DATA."""
        return _grouped(*_envelope_lines(sender, recipients, mail_options))

    async def transaction(
        self,
        sender: bytes,
        recipients: Sequence[bytes],
        data: bytes,
        mail_options: Sequence[str] = (),
        *,
        chunking: bool = False,
        then: Callable[[], bytes | None] | None = None,
    ) -> Transaction:
        """MAIL FROM:<sender>, RCPT TO:<r> for each of ``recipients`` and, when any was accepted,
        DATA with ``data`` (dot-stuffed here). Pipelined when the server offers PIPELINING; then
        ``then``, asked just before the content goes, may give the next transaction's
        ``commands`` to write after it. With ``chunking``, and CHUNKING offered (RFC 3030), the
        content goes as one ``BDAT <size> LAST`` instead: no dot-stuffing, and with PIPELINING
        the whole transaction is one write and one round trip (the body is sent even if every
        RCPT is then refused)."""
        mail, rcpts = _envelope_lines(sender, recipients, mail_options)
        heard = self._replies.taken
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None:
                if ahead != _grouped(mail, rcpts):
                    self.close()  # an open DATA is aborted only by dropping the connection
                    raise Disconnected("the transaction announced ahead was not the one sent")
                return await self._pipelined(mail, rcpts, data, then, announced=True)
            if chunking and self.offers("chunking"):
                return await self._chunked(mail, rcpts, crlf_lines(data))
            if self.offers("pipelining"):
                return await self._pipelined(mail, rcpts, data, then)
            return await self._sequential(mail, rcpts, data)
        except Disconnected as e:
            if self._replies.taken == heard:
                raise  # the server said nothing to it: an idle connection it had dropped
            raise LostInTransaction(f"connection lost during the transaction: {e}") from e

    async def _envelope(self, mail: bytes, rcpts: list[bytes]) -> tuple[Response, list[Response], bool]:
        """MAIL, then each RCPT, one reply at a time (no RCPT after a refused MAIL); whether the
        content may follow (MAIL and at least one RCPT accepted)."""
        mail_reply = await self.command(mail)
        if mail_reply.code // 100 != 2:
            return mail_reply, [], False
        rcpt_replies = [await self.command(r) for r in rcpts]
        return mail_reply, rcpt_replies, any(r.code // 100 == 2 for r in rcpt_replies)

    async def _sequential(self, mail: bytes, rcpts: list[bytes], data: bytes) -> Transaction:
        mail_reply, rcpt_replies, accepted = await self._envelope(mail, rcpts)
        if not accepted:
            return Transaction(mail_reply, rcpt_replies, None)
        start = await self.command(b"DATA")
        if start.code != 354:
            return Transaction(mail_reply, rcpt_replies, start)
        self._write(dot_stuffed(data))
        return Transaction(mail_reply, rcpt_replies, await self._replies.next(self.timeout))

    async def _pipelined(
        self,
        mail: bytes,
        rcpts: list[bytes],
        data: bytes,
        then: Callable[[], bytes | None] | None,
        *,
        announced: bool = False,
    ) -> Transaction:
        if not announced:
            self._write(_grouped(mail, rcpts))
        replies = self._replies
        mail_reply = await replies.next(self.timeout)
        rcpt_replies = [await replies.next(self.timeout) for _ in rcpts]
        start = await replies.next(self.timeout)
        accepted = mail_reply.code // 100 == 2 and any(r.code // 100 == 2 for r in rcpt_replies)
        if start.code != 354:
            return Transaction(mail_reply, rcpt_replies, start if accepted else None)
        if not accepted:
            # The server took DATA with no recipient (RFC 2920 3.1 says it should not): end it empty.
            self._write(b".\r\n")
            await replies.next(self.timeout)
            return Transaction(mail_reply, rcpt_replies, None)
        content = _stuffed(data)
        following = then() if then is not None else None
        # One write, and one copy of the content to make it.
        self._write(b"".join((content, b".\r\n", following or b"")))
        self._ahead = following
        return Transaction(mail_reply, rcpt_replies, await replies.next(self.timeout))

    async def _chunked(self, mail: bytes, rcpts: list[bytes], body: bytes) -> Transaction:
        bdat = b"BDAT %d LAST\r\n" % len(body)
        replies = self._replies
        if self.offers("pipelining"):
            self._write(b"".join((b"\r\n".join([mail, *rcpts]), b"\r\n", bdat, body)))
            mail_reply = await replies.next(self.timeout)
            rcpt_replies = [await replies.next(self.timeout) for _ in rcpts]
            end = await replies.next(self.timeout)
        else:
            mail_reply, rcpt_replies, accepted = await self._envelope(mail, rcpts)
            if not accepted:
                return Transaction(mail_reply, rcpt_replies, None)
            self._write(bdat + body)
            end = await replies.next(self.timeout)
        accepted = mail_reply.code // 100 == 2 and any(r.code // 100 == 2 for r in rcpt_replies)
        return Transaction(mail_reply, rcpt_replies, end if accepted else None)

    async def rset(self) -> Response:
        return await self.command(b"RSET")

    async def quit(self) -> None:
        if self._ahead is not None:
            self.close()  # QUIT would be the announced transaction's content: drop it unsent
            return
        try:
            await self.command(b"QUIT")
        finally:
            self.close()

    def close(self) -> None:
        self._ahead = None
        t = self._replies.transport
        if t is not None:
            t.close()
