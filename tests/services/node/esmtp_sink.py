"""A real aiosmtpd SMTP server whose EHLO offers chosen extensions (SMTPUTF8, 8BITMIME), keeping
each transaction's envelope and content as it arrived, and answering chosen recipients with any
octets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Transaction:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes


@dataclass
class EsmtpSink:
    smtputf8: bool = True
    host: str = "127.0.0.1"
    eight_bit_mime: bool = True
    # RCPT TO:<address> -> the reply line to answer, as octets (a server may send any).
    replies: dict[str, bytes] = field(default_factory=dict)
    received: list[Transaction] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.AbstractServer | None = None
    port: int = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the hook's job once it is defined
        if self.eight_bit_mime:
            return responses
        return [r for r in responses if r != "250-8BITMIME"]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str | bytes:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(
            Transaction(
                str(envelope.mail_from),
                list(envelope.mail_options),
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
            )
        )
        self.changed.set()
        return "250 2.0.0 OK"

    async def start(self) -> EsmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="esmtp.epoxi.test", enable_SMTPUTF8=self.smtputf8), self.host, 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def recipients(self) -> list[str]:
        return [r for t in self.received for r in t.rcpt_tos]

    async def wait_for(self, count: int, seconds: float = 30.0) -> list[Transaction]:
        """Wait until at least ``count`` recipients have been received."""

        async def until() -> None:
            while len(self.recipients()) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), seconds)
        return self.received
