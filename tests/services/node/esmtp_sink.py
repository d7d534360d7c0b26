"""A real aiosmtpd SMTP server whose EHLO offers chosen extensions (SMTPUTF8, 8BITMIME,
PIPELINING), keeping each transaction's envelope and content as it arrived and, per read from the
socket, the commands it carried (``commands``); it answers chosen recipients, or contents, with
any reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from devmesh.sink import Receiving


@dataclass(frozen=True)
class Transaction:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes


@dataclass
class CommandReads:
    """The SMTP commands each read from the socket carried, DATA's content aside (its end is
    ``"."``): a client that waits for each reply (no PIPELINING) never has two in one read."""

    reads: list[list[str]] = field(default_factory=list)
    _in_data: bool = False
    _tail: bytes = b""

    def observe(self, chunk: bytes) -> None:
        buf, pos, verbs = self._tail + chunk, 0, []
        while True:
            if self._in_data:
                end = buf.find(b"\r\n.\r\n", pos)
                if end < 0:
                    self._tail = buf[max(pos, len(buf) - 4) :]
                    break
                pos, self._in_data = end + 5, False
                verbs.append(".")  # the content's end
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                self._tail = buf[pos:]
                break
            verb = buf[pos:nl].split(b" ", 1)[0].split(b":", 1)[0].upper().decode(errors="replace")
            verbs.append(verb)
            # The content's end is CRLF . CRLF, whose first CRLF may be the DATA line's own.
            pos, self._in_data = (nl, True) if verb == "DATA" else (nl + 2, False)
        if verbs:
            self.reads.append(verbs)


class _ObservedSmtp(SMTP):
    def __init__(self, reads: CommandReads, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._reads = reads

    def data_received(self, data: bytes) -> None:
        self._reads.observe(data)
        super().data_received(data)


@dataclass
class EsmtpSink(Receiving[Transaction]):
    smtputf8: bool = True
    host: str = "127.0.0.1"
    eight_bit_mime: bool = True
    pipelining: bool = False
    hostname: str = "esmtp.epoxi.test"
    # RCPT TO:<address> -> the reply line to answer, as octets (a server may send any).
    replies: dict[str, bytes] = field(default_factory=dict)
    # The reply to RCPT TO:<address> when it is not in ``replies``; None: accepted.
    rcpt_reply: Callable[[str], str | None] | None = None
    # The reply to a message's content instead of taking it; None: taken.
    content_reply: Callable[[bytes], str | None] | None = None
    received: list[Transaction] = field(default_factory=list)
    commands: CommandReads = field(default_factory=CommandReads)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.AbstractServer | None = None
    port: int = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the hook's job once it is defined
        if not self.eight_bit_mime:
            responses = [r for r in responses if r != "250-8BITMIME"]
        if self.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str | bytes:
        if address in self.replies:
            return self.replies[address]
        if self.rcpt_reply is not None and (reply := self.rcpt_reply(address)) is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if self.content_reply is not None and (reply := self.content_reply(content)) is not None:
            return reply
        self.received.append(
            Transaction(
                str(envelope.mail_from), list(envelope.mail_options), list(envelope.rcpt_tos), content
            )
        )
        self.changed.set()
        return "250 2.0.0 OK"

    async def start(self) -> EsmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ObservedSmtp(self.commands, self, hostname=self.hostname, enable_SMTPUTF8=self.smtputf8),
            self.host,
            0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self
