"""Routing keys: one per (recipient domain, source IP), written as the seed writes them.

``routing_key("gmail.com", "192.168.1.1") == "gmail.com_192_168_1_1"``

The domain is lower-case, an IDN by its A-label (``epoxi.address.a_label``): ``bücher.de`` and
``xn--bcher-kva.de`` share ``xn--bcher-kva.de_127_0_0_2``.
"""

from __future__ import annotations

import ipaddress
import re

from epoxi.address import a_label, address_problem
from epoxi.excerpt import shown

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Dotted-quad IPv4 without leading zeros: what ipaddress.ip_address accepts as IPv4.
_PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")


def routing_key(domain: str, ip: str) -> str:
    key_domain = domain.lower() if domain.isascii() else _idn_key_domain(domain)
    return f"{key_domain}_{ip.replace('.', '_').replace(':', '_')}"


def _idn_key_domain(domain: str) -> str:
    try:
        return a_label(domain)
    except UnicodeError:
        return domain.lower()  # not a domain target_problems accepts; the key names it as given


def split_routing_key(key: str) -> tuple[str, str]:
    """``"gmail.com_192_168_1_1"`` → ``("gmail.com", "192.168.1.1")``; ValueError when malformed.

    Mail domains are host names, which have no underscore, so the first one ends the domain.
    """
    domain, _, rest = key.partition("_")
    parts = rest.split("_")
    ip = ".".join(parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else rest.replace("_", ":")
    if not domain or "." not in domain or not is_ip(ip):
        raise ValueError(f"routing key {shown(key)} is not <domain>_<source ip>, e.g. gmail.com_192_168_1_1")
    try:
        return a_label(domain), str(ipaddress.ip_address(ip))
    except UnicodeError:
        raise ValueError(f"routing key {shown(key)} names an invalid internationalised domain") from None


def is_ip(value: str) -> bool:
    if _PLAIN_IPV4.match(value):
        return True  # the common case, without ipaddress's objects
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def target_problems(domain: str, source_ip: str) -> list[str]:
    """Why (``domain``, ``source_ip``) cannot name a pipeline; empty when it can."""
    problems = []
    if not domain or address_problem(f"postmaster@{domain}") is not None:
        problems.append(f"domain {shown(domain)} is not a valid domain name")
    if not is_ip(source_ip):
        problems.append(f"source_ip {shown(source_ip)} is not an IP address")
    return problems
