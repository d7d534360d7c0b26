"""MX resolution against a real DNS server: dnsmasq on loopback, started per test."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import random
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import dns.asyncresolver
import dns.rdatatype
import pytest

from devmesh.sink import Sink
from services.node.engine.host_backoff import HostBackoff
from services.node.engine.mx import (
    Cache,
    Destinations,
    DnsUnavailable,
    Host,
    Kind,
    Lookup,
    NoRoute,
    Resolver,
    resolver_for,
)
from services.node.engine.smtp import SmtpSender
from tests.services.node.support import SOURCE_IP
from tests.support import eventually

DATA = b"From: ann@sender.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"

# The zone every test's dnsmasq serves. dnsmasq answers for *.test only from this data:
# unknown names are NXDOMAIN; broken.test is forwarded to a server that never answers.
ZONE = [
    "--mx-host=example.test,mx-b.example.test,20",
    "--mx-host=example.test,mx-a.example.test,10",
    "--mx-host=example.test,mx-c.example.test,30",
    "--host-record=mx-a.example.test,127.0.0.5",
    "--host-record=mx-b.example.test,127.0.0.6",
    "--host-record=mx-c.example.test,127.0.0.7",
    "--mx-host=twins.test,one.twins.test,10",
    "--mx-host=twins.test,two.twins.test,10",
    "--dns-rr=nomail.test,15,000000",  # RFC 7505 null MX: preference 0, exchange "."
    "--host-record=plain.test,127.0.0.8",
    "--txt-record=noaddress.test,no mail here",
    "--server=/broken.test/127.0.0.1#9",  # discard port: the query is never answered
]
TTL = 60


class Dnsmasq:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def resolver(self, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        r = resolver_for(f"127.0.0.1:{self.port}", timeout=lifetime)
        assert r is not None
        return r

    def queries(self, name: str, rdtype: str) -> int:
        """How many queries for (name, type) dnsmasq has logged."""
        text = self.log.read_text() if self.log.exists() else ""
        return text.count(f"query[{rdtype}] {name} from")

    async def logged(self, name: str, rdtype: str, count: int) -> None:
        async def seen() -> bool:
            return self.queries(name, rdtype) >= count

        await eventually(seen, 5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def dnsmasq(tmp: Path, records: Sequence[str] = ZONE) -> AsyncIterator[Dnsmasq]:
    """A dnsmasq on 127.0.0.1:<free port> serving ``records`` with TTL 60, logging its queries."""
    exe = shutil.which("dnsmasq")
    assert exe is not None, "dnsmasq is not installed: run scripts/bootstrap (apt-get install dnsmasq-base)"
    errors: list[str] = []
    for _ in range(3):  # the free port may be taken before dnsmasq binds it: then try another
        port, log = free_port(), tmp / "dnsmasq.log"
        proc = await asyncio.create_subprocess_exec(
            exe,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--user={getpass.getuser()}",
            f"--pid-file={tmp / 'dnsmasq.pid'}",
            "--local=/test/",
            f"--local-ttl={TTL}",
            "--log-queries",
            f"--log-facility={log}",
            *records,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            server = Dnsmasq(proc, port, log)
            if await _answering(server):
                yield server
                return
            assert proc.stderr is not None
            errors.append((await proc.stderr.read()).decode())
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.communicate()
    raise AssertionError(f"dnsmasq did not start: {errors}")


async def _answering(server: Dnsmasq) -> bool:
    """Wait until ``server`` answers; False if it exited instead."""
    probe = Resolver(server.resolver(lifetime=0.2))

    async def answering() -> bool | None:
        if server.proc.returncode is not None:
            return None
        with contextlib.suppress(DnsUnavailable):
            await probe.lookup("ready.test", dns.rdatatype.A)
            return True
        return False

    async with asyncio.timeout(10):
        while True:
            ready = await answering()
            if ready is not False:
                return ready is True
            await asyncio.sleep(0.02)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    async with dnsmasq(tmp_path) as s:
        yield s


@pytest.fixture
def destinations(server: Dnsmasq) -> Destinations:
    return Destinations(resolver=Resolver(server.resolver()))


async def test_mx_hosts_come_in_preference_order(destinations: Destinations) -> None:
    assert await destinations.hosts("example.test") == [
        Host("mx-a.example.test", 25, resolve=True),
        Host("mx-b.example.test", 25, resolve=True),
        Host("mx-c.example.test", 25, resolve=True),
    ]
    [mx_a, *_] = await destinations.hosts("example.test")
    assert await destinations.addresses(mx_a) == ["127.0.0.5"]


async def test_equal_preferences_come_in_random_order_each_time(server: Dnsmasq) -> None:
    d = Destinations(resolver=Resolver(server.resolver(), rng=random.Random(7)))
    orders = {tuple(h.host for h in await d.hosts("twins.test")) for _ in range(40)}
    assert orders == {("one.twins.test", "two.twins.test"), ("two.twins.test", "one.twins.test")}


async def test_without_mx_the_domain_itself_is_the_host(destinations: Destinations) -> None:
    [host] = await destinations.hosts("plain.test")
    assert host == Host("plain.test", 25, resolve=True)
    assert await destinations.addresses(host) == ["127.0.0.8"]


async def test_no_mx_and_no_address_has_no_route(destinations: Destinations) -> None:
    with pytest.raises(NoRoute, match="no MX and no address") as e:
        await destinations.hosts("noaddress.test")
    assert (e.value.code, e.value.enhanced) == (550, "5.1.2")


async def test_a_null_mx_has_no_route(destinations: Destinations) -> None:
    with pytest.raises(NoRoute, match="null MX") as e:
        await destinations.hosts("nomail.test")
    assert (e.value.code, e.value.enhanced) == (556, "5.1.10")


async def test_a_missing_domain_has_no_route(destinations: Destinations) -> None:
    with pytest.raises(NoRoute, match="does not exist") as e:
        await destinations.hosts("missing.test")
    assert (e.value.code, e.value.enhanced) == (550, "5.1.2")


async def test_an_unanswered_or_refused_query_is_temporary(server: Dnsmasq) -> None:
    d = Destinations(resolver=Resolver(server.resolver(lifetime=0.3)))
    with pytest.raises(DnsUnavailable, match=r"broken\.test"):
        await d.hosts("broken.test")  # forwarded upstream, never answered: a timeout
    with pytest.raises(DnsUnavailable, match=r"example\.org"):
        await d.hosts("example.org")  # no upstream for it: dnsmasq refuses


async def test_answers_are_cached_for_their_ttl(server: Dnsmasq) -> None:
    now = [1000.0]
    d = Destinations(resolver=Resolver(server.resolver(), cache=Cache(clock=lambda: now[0])))
    first = await d.hosts("example.test")
    await server.logged("example.test", "MX", 1)
    now[0] += TTL - 1
    assert await d.hosts("example.test") == first
    await d.hosts("plain.test")  # dnsmasq logs in order: once this shows, so would a second MX query
    await server.logged("plain.test", "MX", 1)
    assert server.queries("example.test", "MX") == 1
    now[0] += 2  # the TTL has run out
    assert await d.hosts("example.test") == first
    await server.logged("example.test", "MX", 2)


def test_the_cache_never_holds_more_than_its_size() -> None:
    now = [0.0]
    cache = Cache(clock=lambda: now[0], max_entries=100)
    found = Lookup(Kind.RECORDS)
    for i in range(1000):
        cache.put(f"host{i}.test.", dns.rdatatype.A, found, TTL)
        assert len(cache) <= 100
    assert cache.get("host0.test.", dns.rdatatype.A) is None  # the oldest went first
    assert cache.get("host999.test.", dns.rdatatype.A) is found
    now[0] += TTL  # the TTL still holds inside the bound
    assert cache.get("host999.test.", dns.rdatatype.A) is None
    with pytest.raises(ValueError):
        Cache(max_entries=0)


async def test_the_least_recently_used_answer_leaves_a_full_cache(server: Dnsmasq) -> None:
    d = Destinations(resolver=Resolver(server.resolver(), cache=Cache(max_entries=2)))
    a, b, c = (Host(f"mx-{x}.example.test", resolve=True) for x in "abc")
    assert await d.addresses(a) == ["127.0.0.5"]
    assert await d.addresses(b) == ["127.0.0.6"]
    assert await d.addresses(a) == ["127.0.0.5"]  # a used last: b is the one to go
    assert await d.addresses(c) == ["127.0.0.7"]
    assert len(d.resolver.cache) == 2
    assert await d.addresses(a) == ["127.0.0.5"]  # still cached
    assert await d.addresses(b) == ["127.0.0.6"]  # asked again
    await server.logged("mx-b.example.test", "A", 2)
    assert server.queries("mx-a.example.test", "A") == 1


async def test_a_route_override_wins_over_dns(server: Dnsmasq) -> None:
    routes = {"example.test": Host("127.0.0.1", 2525), "*": Host("127.0.0.1", 2626)}
    d = Destinations(routes, Resolver(server.resolver()))
    assert await d.hosts("EXAMPLE.test") == [Host("127.0.0.1", 2525)]
    assert await d.hosts("other.test") == [Host("127.0.0.1", 2626)]
    assert await d.addresses(Host("127.0.0.1", 2626)) == ["127.0.0.1"]
    assert server.queries("example.test", "MX") == 0


def test_the_resolver_address_takes_a_port() -> None:
    r = resolver_for("127.0.0.1:5353")
    assert r is not None and (r.nameservers, r.port) == (["127.0.0.1"], 5353)
    r6 = resolver_for("[::1]:5353")
    assert r6 is not None and (r6.nameservers, r6.port) == (["::1"], 5353)
    r53 = resolver_for("10.0.0.1")
    assert r53 is not None and (r53.nameservers, r53.port) == (["10.0.0.1"], 53)
    assert resolver_for(None) is None
    with pytest.raises(ValueError):
        resolver_for("dns.example:53")


# Sending through DNS


def sender_via(server: Dnsmasq, port: int = 25, lifetime: float = 2.0, **kwargs: object) -> SmtpSender:
    d = Destinations(resolver=Resolver(server.resolver(lifetime)), port=port)
    return SmtpSender(d, "node.epoxi.test", timeout=5, **kwargs)  # type: ignore[arg-type]


async def test_a_domain_without_mail_bounces_at_once(server: Dnsmasq) -> None:
    sender = sender_via(server)
    for domain, code, enhanced in [("nomail.test", 556, "5.1.10"), ("missing.test", 550, "5.1.2")]:
        conn = sender.connection(domain, SOURCE_IP)
        result = (await conn.send("ann@sender.test", [f"a@{domain}"], DATA))[f"a@{domain}"]
        await conn.close()
        assert (result.permanent, result.code, result.enhanced) == (True, code, enhanced)


async def test_a_dns_failure_defers(server: Dnsmasq) -> None:
    conn = sender_via(server, lifetime=0.3).connection("broken.test", SOURCE_IP)
    result = (await conn.send("ann@sender.test", ["a@broken.test"], DATA))["a@broken.test"]
    await conn.close()
    assert (result.temporary, result.code, result.enhanced) == (True, 0, "4.4.3")


class HangUp:
    """A server at an address that accepts connections and closes them at once, counting them."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def mx_sink() -> AsyncIterator[Sink]:
    """The sink at mx-b.example.test (127.0.0.6)."""
    s = await Sink(host="127.0.0.6").start()
    yield s
    await s.stop()


