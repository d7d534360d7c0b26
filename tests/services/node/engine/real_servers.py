"""Real receiving SMTP servers for the delivery client's interop tests, behind one small shape.

Three servers, in several variants each: aiosmtpd (with and without PIPELINING announced),
Postfix's ``smtp-sink`` (plain, no PIPELINING, no ESMTP, refusing every RCPT), and a real
Postfix delivering into maildirs (with and without PIPELINING and CHUNKING offered).
Every ``RealServer`` receives mail for ``DOMAIN``, says what it will answer for an address
(``refusal``), and reports what it delivered, per recipient, as the content the client sent
(``delivered``): its own additions (Received, Return-Path, ... ) taken off, dots unstuffed,
CRLF line ends, ending in CRLF. Test messages contain no bare CR or LF, so a server that stores
LF line ends is compared after turning them back into CRLF.

The servers that refuse by address follow one convention: the local part (before any
``+tag``) ``nobody`` is unknown (550 5.1.1), ``full`` is over quota (452 4.2.2); the others
in ``USERS`` are accepted. Tests tag their addresses (``ann+tag@``) to tell their mail apart on
a server shared by a module.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from benchmarks.smtpsink import SmtpSink
from devmesh.postfix import PostfixReceiver
from services.node.engine.mx import Host

DOMAIN = "interop.test"
USERS = ("ann", "bob", "cat", "dan", "eve", "jörg")
NOBODY = "nobody"  # an unknown user: 550 5.1.1
FULL = "full"  # a full mailbox: 452 4.2.2
# What a message accepted for a recipient gets from every server here: the reply to its content.
ACCEPTED = (250, "2.0.0")


def address(user: str, tag: str) -> str:
    return f"{user}+{tag}@{DOMAIN}"


def user_of(address: str) -> str:
    return address.partition("@")[0].partition("+")[0]


class RealServer(ABC):
    """A started receiving server for ``DOMAIN``."""

    name: str
    pipelining: bool = True
    smtputf8: bool = False
    eight_bit_mime: bool = True
    # Whether it refuses ``NOBODY`` and ``FULL`` (and accepts the others): else it treats every
    # recipient alike (``refusal`` says how).
    refuses_by_address: bool = True

    @property
    @abstractmethod
    def route(self) -> Host: ...

    @abstractmethod
    def refusal(self, address: str) -> tuple[int, str] | None:
        """The code and enhanced code it refuses ``address`` with; None if it accepts it."""

    @abstractmethod
    async def delivered(self) -> dict[str, list[bytes]]:
        """Every message it has delivered so far, per recipient, as the client sent it;
        it waits until what it accepted has been delivered."""

    @abstractmethod
    async def stop(self) -> None: ...

    def __repr__(self) -> str:
        return self.name


def _refused_by_address(address: str) -> tuple[int, str] | None:
    return {NOBODY: (550, "5.1.1"), FULL: (452, "4.2.2")}.get(user_of(address))


# aiosmtpd


@dataclass
class _CommandReads:
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
    def __init__(self, reads: _CommandReads, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._reads = reads

    def data_received(self, data: bytes) -> None:
        self._reads.observe(data)
        super().data_received(data)


@dataclass(frozen=True)
class Transaction:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes


class AiosmtpdServer(RealServer):
    """aiosmtpd with SMTPUTF8 and 8BITMIME; PIPELINING announced or not (it reads pipelined
    commands either way). It keeps every transaction (``received``) and, per read, the commands
    it got (``commands``)."""

    smtputf8 = True

    def __init__(
        self, *, pipelining: bool, content_reply: Callable[[bytes], str | None] | None = None
    ) -> None:
        self.pipelining = pipelining
        self.content_reply = content_reply  # the reply to a content, instead of taking it
        self.name = "aiosmtpd" if pipelining else "aiosmtpd-no-pipelining"
        self.received: list[Transaction] = []
        self.commands = _CommandReads()
        self._server: asyncio.AbstractServer | None = None
        self._port = 0

    async def start(self) -> AiosmtpdServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ObservedSmtp(
                self.commands, self, hostname="aiosmtpd.interop.test", enable_SMTPUTF8=True
            ),
            "127.0.0.1",
            0,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def route(self) -> Host:
        return Host("127.0.0.1", self._port)

    def refusal(self, address: str) -> tuple[int, str] | None:
        return _refused_by_address(address)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the hook's job once it is defined
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        user = user_of(address)
        if user == NOBODY:
            return "550 5.1.1 no such user"
        if user == FULL:
            return "452 4.2.2 mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.content_reply is not None and (reply := self.content_reply(envelope.original_content or b"")):
            return reply
        self.received.append(
            Transaction(
                str(envelope.mail_from),
                list(envelope.mail_options),
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
            )
        )
        return "250 2.0.0 OK"

    async def delivered(self) -> dict[str, list[bytes]]:
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for t in self.received:
            for rcpt in t.rcpt_tos:
                found[rcpt].append(t.data)
        return dict(found)


# smtp-sink

_SINK_FIELDS = ("x-client-addr", "x-client-proto", "x-helo-args", "x-mail-args", "x-rcpt-args", "received")
_ANGLED = re.compile(rb"<([^>]*)>")


class SmtpSinkServer(RealServer):
    """Postfix's ``smtp-sink`` keeping each transaction in a file; it accepts every recipient,
    unless ``refuse`` (``-r RCPT``/``-f RCPT`` and the reply) refuses them all."""

    smtputf8 = False

    def __init__(
        self,
        name: str,
        directory: Path,
        options: Sequence[str] = (),
        *,
        pipelining: bool = True,
        esmtp: bool = True,
        refuse: tuple[int, str] | None = None,
    ) -> None:
        self.name = name
        self.pipelining = pipelining
        self.eight_bit_mime = esmtp
        self.refuses_by_address = False
        self._refuse = refuse
        self.sink = SmtpSink(options=options, dump=directory, hostname="sink.interop.test")

    async def start(self) -> SmtpSinkServer:
        await self.sink.start()
        return self

    async def stop(self) -> None:
        await self.sink.stop()

    @property
    def route(self) -> Host:
        return Host(self.sink.host, self.sink.port)

    def refusal(self, address: str) -> tuple[int, str] | None:
        return self._refuse

    async def delivered(self) -> dict[str, list[bytes]]:
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for dump in self.sink.dumps():
            if not dump:
                continue  # a transaction at DATA: smtp-sink removes it when the client drops it
            fields, content = _leading_fields(dump, _SINK_FIELDS, last="received")
            assert content.endswith(b"\n\n"), "smtp-sink ends each dump with an empty line"
            for value in fields.get("x-rcpt-args", []):
                rcpt = _ANGLED.match(value)
                assert rcpt is not None, value
                found[rcpt.group(1).decode()].append(_crlf(content[:-1]))
        return dict(found)


# Postfix

_POSTFIX_FIELDS = ("return-path", "x-original-to", "delivered-to", "received")


class PostfixServer(RealServer):
    """A real Postfix (``devmesh.postfix.PostfixReceiver``) delivering to maildirs for ``USERS``;
    ``FULL`` is refused by an access map, ``NOBODY`` as unknown. Without ``pipelining`` it
    offers neither PIPELINING nor CHUNKING."""

    smtputf8 = True

    def __init__(self, directory: Path, *, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.name = "postfix" if pipelining else "postfix-no-pipelining"
        self.postfix = PostfixReceiver(
            directory,
            DOMAIN,
            USERS,
            refusals={f"{FULL}@{DOMAIN}": "452 4.2.2 Mailbox full"},
            hide=() if pipelining else ("pipelining", "chunking"),
        )

    async def start(self) -> PostfixServer:
        await self.postfix.start()
        return self

    async def stop(self) -> None:
        await self.postfix.stop()

    @property
    def route(self) -> Host:
        return Host("127.0.0.1", self.postfix.port)

    def refusal(self, address: str) -> tuple[int, str] | None:
        return _refused_by_address(address)

    async def delivered(self) -> dict[str, list[bytes]]:
        await self.postfix.settled()
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for user in USERS:
            for stored in self.postfix.mailbox(user):
                fields, content = _leading_fields(stored, _POSTFIX_FIELDS, last="received")
                [rcpt] = fields["delivered-to"]
                found[rcpt.decode()].append(_crlf(content))
        return dict(found)


def _leading_fields(message: bytes, names: Iterable[str], last: str) -> tuple[dict[str, list[bytes]], bytes]:
    """The header fields a server put in front of ``message`` (LF line ends), by lower-case
    name, up to and including the first ``last``; and the rest."""
    wanted = set(names)
    fields: defaultdict[str, list[bytes]] = defaultdict(list)
    lines = message.split(b"\n")
    i = 0
    while i < len(lines):
        name, colon, value = lines[i].partition(b":")
        key = name.decode(errors="replace").lower()
        assert colon and key in wanted, f"expected one of the server's own fields, got {lines[i]!r}"
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            value += b"\n" + lines[i]
            i += 1
        fields[key].append(value.strip())
        if key == last:
            return dict(fields), b"\n".join(lines[i:])
    raise AssertionError(f"no {last} field in {message[:300]!r}")


def _crlf(content: bytes) -> bytes:
    return content.replace(b"\n", b"\r\n")
