"""Outbound delivery settings: their flags, and the ``SmtpSender`` and ``Bouncer`` built from them.

``services.node.main`` adds these flags to the node's and builds its sender here, so the
delivery knobs live next to the code they configure.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import dns.asyncresolver

from epoxi import address
from services.node.engine.delivery import DEFAULT_MAX_MESSAGES_PER_CONNECTION, HostBackoff, SmtpSender
from services.node.engine.dsn import Bouncer, Mailer
from services.node.engine.mx import Destinations, Host, Resolver, resolver_for
from services.node.engine.tls import TlsMode, TlsPolicy


@dataclass
class DeliveryConfig:
    # DNS server as "IP:PORT"; None: the system's resolver.
    dns: str | None = None
    # Source IP -> EHLO name, for IPs whose name is not the node's ``ehlo_name``.
    ehlo_names: Mapping[str, str] = field(default_factory=dict)
    max_messages_per_connection: int = DEFAULT_MAX_MESSAGES_PER_CONNECTION
    tls: TlsMode = TlsMode.OPPORTUNISTIC
    tls_cafile: str | None = None
    # Seconds a host that refused a connection is left alone (doubling while it keeps failing).
    host_backoff: float = 60.0
    # The From of DSNs (e.g. MAILER-DAEMON@node.example); None: no DSNs.
    dsn_from: str | None = None


def build_sender(
    config: DeliveryConfig,
    routes: Mapping[str, Host],
    ehlo_name: str,
    timeout: float,
    resolver: dns.asyncresolver.Resolver | None = None,
) -> SmtpSender:
    return SmtpSender(
        Destinations(routes, Resolver(resolver or resolver_for(config.dns))),
        ehlo_name,
        timeout,
        ehlo_names=config.ehlo_names,
        max_messages_per_connection=config.max_messages_per_connection,
        tls=TlsPolicy(config.tls, config.tls_cafile),
        backoff=HostBackoff(base=config.host_backoff),
    )


def build_bouncer(config: DeliveryConfig, node: Mailer, reporting_mta: str) -> Bouncer | None:
    if not config.dsn_from:
        return None
    return Bouncer(node, config.dsn_from, reporting_mta)


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


def add_arguments(parser: argparse.ArgumentParser, duration: Callable[[str], float] = float) -> None:
    """The delivery flags; ``duration`` parses the node's durations ("60s", "2m")."""
    env = os.environ.get
    parser.add_argument(
        "--dns",
        type=parse_dns,
        default=env("EPOXI_NODE_DNS"),
        help="DNS server IP:PORT (default: the system's)",
    )
    parser.add_argument(
        "--ehlo",
        action="append",
        dest="ehlo_names",
        type=parse_ehlo,
        help="IP=NAME: the EHLO name when sending from IP (repeatable; default --ehlo-name)",
    )
    parser.add_argument(
        "--max-messages-per-connection",
        type=positive_int,
        default=env("EPOXI_NODE_MAX_MESSAGES_PER_CONNECTION", str(DEFAULT_MAX_MESSAGES_PER_CONNECTION)),
        help="QUIT and reconnect after this many messages",
    )
    parser.add_argument(
        "--tls",
        type=TlsMode,
        choices=list(TlsMode),
        default=env("EPOXI_NODE_TLS", TlsMode.OPPORTUNISTIC.value),
        help="STARTTLS: opportunistic (default; no certificate checks), required, verify (required and checked), off",
    )
    parser.add_argument(
        "--tls-cafile", default=env("EPOXI_NODE_TLS_CAFILE"), help="CA certificates for --tls verify"
    )
    parser.add_argument(
        "--host-backoff",
        type=duration,
        default=env("EPOXI_NODE_HOST_BACKOFF", "60s"),
        help="leave a host that refused a connection alone this long (doubling while it fails)",
    )
    parser.add_argument(
        "--dsn-from",
        type=parse_address,
        default=env("EPOXI_NODE_DSN_FROM"),
        help="send bounce reports (DSNs) from this address, e.g. MAILER-DAEMON@node.example",
    )


def config_from_args(args: argparse.Namespace) -> DeliveryConfig:
    return DeliveryConfig(
        dns=args.dns or None,
        ehlo_names=dict(args.ehlo_names or []),
        max_messages_per_connection=int(args.max_messages_per_connection),
        tls=TlsMode(args.tls),
        tls_cafile=args.tls_cafile or None,
        host_backoff=float(args.host_backoff),
        dsn_from=args.dsn_from or None,
    )
