"""Sending mail: the small ``Sender`` interface, and its real implementation, SMTP (``smtp_client``).

A ``Sender`` opens ``Connection``s for a (domain, source IP) pair. A connection sends one
message per SMTP transaction and reports a ``Reply`` per recipient; it connects lazily, binds the
source address, greets with the EHLO name of that address, upgrades with STARTTLS when offered,
and stays open for the next message until it has carried ``max_messages_per_connection``. When
the server offers PIPELINING, a transaction's envelope and DATA go in one write, and a caller
that knows its next message (``follow``) has that message's envelope go with this one's content.
It tries the domain's hosts in order; a host it could not connect to is left alone for a while
(``HostBackoff``). Transport failures never raise: they become temporary replies of the node's
own, as RFC 5321 treats them. What the server's extensions cannot carry (a UTF-8 address or
header without SMTPUTF8, an 8-bit body without 8BITMIME: ``extensions``), and an address that
cannot go on a command line, bounce with a permanent reply of the node's own.

While tracing is on, a connection names its server on the current span (the pipeline's
``smtp send``: ``server.address``, ``server.port``, whether it was reused), and opening one
makes the spans ``dns mx`` (where the domain's mail goes), ``smtp connect`` (per address tried:
connect and greeting, with ``network.peer.address`` and ``network.local.address``) and
``smtp starttls``.
Connections opened, reused, upgraded with TLS, and hosts put to rest are counted through the
sender's ``instruments``, per routing key.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from epoxi.observability import tracing
from epoxi.routing import routing_key
from services.node.engine.extensions import Needs
from services.node.engine.host_backoff import HostBackoff
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.mx import Destinations, DnsUnavailable, Host, NoRoute, family_of
from services.node.engine.reply import BAD_CONNECTION, NO_ANSWER, ROUTING_FAILURE, Reply
from services.node.engine.smtp_client import (
    Disconnected,
    LostInTransaction,
    Response,
    SmtpClient,
    SmtpError,
    mailbox,
)
from services.node.engine.tls import TlsPolicy

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGES_PER_CONNECTION = 100
# RFC 3463: an address the node cannot put on an SMTP command line (never sent).
BAD_SENDER = "5.1.7"
BAD_RECIPIENT = "5.1.3"


class Message(NamedTuple):
    sender: str
    recipients: Sequence[str]
    data: bytes


# Asked as a message's content is about to go: the message the caller sends next on this
# connection, committing to it, or None. A connection may never ask.
Follow = Callable[[], Message | None]


class Connection(Protocol):
    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None = None
    ) -> dict[str, Reply]:
        """Send ``data`` to ``recipients`` in one transaction; a reply for every recipient. When
        ``follow`` gave a message, the next ``send`` is that message's."""
        ...

    async def close(self) -> None: ...


class Sender(Protocol):
    def connection(self, domain: str, source_ip: str) -> Connection: ...


@dataclass
class SmtpSender:
    destinations: Destinations
    ehlo_name: str
    timeout: float = DEFAULT_TIMEOUT
    # Source IP -> EHLO name, for IPs whose name differs from ``ehlo_name``.
    ehlo_names: Mapping[str, str] = field(default_factory=dict)
    max_messages_per_connection: int = DEFAULT_MAX_MESSAGES_PER_CONNECTION
    tls: TlsPolicy = field(default_factory=TlsPolicy)
    backoff: HostBackoff = field(default_factory=HostBackoff)
    instruments: Instruments = NO_INSTRUMENTS
    # BDAT (RFC 3030) where the server offers CHUNKING, instead of DATA: one write and one round
    # trip a message, no dot-stuffing (benchmarks/smtp_client.py: 1.4x PIPELINING's msgs/s).
    chunking: bool = True

    def __post_init__(self) -> None:
        self.ehlo_names = {str(ipaddress.ip_address(ip)): name for ip, name in self.ehlo_names.items()}

    def ehlo_for(self, source_ip: str) -> str:
        return self.ehlo_names.get(source_ip, self.ehlo_name)

    def connection(self, domain: str, source_ip: str) -> SmtpConnection:
        return SmtpConnection(self, domain, source_ip)


