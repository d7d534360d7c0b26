"""Routing keys: one per (recipient domain, source IP), written as the seed writes them.

``routing_key("gmail.com", "192.168.1.1") == "gmail.com_192_168_1_1"``
"""

from __future__ import annotations

import ipaddress

from epoxi.v1 import email_pb2


def routing_key(domain: str, ip: str) -> str:
    return f"{domain.lower()}_{ip.replace('.', '_').replace(':', '_')}"


def split_routing_key(key: str) -> tuple[str, str]:
    """``"gmail.com_192_168_1_1"`` → ``("gmail.com", "192.168.1.1")``; ValueError when malformed.

    Mail domains are host names, which have no underscore, so the first one ends the domain.
    """
    domain, _, rest = key.partition("_")
    parts = rest.split("_")
    ip = ".".join(parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else rest.replace("_", ":")
    if not domain or "." not in domain or not is_ip(ip):
        raise ValueError(f"routing key {key!r} is not <domain>_<source ip>, e.g. gmail.com_192_168_1_1")
    return domain.lower(), str(ipaddress.ip_address(ip))


def domain_of(address: str) -> str:
    """The lower-cased domain of an addr-spec or ``Name <addr-spec>`` mailbox."""
    return address.rsplit("@", 1)[-1].rstrip(">").strip().lower()


def recipients(email: email_pb2.Email) -> list[str]:
    return [*email.to, *email.cc, *email.bcc]


def recipients_in(email: email_pb2.Email, domain: str) -> list[str]:
    return [r for r in recipients(email) if domain_of(r) == domain]


def domains(email: email_pb2.Email) -> list[str]:
    """Recipient domains of ``email`` in first-seen order."""
    return list(dict.fromkeys(domain_of(r) for r in recipients(email)))


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
