"""Routing keys: one per (recipient domain, source IP), written as the seed writes them.

``routing_key("gmail.com", "192.168.1.1") == "gmail.com_192_168_1_1"``
"""

from __future__ import annotations

import ipaddress
import re

from epoxi.address import address_problem

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Dotted-quad IPv4 without leading zeros: what ipaddress.ip_address accepts as IPv4.
_PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")


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
        problems.append(f"domain {domain!r} is not a valid domain name")
    if not is_ip(source_ip):
        problems.append(f"source_ip {source_ip!r} is not an IP address")
    return problems
