from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import cast

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from epoxi.sink import Sink
from services.node.delivery import Destinations, Host, NoRoute, Result, SmtpSender, Status
from tests.node.conftest import SOURCE_IP

DATA = b"From: ann@sender.test\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def sender_to(sink: Sink) -> SmtpSender:
    return SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), ehlo_name="node.epoxi.test", timeout=5)


async def test_mail_leaves_from_the_routing_keys_source_ip(sink: Sink) -> None:
    conn = sender_to(sink).connection("example.com", SOURCE_IP)
    try:
        results = await conn.send("ann@sender.test", ["bob@example.com"], DATA)
        assert conn.local_address is not None and conn.local_address[0] == SOURCE_IP
    finally:
        await conn.close()
    assert results["bob@example.com"].status is Status.ACCEPTED
    assert results["bob@example.com"].code == 250
    [received] = sink.received
    assert received.peer == SOURCE_IP
    assert (received.mail_from, received.rcpt_tos) == ("ann@sender.test", ["bob@example.com"])
    assert received.message()["Subject"] == "hi"


async def test_one_connection_carries_several_messages(sink: Sink) -> None:
    conn = sender_to(sink).connection("example.com", SOURCE_IP)
    try:
        await conn.send("ann@sender.test", ["a@example.com"], DATA)
        first = conn.local_address
        await conn.send("ann@sender.test", ["b@example.com"], DATA)
        assert conn.local_address == first is not None
    finally:
        await conn.close()
    assert sink.recipients() == ["a@example.com", "b@example.com"]


async def test_each_recipient_gets_its_own_result(sink: Sink) -> None:
    sink.replies = {"later@example.com": "451 4.3.0 try later", "gone@example.com": "550 5.1.1 no such user"}
    conn = sender_to(sink).connection("example.com", SOURCE_IP)
    try:
        results = await conn.send(
            "ann@sender.test", ["ok@example.com", "later@example.com", "gone@example.com"], DATA
        )
    finally:
        await conn.close()
    assert results["ok@example.com"].status is Status.ACCEPTED
    assert results["later@example.com"] == Result(Status.TEMPORARY, 451, "4.3.0 try later")
    assert results["gone@example.com"] == Result(Status.PERMANENT, 550, "5.1.1 no such user")
    assert sink.recipients() == ["ok@example.com"]


async def test_a_refusing_server_leaves_the_connection_usable(sink: Sink) -> None:
    sink.replies = {"gone@example.com": "550 5.1.1 no such user"}
    conn = sender_to(sink).connection("example.com", SOURCE_IP)
    try:
        refused = await conn.send("ann@sender.test", ["gone@example.com"], DATA)
        accepted = await conn.send("ann@sender.test", ["ok@example.com"], DATA)
    finally:
        await conn.close()
    assert refused["gone@example.com"].status is Status.PERMANENT
    assert accepted["ok@example.com"].status is Status.ACCEPTED
    assert sink.recipients() == ["ok@example.com"]


async def test_a_connection_failure_is_temporary() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens once it is closed
    sender = SmtpSender(Destinations({"*": Host("127.0.0.1", closed_port)}), "node.epoxi.test", timeout=5)
    conn = sender.connection("example.com", SOURCE_IP)
    results = await conn.send("ann@sender.test", ["a@example.com", "b@example.com"], DATA)
    await conn.close()
    assert {r.status for r in results.values()} == {Status.TEMPORARY}
    assert "cannot connect" in results["a@example.com"].text


# DNS: a real resolver talking to a tiny UDP name server.

ZONE: dict[tuple[str, str], list[str]] = {
    ("example.test.", "MX"): ["20 mx-b.example.test.", "10 mx-a.example.test.", "30 mx-c.example.test."],
    ("nomail.test.", "MX"): ["0 ."],
    ("plain.test.", "A"): ["127.0.0.1"],
}


class _NameServer(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        q = query.question[0]
        name, rdtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
        if not any(n == name for n, _ in ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rdtype) in ZONE:
            response.answer.append(
                dns.rrset.from_text(name, 60, dns.rdataclass.IN, rdtype, *ZONE[name, rdtype])
            )
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def resolver() -> AsyncIterator[dns.asyncresolver.Resolver]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_NameServer, local_addr=("127.0.0.1", 0))
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = transport.get_extra_info("sockname")[1]
    r.lifetime = 5
    yield r
    transport.close()


async def test_mx_hosts_are_tried_in_preference_order(resolver: dns.asyncresolver.Resolver) -> None:
    hosts = await Destinations(resolver=resolver).hosts("example.test")
    assert hosts == [
        Host("mx-a.example.test", 25),
        Host("mx-b.example.test", 25),
        Host("mx-c.example.test", 25),
    ]


async def test_without_mx_the_domain_itself_is_the_host(resolver: dns.asyncresolver.Resolver) -> None:
    assert await Destinations(resolver=resolver).hosts("plain.test") == [Host("plain.test", 25)]


async def test_null_mx_and_missing_domains_have_no_route(resolver: dns.asyncresolver.Resolver) -> None:
    with pytest.raises(NoRoute, match="null MX"):
        await Destinations(resolver=resolver).hosts("nomail.test")
    with pytest.raises(NoRoute, match="does not exist"):
        await Destinations(resolver=resolver).hosts("missing.test")


async def test_a_route_override_wins_over_dns(resolver: dns.asyncresolver.Resolver) -> None:
    routes = {"example.test": Host("127.0.0.1", 2525), "*": Host("127.0.0.1", 2626)}
    d = Destinations(routes, resolver)
    assert await d.hosts("EXAMPLE.test") == [Host("127.0.0.1", 2525)]
    assert await d.hosts("other.test") == [Host("127.0.0.1", 2626)]
    assert await Destinations({}, resolver).hosts("example.test") != [Host("127.0.0.1", 2525)]


async def test_a_domain_with_no_mail_bounces_at_once(resolver: dns.asyncresolver.Resolver) -> None:
    conn = SmtpSender(Destinations(resolver=resolver), "node.epoxi.test").connection("nomail.test", SOURCE_IP)
    results = await conn.send("ann@sender.test", ["a@nomail.test"], DATA)
    await conn.close()
    assert results["a@nomail.test"].status is Status.PERMANENT
