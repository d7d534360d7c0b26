"""Where mail for a domain goes: route overrides, else MX records, else the domain's address (RFC 5321 5.1).

Lookups go through dnspython's async resolver and a per-node cache that keeps each answer for its
TTL (negative answers for the SOA minimum, RFC 2308), and at most ``max_entries`` answers: the
least recently used goes first, as in dnspython's ``LRUCache``. A domain that does not exist or publishes a
null MX (RFC 7505) has ``NoRoute``, a permanent failure; a server failure or timeout is
``DnsUnavailable``, a temporary one.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.SOA
import dns.resolver

SMTP_PORT = 25
MAX_TTL = 86400.0
# Answers a node's cache holds at most: (name, type) pairs, each a few hundred bytes.
CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Host:
    """A host to connect to: a name or IP as given (route overrides), or an MX name to look up."""

    host: str
    port: int = SMTP_PORT
    resolve: bool = False


class NoRoute(Exception):
    """The domain accepts no mail; ``code`` and ``enhanced`` are the reply to report."""

    def __init__(self, message: str, code: int = 550, enhanced: str = "5.1.2") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced


class DnsUnavailable(Exception):
    """A lookup failed for now (SERVFAIL, refused, timeout): try again later."""


class Kind(Enum):
    RECORDS = "records"
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True)
class Lookup:
    """An answer: the records (empty for NODATA), or NXDOMAIN."""

    kind: Kind
    records: tuple[dns.rdata.Rdata, ...] = ()


@dataclass
class Cache:
    """Answers by (name, type) until their TTL runs out; at most ``max_entries`` of them, the least
    recently used dropped first (dnspython's ``LRUCache`` semantics)."""

    clock: Callable[[], float] = time.monotonic
    max_entries: int = CACHE_ENTRIES
    _entries: OrderedDict[tuple[str, dns.rdatatype.RdataType], tuple[float, Lookup]] = field(
        default_factory=OrderedDict
    )

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries is {self.max_entries}: a cache holds at least one answer")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, rdtype: dns.rdatatype.RdataType) -> Lookup | None:
        key = (name, rdtype)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, lookup = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return lookup

    def put(self, name: str, rdtype: dns.rdatatype.RdataType, lookup: Lookup, ttl: float) -> None:
        if ttl <= 0:
            return
        key = (name, rdtype)
        self._entries[key] = (self.clock() + min(ttl, MAX_TTL), lookup)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class Resolver:
    """Cached DNS lookups for one node, shared by its pipelines."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver | None = None,
        *,
        cache: Cache | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver
        self.cache = cache if cache is not None else Cache()
        self.rng = rng if rng is not None else random.Random()

    async def lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> Lookup:
        qname = dns.name.from_text(name).to_text().lower()
        cached = self.cache.get(qname, rdtype)
        if cached is not None:
            return cached
        if self._resolver is None:
            self._resolver = dns.asyncresolver.Resolver()  # the system's configuration, read on first use
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            lookup = Lookup(Kind.NXDOMAIN)
            self.cache.put(qname, rdtype, lookup, _negative_ttl(e.kwargs.get("responses", {}).values()))
            return lookup
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as e:
            raise DnsUnavailable(f"looking up {qname} {dns.rdatatype.to_text(rdtype)}: {e}") from e
        if answer.rrset is None:
            lookup = Lookup(Kind.RECORDS)
            self.cache.put(qname, rdtype, lookup, _negative_ttl([answer.response]))
            return lookup
        lookup = Lookup(Kind.RECORDS, tuple(answer.rrset))
        self.cache.put(qname, rdtype, lookup, float(answer.rrset.ttl))
        return lookup


def _negative_ttl(responses: Iterable[dns.message.Message]) -> float:
    """RFC 2308: a negative answer lives min(SOA TTL, SOA minimum); without an SOA it is not cached."""
    for response in responses:
        for rrset in response.authority:
            for rr in rrset:
                if isinstance(rr, dns.rdtypes.ANY.SOA.SOA):
                    return float(min(rrset.ttl, rr.minimum))
    return 0.0


def resolver_for(server: str | None, timeout: float = 5.0) -> dns.asyncresolver.Resolver | None:
    """A resolver asking only ``server`` ("IP:PORT", "[IPv6]:PORT" or "IP"); None: the system's."""
    if not server:
        return None
    host, sep, port = server.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port = server, "53"  # a bare address (IPv6 has colons of its own)
    host = host.strip("[]")
    ipaddress.ip_address(host)  # the resolver talks to an address, not a name
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = int(port)
    r.lifetime = timeout
    return r


@dataclass
class Destinations:
    """Where mail for a domain goes: a route override (``*`` matches all), else MX, else A/AAAA."""

    routes: Mapping[str, Host] = field(default_factory=dict)
    resolver: Resolver = field(default_factory=Resolver)
    # The port MX hosts listen on (25; tests point it at a sink).
    port: int = SMTP_PORT

    def by_catch_all(self, domain: str) -> bool:
        """Whether ``domain``'s mail goes by the ``*`` route (it has no route of its own)."""
        return domain.lower() not in self.routes and "*" in self.routes

    async def hosts(self, domain: str, family: int = 4) -> list[Host]:
        """The hosts to try in order; ``NoRoute`` or ``DnsUnavailable`` when there are none."""
        route = self.routes.get(domain.lower()) or self.routes.get("*")
        if route is not None:
            return [route]
        found = await self.resolver.lookup(domain, dns.rdatatype.MX)
        if found.kind is Kind.NXDOMAIN:
            raise NoRoute(f"domain {domain} does not exist", 550, "5.1.2")
        records = [r for r in found.records if isinstance(r, dns.rdtypes.ANY.MX.MX)]
        if not records:
            # RFC 5321 5.1: no MX, the domain itself is the host, if it has an address.
            if not await self.addresses(Host(domain, self.port, resolve=True), family):
                raise NoRoute(f"domain {domain} has no MX and no address record", 550, "5.1.2")
            return [Host(domain, self.port, resolve=True)]
        if any(r.exchange == dns.name.root for r in records):
            raise NoRoute(f"domain {domain} accepts no mail (null MX)", 556, "5.1.10")
        # Equal preferences in random order (RFC 5321 5.1), shuffled on every use, not once per TTL.
        self.resolver.rng.shuffle(records)
        records.sort(key=lambda r: r.preference)
        return [Host(r.exchange.to_text(omit_final_dot=True), self.port, resolve=True) for r in records]

    async def addresses(self, host: Host, family: int = 4) -> list[str]:
        """IP addresses of ``host`` in ``family`` (4 or 6); a route's host is connected to as given."""
        if not host.resolve:
            return [host.host]
        rdtype = dns.rdatatype.A if family == 4 else dns.rdatatype.AAAA
        found = await self.resolver.lookup(host.host, rdtype)
        return [r.to_text() for r in found.records if r.rdtype == rdtype]


def family_of(ip: str) -> int:
    return ipaddress.ip_address(ip).version
