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

import re
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, Self

from benchmarks.smtpsink import SmtpSink
from devmesh.postfix import PostfixReceiver
from services.node.engine.mx import Host
from tests.services.node.esmtp_sink import EsmtpSink

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


class _Backend(Protocol):
    port: int

    async def start(self) -> object: ...

    async def stop(self) -> None: ...


class RealServer(ABC):
    """A receiving server for ``DOMAIN`` (``backend``, on 127.0.0.1), once ``start``ed."""

    backend: _Backend
    name: str
    pipelining: bool = True
    smtputf8: bool = False
    eight_bit_mime: bool = True
    # Whether it refuses ``NOBODY`` and ``FULL`` (and accepts the others): else it treats every
    # recipient alike (``refusal`` says how).
    refuses_by_address: bool = True

    async def start(self) -> Self:
        await self.backend.start()
        return self

    async def stop(self) -> None:
        await self.backend.stop()

    @property
    def route(self) -> Host:
        return Host("127.0.0.1", self.backend.port)

    def refusal(self, address: str) -> tuple[int, str] | None:
        """The code and enhanced code it refuses ``address`` with; None if it accepts it."""
        return _refused_by_address(address)

    @abstractmethod
    async def delivered(self) -> dict[str, list[bytes]]:
        """Every message it has delivered so far, per recipient, as the client sent it;
        it waits until what it accepted has been delivered."""

    def __repr__(self) -> str:
        return self.name


_REFUSALS = {NOBODY: (550, "5.1.1", "no such user"), FULL: (452, "4.2.2", "mailbox full")}


def _refused_by_address(address: str) -> tuple[int, str] | None:
    refusal = _REFUSALS.get(user_of(address))
    return None if refusal is None else refusal[:2]


# aiosmtpd


class AiosmtpdServer(RealServer):
    """aiosmtpd (``EsmtpSink``) with SMTPUTF8 and 8BITMIME; PIPELINING announced or not (it reads
    pipelined commands either way). Its ``received`` transactions and, per read, the ``commands``
    it got are the sink's."""

    backend: EsmtpSink
    smtputf8 = True

    def __init__(
        self, *, pipelining: bool, content_reply: Callable[[bytes], str | None] | None = None
    ) -> None:
        self.pipelining = pipelining
        self.name = "aiosmtpd" if pipelining else "aiosmtpd-no-pipelining"
        self.backend = EsmtpSink(
            pipelining=pipelining,
            hostname="aiosmtpd.interop.test",
            rcpt_reply=_rcpt_reply,
            content_reply=content_reply,
        )
        self.received = self.backend.received
        self.commands = self.backend.commands

    async def delivered(self) -> dict[str, list[bytes]]:
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for t in self.received:
            for rcpt in t.rcpt_tos:
                found[rcpt].append(t.data)
        return dict(found)


def _rcpt_reply(address: str) -> str | None:
    refusal = _REFUSALS.get(user_of(address))
    return None if refusal is None else " ".join(map(str, refusal))


# smtp-sink

_SINK_FIELDS = ("x-client-addr", "x-client-proto", "x-helo-args", "x-mail-args", "x-rcpt-args", "received")
_ANGLED = re.compile(rb"<([^>]*)>")


class SmtpSinkServer(RealServer):
    """Postfix's ``smtp-sink`` keeping each transaction in a file; it accepts every recipient,
    unless ``refuse`` (``-r RCPT``/``-f RCPT`` and the reply) refuses them all."""

    backend: SmtpSink
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
        self.backend = SmtpSink(options=options, dump=directory, hostname="sink.interop.test")

    def refusal(self, address: str) -> tuple[int, str] | None:
        return self._refuse

    async def delivered(self) -> dict[str, list[bytes]]:
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for dump in self.backend.dumps():
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

    backend: PostfixReceiver
    smtputf8 = True

    def __init__(self, directory: Path, *, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.name = "postfix" if pipelining else "postfix-no-pipelining"
        self.backend = PostfixReceiver(
            directory,
            DOMAIN,
            USERS,
            refusals={f"{FULL}@{DOMAIN}": "452 4.2.2 Mailbox full"},
            hide=() if pipelining else ("pipelining", "chunking"),
        )

    async def delivered(self) -> dict[str, list[bytes]]:
        await self.backend.settled()
        found: defaultdict[str, list[bytes]] = defaultdict(list)
        for user in USERS:
            for stored in self.backend.mailbox(user):
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
