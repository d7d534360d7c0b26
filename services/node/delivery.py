"""Sending mail: a small ``Sender`` interface and its SMTP implementation over aiosmtplib.

A ``Sender`` opens ``Connection``s for a (domain, source IP) pair. A connection sends one
message per SMTP transaction and reports a result per recipient; it connects lazily,
binds the source address, and stays open for the next message until closed. Transport
failures never raise: they become temporary results, as RFC 5321 treats them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.MX
import dns.resolver

log = logging.getLogger(__name__)

SMTP_PORT = 25
DEFAULT_TIMEOUT = 60.0


class Status(StrEnum):
    ACCEPTED = "accepted"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Result:
    status: Status
    code: int
    text: str

    @classmethod
    def of_reply(cls, code: int, text: str) -> Result:
        if 200 <= code < 300:
            return cls(Status.ACCEPTED, code, text)
        if 500 <= code < 600:
            return cls(Status.PERMANENT, code, text)
        return cls(Status.TEMPORARY, code, text)

    @classmethod
    def transient(cls, text: str) -> Result:
        """A failure with no SMTP reply (connection refused, timeout, lost connection)."""
        return cls(Status.TEMPORARY, 0, text)


class Connection(Protocol):
    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Result]:
        """Send ``data`` to ``recipients`` in one transaction; a result for every recipient."""
        ...

    async def close(self) -> None: ...


class Sender(Protocol):
    def connection(self, domain: str, source_ip: str) -> Connection: ...


@dataclass(frozen=True)
class Host:
    host: str
    port: int = SMTP_PORT


class NoRoute(Exception):
    """The domain accepts no mail (RFC 7505 null MX) or does not exist."""


@dataclass
class Destinations:
    """Where mail for a domain goes: a route override (``*`` matches all), else MX, else A."""

    routes: Mapping[str, Host] = field(default_factory=dict)
    resolver: dns.asyncresolver.Resolver | None = None

    async def hosts(self, domain: str) -> list[Host]:
        route = self.routes.get(domain.lower()) or self.routes.get("*")
        if route is not None:
            return [route]
        resolver = self.resolver or dns.asyncresolver.get_default_resolver()
        try:
            answer = await resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as e:
            raise NoRoute(f"domain {domain} does not exist") from e
        except dns.resolver.NoAnswer:
            return [Host(domain)]  # RFC 5321 5.1: no MX, use the domain's address records
        records = [r for r in answer if isinstance(r, dns.rdtypes.ANY.MX.MX)]
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise NoRoute(f"domain {domain} accepts no mail (null MX)")
        # Equal preferences are tried in random order (RFC 5321 5.1).
        random.shuffle(records)
        records.sort(key=lambda r: r.preference)
        return [Host(r.exchange.to_text(omit_final_dot=True)) for r in records]


@dataclass
class SmtpSender:
    destinations: Destinations
    ehlo_name: str
    timeout: float = DEFAULT_TIMEOUT

    def connection(self, domain: str, source_ip: str) -> SmtpConnection:
        return SmtpConnection(self, domain, source_ip)


class SmtpConnection:
    """One SMTP connection to a domain's destination, opened on first use and reused."""

    def __init__(self, sender: SmtpSender, domain: str, source_ip: str) -> None:
        self._sender = sender
        self._domain = domain
        self._source_ip = source_ip
        self._smtp: aiosmtplib.SMTP | None = None

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

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Result]:
        reused = self.connected
        if not reused:
            try:
                await self._connect()
            except NoRoute as e:
                return dict.fromkeys(recipients, Result(Status.PERMANENT, 556, str(e)))
            except (aiosmtplib.SMTPException, OSError, dns.exception.DNSException) as e:
                return dict.fromkeys(recipients, Result.transient(f"cannot connect: {e}"))
        try:
            return await self._transaction(sender, recipients, data)
        except aiosmtplib.SMTPServerDisconnected as e:
            if not reused:
                return _transient(recipients, f"connection lost: {e}")
            # The server dropped the idle connection we kept; try once on a fresh one.
            return await self.send(sender, recipients, data)

    async def _transaction(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Result]:
        smtp = self._smtp
        assert smtp is not None
        results: dict[str, Result] = {}
        try:
            try:
                await smtp.mail(sender)
            except aiosmtplib.SMTPSenderRefused as e:
                await self._reset()
                return dict.fromkeys(recipients, Result.of_reply(e.code, e.message))
            for rcpt in recipients:
                try:
                    reply = await smtp.rcpt(rcpt)
                    results[rcpt] = Result.of_reply(reply.code, reply.message)
                except aiosmtplib.SMTPRecipientRefused as e:
                    results[rcpt] = Result.of_reply(e.code, e.message)
            accepted = [r for r, res in results.items() if res.status is Status.ACCEPTED]
            if not accepted:
                await self._reset()
                return results
            try:
                reply = await smtp.data(data)
            except aiosmtplib.SMTPDataError as e:
                await self._reset()
                return results | dict.fromkeys(accepted, Result.of_reply(e.code, e.message))
            return results | dict.fromkeys(accepted, Result.of_reply(reply.code, reply.message))
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            if not results:
                raise  # nothing was said yet: the caller may retry on a new connection
            return _transient(recipients, "connection lost during the transaction")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            await self.close()
            return _transient(recipients, f"transaction failed: {e}")

    async def _connect(self) -> None:
        hosts = await self._sender.destinations.hosts(self._domain)
        errors: list[str] = []
        for host in hosts:
            smtp = aiosmtplib.SMTP(
                hostname=host.host,
                port=host.port,
                source_address=(self._source_ip, 0),
                local_hostname=self._sender.ehlo_name,
                timeout=self._sender.timeout,
                # Opportunistic STARTTLS between MTAs, unauthenticated (RFC 7435).
                start_tls=None,
                validate_certs=False,
            )
            try:
                await smtp.connect()  # greets with EHLO (HELO if refused), then STARTTLS if offered
            except (aiosmtplib.SMTPException, OSError) as e:
                smtp.close()
                errors.append(f"{host.host}:{host.port}: {e}")
                continue
            self._smtp = smtp
            return
        raise aiosmtplib.SMTPConnectError("; ".join(errors) or f"no host for {self._domain}")

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                await self.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


def _transient(recipients: Sequence[str], text: str) -> dict[str, Result]:
    return dict.fromkeys(recipients, Result.transient(text))