@dataclass
class _Prepared:
    results: dict[str, Reply]  # for the recipients that will not be sent to
    sendable: list[str] = field(default_factory=list)
    mail_from: bytes = b""
    lines: list[bytes] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


class _TlsFailed(SmtpError):
    """STARTTLS was refused, the handshake failed, or TLS is required and was not offered."""


class _Unreachable(Exception):
    """No host of the domain took a connection."""


class SmtpConnection:
    """One SMTP connection to a domain's destination, opened on first use and reused."""

    def __init__(self, sender: SmtpSender, domain: str, source_ip: str) -> None:
        self._sender = sender
        self._domain = domain
        self._source_ip = source_ip
        self._smtp: SmtpClient | None = None
        self._host = ""
        self._port = 0
        self._address = ""
        self._messages = 0
        self.tls = False
        self._measures = sender.instruments.key(routing_key(domain, source_ip))
        # The message whose commands went with the last content, as prepared then.
        self._announced: tuple[Message, _Prepared] | None = None

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.connected

    @property
    def local_address(self) -> tuple[str, int] | None:
        """The (source IP, port) of the open connection, if any."""
        return None if self._smtp is None else self._smtp.sockname

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None = None
    ) -> dict[str, Reply]:
        reused = self.connected
        if not reused:
            try:
                await self._connect()
            except NoRoute as e:
                return dict.fromkeys(recipients, Reply(e.code, e.enhanced, str(e)))
            except DnsUnavailable as e:
                return _transient(recipients, str(e), ROUTING_FAILURE)
            except _Unreachable as e:
                return _transient(recipients, f"cannot connect: {e}", NO_ANSWER)
            self._measures.connection_opened(self.tls)
        if tracing.enabled() and (span := trace.get_current_span()).is_recording():
            # The rest of the connection's description (peer and local address, TLS) is on its
            # `smtp connect` span: each attribute on a per-message span costs its encoding.
            span.set_attributes(
                {
                    "server.address": self._host,
                    "server.port": self._port,
                    "epoxi.smtp.connection_reused": reused,
                }
            )
        try:
            results = await self._transaction(sender, recipients, data, follow)
        except Disconnected as e:
            if not reused:
                return _transient(recipients, f"connection lost: {e}", BAD_CONNECTION)
            # The server dropped the idle connection we kept; try once on a fresh one.
            return await self.send(sender, recipients, data, follow)
        if reused:
            self._measures.connection_reused()
        self._messages += 1
        if self._messages >= self._sender.max_messages_per_connection:
            await self.close()  # QUIT; the next message opens a new connection
        return results

    def _prepare(self, smtp: SmtpClient, sender: str, recipients: Sequence[str], data: bytes) -> _Prepared:
        """What of a message can go to this server, and its command lines."""
        needs = Needs.of(sender, recipients, data)
        offers = smtp.offers
        refused: dict[str, Reply] = {}
        for rcpt in recipients:
            if (refusal := needs.refusal(rcpt, offers, self._host)) is not None:
                refused[rcpt] = refusal
        to = [r for r in recipients if r not in refused]
        if not to:
            return _Prepared(refused)
        options, encoding = needs.sent_with(to, offers)
        try:
            mail_from = mailbox(sender, encoding)
        except ValueError as e:  # it cannot go on the command line: nothing sent
            return _Prepared(refused | dict.fromkeys(to, Reply.local(f"not sent: {e}", BAD_SENDER)))
        prepared = _Prepared(refused, mail_from=mail_from, options=options)
        for rcpt in to:
            try:
                prepared.lines.append(mailbox(rcpt, encoding))
                prepared.sendable.append(rcpt)
            except ValueError as e:  # as for the sender: not sent
                prepared.results[rcpt] = Reply.local(f"not sent: {e}", BAD_RECIPIENT)
        return prepared

    def _then(self, smtp: SmtpClient, follow: Follow | None) -> Callable[[], bytes | None] | None:
        """The next message's commands to go with this one's content, while the connection will
        carry it (``max_messages_per_connection``)."""
        if follow is None or self._messages + 1 >= self._sender.max_messages_per_connection:
            return None

        def commands() -> bytes | None:
            message = follow()
            if message is None:
                return None
            p = self._prepare(smtp, *message)
            if not p.sendable:
                return None
            self._announced = (message, p)
            return smtp.commands(p.mail_from, p.lines, p.options)

        return commands

    async def _transaction(
        self, sender: str, recipients: Sequence[str], data: bytes, follow: Follow | None
    ) -> dict[str, Reply]:
        smtp = self._smtp
        assert smtp is not None
        host = self._host
        announced, self._announced = self._announced, None
        if announced is not None and smtp.ahead and announced[0] == (sender, recipients, data):
            p = announced[1]  # prepared when its commands went ahead
        else:
            p = self._prepare(smtp, sender, recipients, data)
        results, sendable = p.results, p.sendable
        if not sendable:
            return results
        try:
            t = await smtp.transaction(
                p.mail_from,
                p.lines,
                data,
                p.options,
                chunking=self._sender.chunking,
                then=self._then(smtp, follow),
            )
        except Disconnected:
            await self.close()
            raise  # nothing was recorded yet: the caller may retry on a new connection
        except LostInTransaction:
            await self.close()
            lost = f"connection to {host} lost during the transaction"
            return results | _transient(sendable, lost, BAD_CONNECTION)
        except (SmtpError, OSError) as e:
            await self.close()
            return results | _transient(sendable, f"transaction with {host} failed: {e}", BAD_CONNECTION)
        if t.mail.code // 100 != 2:
            await self._reset()
            return results | dict.fromkeys(sendable, _parsed(t.mail, host))
        accepted: list[str] = []
        for rcpt, reply in zip(sendable, t.rcpts, strict=True):
            results[rcpt] = _parsed(reply, host)
            if results[rcpt].accepted:
                accepted.append(rcpt)
        if t.data is None:
            await self._reset()
            return results
        final = _parsed(t.data, host)
        if not final.accepted and not smtp.ahead:  # with the next transaction open, no RSET
            await self._reset()
        return results | dict.fromkeys(accepted, final)

    async def _connect(self) -> None:
        """Connect to the first host that answers, in MX order; skip hosts that failed recently."""
        destinations = self._sender.destinations
        family = family_of(self._source_ip)
        errors: list[str] = []
        with _span("dns mx", lambda: {"dns.question.name": self._domain}) as span:
            hosts = await destinations.hosts(self._domain, family)
            if span is not None:
                span.set_attribute("epoxi.mx.hosts", [f"{h.host}:{h.port}" for h in hosts])
        for host in hosts:
            try:
                addresses = await destinations.addresses(host, family)
            except DnsUnavailable as e:
                errors.append(str(e))
                continue
            if not addresses:
                errors.append(f"{host.host} has no IPv{family} address")
            for address in addresses:
                key = (self._source_ip, address, host.port)
                wait = self._sender.backoff.remaining(key)
                where = f"{host.host}[{address}]:{host.port}"
                if wait is not None:
                    errors.append(f"{where} failed recently (next try in {wait:.1f}s)")
                    continue
                try:
                    self._smtp, self.tls = await self._open(host, address)
                except (SmtpError, OSError) as e:
                    self._sender.backoff.failed(key)
                    self._measures.host_backoff()
                    errors.append(f"{where}: {e}")
                    continue
                self._sender.backoff.succeeded(key)
                self._host = host.host
                self._port = host.port
                self._address = address
                self._messages = 0
                return
        raise _Unreachable("; ".join(errors) or f"no host for {self._domain}")

    async def _open(self, host: Host, address: str) -> tuple[SmtpClient, bool]:
        """A greeted session, over TLS when possible; a failed handshake is retried once in plaintext."""
        tls = self._sender.tls
        if tls.enabled:
            try:
                return await self._session(host, address, starttls=True)
            except _TlsFailed as e:
                if tls.required:
                    raise
                log.info("%s[%s]: %s; retrying without TLS", host.host, address, e)
        return await self._session(host, address, starttls=False)

    async def _session(self, host: Host, address: str, *, starttls: bool) -> tuple[SmtpClient, bool]:
        with _span(
            "smtp connect",
            lambda: {
                "server.address": host.host,
                "server.port": host.port,
                "network.peer.address": address,
                "network.local.address": self._source_ip,
            },
            SpanKind.CLIENT,
        ):
            smtp, greeting = await SmtpClient.open(
                address, host.port, source_address=(self._source_ip, 0), within=self._sender.timeout
            )
            try:
                if greeting.code != 220:
                    raise SmtpError(f"{host.host} greeted with {greeting.code} {greeting.text}")
                await _greet(smtp, self._sender.ehlo_for(self._source_ip))
            except BaseException:
                smtp.close()
                raise
        try:
            if not starttls:
                return smtp, False
            if not smtp.offers("starttls"):
                if self._sender.tls.required:
                    raise _TlsFailed(f"{host.host} does not offer STARTTLS, and TLS is required")
                return smtp, False
            with _span("smtp starttls", lambda: {"server.address": host.host}, SpanKind.CLIENT):
                try:
                    reply = await smtp.starttls(self._sender.tls.context, server_hostname=host.host)
                except (SmtpError, ssl.SSLError, OSError) as e:
                    raise _TlsFailed(f"STARTTLS with {host.host} failed: {e}") from e
                if reply.code != 220:
                    raise _TlsFailed(f"STARTTLS with {host.host} failed: {reply.code} {reply.text}")
                await _greet(smtp, self._sender.ehlo_for(self._source_ip))  # RFC 3207 4.2
            return smtp, True
        except BaseException:
            smtp.close()
            raise

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.connected:
            try:
                await self._smtp.rset()
            except (SmtpError, OSError):
                await self.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        self.tls = False
        if smtp is None or not smtp.connected:
            return
        try:
            await smtp.quit()
        except (SmtpError, OSError):
            smtp.close()


