"""Sending mail: the small ``Sender`` interface, and its real implementation, SMTP over aiosmtplib.

A ``Sender`` opens ``Connection``s for a (domain, source IP) pair. A connection sends one
message per SMTP transaction and reports a ``Reply`` per recipient; it connects lazily, binds the
source address, greets with the EHLO name of that address, upgrades with STARTTLS when offered,
and stays open for the next message until it has carried ``max_messages_per_connection``.
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

import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from epoxi.observability import tracing
from epoxi.routing import routing_key
from services.node.engine.extensions import Needs
from services.node.engine.host_backoff import HostBackoff
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.mx import Destinations, DnsUnavailable, Host, NoRoute, family_of
from services.node.engine.reply import BAD_CONNECTION, NO_ANSWER, ROUTING_FAILURE, Reply
from services.node.engine.tls import TlsPolicy

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGES_PER_CONNECTION = 100
# RFC 3463: an address the node cannot put on an SMTP command line (never sent).
BAD_SENDER = "5.1.7"
BAD_RECIPIENT = "5.1.3"


class Connection(Protocol):
    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        """Send ``data`` to ``recipients`` in one transaction; a reply for every recipient."""
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

    def __post_init__(self) -> None:
        self.ehlo_names = {str(ipaddress.ip_address(ip)): name for ip, name in self.ehlo_names.items()}

    def ehlo_for(self, source_ip: str) -> str:
        return self.ehlo_names.get(source_ip, self.ehlo_name)

    def connection(self, domain: str, source_ip: str) -> SmtpConnection:
        return SmtpConnection(self, domain, source_ip)


class _TlsFailed(aiosmtplib.SMTPException):
    """STARTTLS was refused, the handshake failed, or TLS is required and was not offered."""


class _Unreachable(Exception):
    """No host of the domain took a connection."""


class SmtpConnection:
    """One SMTP connection to a domain's destination, opened on first use and reused."""

    def __init__(self, sender: SmtpSender, domain: str, source_ip: str) -> None:
        self._sender = sender
        self._domain = domain
        self._source_ip = source_ip
        self._smtp: aiosmtplib.SMTP | None = None
        self._host = ""
        self._port = 0
        self._address = ""
        self._messages = 0
        self.tls = False
        self._measures = sender.instruments.key(routing_key(domain, source_ip))

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    @property
    def local_address(self) -> tuple[str, int] | None:
        """The (source IP, port) of the open connection, if any."""
        if self._smtp is None or self._smtp.transport is None:
            return None
        host, port, *_ = self._smtp.transport.get_extra_info("sockname")
        return str(host), int(port)

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
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
        if tracing.enabled():
            # The rest of the connection's description (peer and local address, TLS) is on its
            # `smtp connect` span: each attribute on a per-message span costs its encoding.
            trace.get_current_span().set_attributes(
                {
                    "server.address": self._host,
                    "server.port": self._port,
                    "epoxi.smtp.connection_reused": reused,
                }
            )
        try:
            results = await self._transaction(sender, recipients, data)
        except aiosmtplib.SMTPServerDisconnected as e:
            if not reused:
                return _transient(recipients, f"connection lost: {e}", BAD_CONNECTION)
            # The server dropped the idle connection we kept; try once on a fresh one.
            return await self.send(sender, recipients, data)
        if reused:
            self._measures.connection_reused()
        self._messages += 1
        if self._messages >= self._sender.max_messages_per_connection:
            await self.close()  # QUIT; the next message opens a new connection
        return results

    async def _transaction(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        smtp = self._smtp
        assert smtp is not None
        host = self._host
        needs = Needs.of(sender, recipients, data)
        offers = smtp.supports_extension
        refused: dict[str, Reply] = {}
        for rcpt in recipients:
            if (refusal := needs.refusal(rcpt, offers, host)) is not None:
                refused[rcpt] = refusal
        to = [r for r in recipients if r not in refused]
        if not to:
            return refused
        options, encoding = needs.sent_with(to, offers)
        results: dict[str, Reply] = {}
        try:
            try:
                await smtp.mail(sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPSenderRefused as e:
                await self._reset()
                return refused | dict.fromkeys(to, Reply.parse(e.code, e.message, host))
            except ValueError as e:  # aiosmtplib would not put it on the command line: nothing sent
                return refused | dict.fromkeys(to, Reply.local(f"not sent: {e}", BAD_SENDER))
            for rcpt in to:
                try:
                    reply = await smtp.rcpt(rcpt, encoding=encoding)
                    results[rcpt] = Reply.parse(reply.code, reply.message, host)
                except aiosmtplib.SMTPRecipientRefused as e:
                    results[rcpt] = Reply.parse(e.code, e.message, host)
                except ValueError as e:  # as for the sender: not sent
                    results[rcpt] = Reply.local(f"not sent: {e}", BAD_RECIPIENT)
            accepted = [r for r, res in results.items() if res.accepted]
            if not accepted:
                await self._reset()
                return refused | results
            try:
                reply = await smtp.data(data)
            except aiosmtplib.SMTPDataError as e:
                await self._reset()
                return refused | results | dict.fromkeys(accepted, Reply.parse(e.code, e.message, host))
            return refused | results | dict.fromkeys(accepted, Reply.parse(reply.code, reply.message, host))
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            if not results:
                raise  # nothing was said yet: the caller may retry on a new connection
            lost = f"connection to {host} lost during the transaction"
            return refused | _transient(to, lost, BAD_CONNECTION)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            await self.close()
            return refused | _transient(to, f"transaction with {host} failed: {e}", BAD_CONNECTION)

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
                except (aiosmtplib.SMTPException, OSError) as e:
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

    async def _open(self, host: Host, address: str) -> tuple[aiosmtplib.SMTP, bool]:
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

    async def _session(self, host: Host, address: str, *, starttls: bool) -> tuple[aiosmtplib.SMTP, bool]:
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=host.port,
            source_address=(self._source_ip, 0),
            local_hostname=self._sender.ehlo_for(self._source_ip),
            timeout=self._sender.timeout,
            start_tls=False,
        )
        try:
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
                await smtp.connect()
                await _greet(smtp)
            if not starttls:
                return smtp, False
            if not smtp.supports_extension("starttls"):
                if self._sender.tls.required:
                    raise _TlsFailed(f"{host.host} does not offer STARTTLS, and TLS is required")
                return smtp, False
            with _span("smtp starttls", lambda: {"server.address": host.host}, SpanKind.CLIENT):
                try:
                    await smtp.starttls(server_hostname=host.host, tls_context=self._sender.tls.context)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as e:
                    raise _TlsFailed(f"STARTTLS with {host.host} failed: {e}") from e
                await _greet(smtp)  # RFC 3207 4.2: forget what was said before TLS
            return smtp, True
        except BaseException:
            smtp.close()
            raise

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                await self.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        self.tls = False
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
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
    with tracing.tracer.start_as_current_span(
        name, kind=kind, attributes=attributes(), record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as e:
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()


def _transient(recipients: Sequence[str], text: str, enhanced: str) -> dict[str, Reply]:
    return dict.fromkeys(recipients, Reply.local(text, enhanced))
