"""Routing keys: one per (recipient domain, source IP), written as the seed writes them.

``routing_key("gmail.com", "192.168.1.1") == "gmail.com_192_168_1_1"``
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from epoxi.v1 import email_pb2


def routing_key(domain: str, ip: str) -> str:
    return f"{domain.lower()}_{ip.replace('.', '_').replace(':', '_')}"


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


def group_by_domain(emails: Iterable[email_pb2.Email], ip_of: dict[int, str]) -> dict[str, list[int]]:
    """Map each routing key to the indexes of the emails with recipients under it.

    ``ip_of`` gives the source IP chosen for each email index; an email with recipients in
    two domains lands under two keys.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, email in enumerate(emails):
        for domain in domains(email):
            groups[routing_key(domain, ip_of[i])].append(i)
    return dict(groups)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