@contextmanager
def _span(
    name: str,
    attributes: Callable[[], dict[str, str | int]],
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[trace.Span | None]:
    """A child span of the current one while tracing is on (None, and nothing built, when off);
    an exception marks it failed with its message."""
    if not tracing.enabled():
        yield None
        return
    with tracing.span(
        name, kind=kind, attributes=attributes(), record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as e:
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise


async def _greet(smtp: SmtpClient, name: str) -> None:
    """EHLO (HELO when refused); a refusal of both ends the session."""
    reply = await smtp.ehlo(name)
    if reply.code != 250:
        raise SmtpError(f"HELO refused: {reply.code} {reply.text}")


def _parsed(response: Response, host: str) -> Reply:
    if len(response.text) > _CACHED_TEXT:
        return Reply.parse(response.code, response.text, host)
    return _parse(response.code, response.text, host)


# A server says the same few replies to every message (its MAIL and RCPT replies), and a Reply
# is immutable, so each distinct one is parsed once. The least recently seen go first, so
# replies that are new every time (queue IDs) do not push out the ones that repeat; a long one
# is never kept, so a server cannot fill the cache with megabytes.
_CACHED_TEXT = 200
_parse = functools.lru_cache(maxsize=1024)(Reply.parse)


def _transient(recipients: Sequence[str], text: str, enhanced: str) -> dict[str, Reply]:
    return dict.fromkeys(recipients, Reply.local(text, enhanced))