async def test_mail_falls_back_to_the_next_mx_and_leaves_the_failed_one_alone(
    server: Dnsmasq, mx_sink: Sink
) -> None:
    hang_up = HangUp()
    # mx-a (127.0.0.5) hangs up on the port where mx-b (127.0.0.6) has the sink.
    dead = await asyncio.start_server(hang_up.handle, "127.0.0.5", mx_sink.port)
    try:
        sender = sender_via(server, port=mx_sink.port, max_messages_per_connection=1)
        conn = sender.connection("example.test", SOURCE_IP)
        for rcpt in ("a@example.test", "b@example.test", "c@example.test"):
            result = (await conn.send("ann@sender.test", [rcpt], DATA))[rcpt]
            assert (result.accepted, result.host) == (True, "mx-b.example.test")
        await conn.close()
    finally:
        dead.close()
        await dead.wait_closed()
    assert mx_sink.recipients() == ["a@example.test", "b@example.test", "c@example.test"]
    assert mx_sink.sessions == 3  # one message per connection
    assert hang_up.accepted == 1  # tried once, then left alone while it backs off


async def test_when_every_host_failed_recently_nothing_is_dialled(server: Dnsmasq) -> None:
    hang_up = HangUp()
    port = free_port()
    servers = [
        await asyncio.start_server(hang_up.handle, ip, port) for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7")
    ]
    try:
        sender = sender_via(server, port=port, backoff=HostBackoff(base=3600))
        conn = sender.connection("example.test", SOURCE_IP)
        first = (await conn.send("ann@sender.test", ["a@example.test"], DATA))["a@example.test"]
        again = (await conn.send("ann@sender.test", ["a@example.test"], DATA))["a@example.test"]
        await conn.close()
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()
    assert (first.temporary, first.code, first.enhanced) == (True, 0, "4.4.1")
    assert (again.temporary, again.code, again.enhanced) == (True, 0, "4.4.1")
    assert "failed recently" in again.text
    assert hang_up.accepted == 3  # each MX once
