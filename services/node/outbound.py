"""Outbound delivery settings, and the ``SmtpSender`` and ``Bouncer`` built from them.

The settings are a group of the node's (``services.node.main.NodeConfig.delivery``), declared
here next to the code they configure.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

import dns.asyncresolver

from epoxi import address, durations
from epoxi.settings import setting
from services.node.engine.dsn import Bouncer
from services.node.engine.host_backoff import HostBackoff
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.mx import Destinations, Host, Resolver, resolver_for
from services.node.engine.smtp import DEFAULT_MAX_MESSAGES_PER_CONNECTION, SmtpSender
from services.node.engine.spool import Spool
from services.node.engine.tls import TlsMode, TlsPolicy


def parse_ehlo(text: str) -> tuple[str, str]:
    ip, sep, name = text.partition("=")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ehlo {text!r}: {ip!r} is not an IP address") from None
    if not sep or address.address_problem(f"postmaster@{name}") is not None:
        raise argparse.ArgumentTypeError(f"--ehlo {text!r} is not IP=HOSTNAME")
    return ip, name


def parse_dns(text: str) -> str:
    try:
        resolver_for(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dns {text!r} is not IP:PORT") from None
    return text


def parse_address(text: str) -> str:
    if address.address_problem(text) is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an email address")
    return text


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


@dataclass(frozen=True)
class DeliveryConfig:
    dns: str | None = setting(
        None, parse=parse_dns, metavar="IP:PORT", shown="the system's", help="DNS server"
    )
    ehlo_names: Mapping[str, str] = setting(
        default_factory=dict,
        flag="--ehlo",
        parse=parse_ehlo,
        repeated=True,
        collect=dict,
        metavar="IP=NAME",
        help="the EHLO name when sending from IP, where it is not --ehlo-name",
    )
    max_messages_per_connection: int = setting(
        DEFAULT_MAX_MESSAGES_PER_CONNECTION,
        parse=positive_int,
        help="QUIT and reconnect after this many messages",
    )
    tls: TlsMode = setting(
        TlsMode.OPPORTUNISTIC,
        parse=TlsMode,
        help="STARTTLS: opportunistic (no certificate checks), required, verify (required and checked), off",
    )
    tls_cafile: str | None = setting(None, help="CA certificates for --tls verify")
    host_backoff: float = setting(
        60.0,
        parse=durations.seconds,
        shown="60s",
        help="leave a host that refused a connection alone this long (doubling while it fails)",
    )
    dsn_from: str | None = setting(
        None,
        parse=parse_address,
        shown="none: no DSNs",
        help="send bounce reports (DSNs) from this address, e.g. MAILER-DAEMON@node.example",
    )


def build_sender(
    config: DeliveryConfig,
    routes: Mapping[str, Host],
    ehlo_name: str,
    timeout: float,
    resolver: dns.asyncresolver.Resolver | None = None,
    instruments: Instruments = NO_INSTRUMENTS,
) -> SmtpSender:
    return SmtpSender(
        Destinations(routes, Resolver(resolver or resolver_for(config.dns))),
        ehlo_name,
        timeout,
        ehlo_names=config.ehlo_names,
        max_messages_per_connection=config.max_messages_per_connection,
        tls=TlsPolicy(config.tls, config.tls_cafile),
        backoff=HostBackoff(base=config.host_backoff),
        instruments=instruments,
    )


def build_bouncer(
    config: DeliveryConfig,
    spool: Spool,
    spooled: asyncio.Queue[str],
    reporting_mta: str,
    instruments: Instruments = NO_INSTRUMENTS,
) -> Bouncer | None:
    """The bouncer that spools DSNs into ``spool`` and tells ``spooled``; None without ``dsn_from``."""
    if not config.dsn_from:
        return None
    return Bouncer(spool, spooled, config.dsn_from, reporting_mta, instruments)
