"""Fuzzing RouteEmails: Emails and RouteEmailsRequests from Hypothesis, adversarial and valid,
sent over real gRPC to a real router, which routes to a real node delivering to a real aiosmtpd
server (SMTPUTF8 and 8BITMIME offered), all registered in the development registry.

Every reply is OK or INVALID_ARGUMENT. An INVALID_ARGUMENT spools nothing (the node's queue
counters do not move) and fits in grpc-message; an OK reply has no batch refused by the node as
invalid (validation is the contract: what the router accepts, the node renders) and none left
UNKNOWN, and its mail is delivered (the server takes every recipient, so a bounce is the node's
doing). No service logs a traceback. The services run in this process, started once for the
module, so their logs are records of this process's ``logging``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import RegistryConfig
from epoxi import policy_store
from epoxi.envelope import new_email
from epoxi.registry.client import connect
from epoxi.runtime.channels import channel
from epoxi.runtime.status import MAX_MESSAGE_BYTES, encoded_size
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, queue_pb2, router_pb2, router_pb2_grpc
from services.node.main import NodeConfig, RunningNode, start_node
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.services.node.esmtp_sink import EsmtpSink
from tests.services.router.support import sees
from tests.support import CHECK_INTERVAL, eventually, stored_policy

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")
NODE_IP = "127.0.0.2"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

# Strategies. Each field is mostly valid, so that most emails get through and exercise the
# node, and otherwise adversarial; shrinking goes towards the valid values.


def mostly(valid: st.SearchStrategy[T], adversarial: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` four times in five."""
    return st.integers(0, 4).flatmap(lambda n: valid if n else adversarial)


ATOMS = [
    *("", " ", "\t", "\r", "\n", "\r\n", "\x00", "\x7f", "\x1b", "<>", "<", ">", "@", '"', "\\", ",", ";"),
    *(":", ".", "..", "-", "=?utf-8?q?x?=", "ö", "ß", "日本", "😀", "\u2028", "\ufeff", "\u00a0", "\u200b"),
    *("Content-Type: x", "a", "Bob", "x" * 80, "y" * 1000),
]
HUGE = st.sampled_from(["h" * 70_000, "ü" * 30_000, "a@" + "b" * 70_000])


def junk(atoms: int = 5) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(ATOMS) | st.text(max_size=12), max_size=atoms).map("".join)


GOOD_LOCALS = ["ann", "a.b", "a+tag", "o'neil", "jörg", "Ärger", "用户", "Δοκιμή"]
BAD_LOCALS = [
    *('"a b"', '"a\\"b"', "", ".a", "a.", "a..b", "a" * 64, "a" * 65, "a b", "a\x00", "ö" * 33),
    "a\u200b",
]
GOOD_DOMAINS = ["example.com", "EXAMPLE.com", "example.org", "xn--mnchen-3ya.de", "münchen.de", "例え.テスト"]
BAD_DOMAINS = [
    *("localhost", "a", "-a.com", "a-.com", "[127.0.0.1]", "l" * 64 + ".com", "l" * 63 + ".com"),
    *("example.com.", "exa mple.com", "xn--zz.com", "xn--a.com", "ex_ample.com", "", "ß.de"),
    *("xn--mnchen-3ya.xn--de-", "\uff11\uff12\uff13.com", "a.b.c.d.e.f.g"),  # fullwidth digits
]
GOOD_NAMES = ["Ann", "Ann Lee", '"Lee, Ann"', "Jörg Müller", "山田"]
BAD_NAMES = ["=?utf-8?q?J=C3=B6rg?=", "a<b", "", '"', "Bob (x)", "a,b", "a\x00", "x" * 100]
GOOD_TEXT = [
    *("", "hi", "Grüße", "日本語の件名", "a  b", "x" * 200, " ".join(["word"] * 40), "=?utf-8?q?x?="),
    *("line\nline", ".\n.\n", "From here\n"),
]
GOOD_LINES = [t for t in GOOD_TEXT if "\n" not in t]
HEADER_NAMES = ["X-Tag", "List-Unsubscribe", "Sender", "X-Mailer", "Keywords"]
BAD_HEADER_NAMES = [
    *("Content-Type", "content-transfer-encoding", "Resent-From", "Received", "Return-Path"),
    *("MIME-Version", "Bcc", "X-Ü", "X Tag", "X:Tag", "", "Message-ID", "Date", "From"),
]
CONTENT_TYPES = ["", "text/plain", "application/pdf", "image/png", "application/octet-stream", "Text/HTML"]
BAD_CONTENT_TYPES = [
    *("text/plain; charset=utf-8", "multipart/mixed", "multipart/alternative", "message/rfc822"),
    *("message/partial", "image/", "/png", "x", "text/plain\r\nX: y", "application/ü", "a/b/c"),
]
FILENAMES = ["a.txt", "report.pdf", "ü.txt", "日本.txt", "x" * 300, "=?utf-8?q?x?=.txt", "a b.txt", 'a"b.txt']
BAD_FILENAMES = ["../../etc/passwd", "a\x00b", " ", "", "a\r\nb.txt", "/", "C:\\x.exe", "..", "\u202egnp.exe"]
IPS = [NODE_IP, ""]  # "": the router picks one from the pool
BAD_IPS = [
    *("127.0.0.9", "::1", "999.1.1.1", " 127.0.0.2", "127.0.0.2 ", "0x7f.0.0.1", "127.1"),
    *("fe80::1%eth0", "::ffff:127.0.0.2", "127.0.0.02"),
]
MESSAGE_IDS = ["", "<a@b.c>", "<x.y@example.com>"]
BAD_MESSAGE_IDS = [
    *("<>", "<a@[1.2.3.4]>", "a@b", "<a b@c>", "<ö@x.de>", "<a@b.c> <d@e.f>", "<" + "m" * 990 + "@x>"),
    "<a@b.c>\r\n",
]
POOLS = ["", "default", "nope"]


def addresses(valid_only: bool = False) -> st.SearchStrategy[str]:
    local, domain = st.sampled_from(GOOD_LOCALS), st.sampled_from(GOOD_DOMAINS)
    if not valid_only:
        local = mostly(local, st.sampled_from(BAD_LOCALS) | junk(2))
        domain = mostly(domain, st.sampled_from(BAD_DOMAINS) | junk(2))
    return st.builds(lambda lp, d: f"{lp}@{d}", local, domain)


def mailboxes(valid_only: bool = False) -> st.SearchStrategy[str]:
    names = st.sampled_from(GOOD_NAMES)
    if not valid_only:
        names = mostly(names, st.sampled_from(BAD_NAMES) | junk(2))
    valid = addresses(valid_only) | st.builds(lambda n, a: f"{n} <{a}>", names, addresses(valid_only))
    if valid_only:
        return valid
    return mostly(valid, addresses().map(lambda a: f"<{a}>") | junk(3) | HUGE)


def choose(good: list[str], bad: list[str], valid_only: bool) -> st.SearchStrategy[str]:
    if valid_only:
        return st.sampled_from(good)
    return mostly(st.sampled_from(good), st.sampled_from(bad) | junk(2))


def texts(valid_only: bool = False) -> st.SearchStrategy[str]:
    valid = st.sampled_from(GOOD_TEXT) | st.text(max_size=30)
    return valid if valid_only else mostly(valid, junk() | HUGE)


def lines(valid_only: bool = False) -> st.SearchStrategy[str]:
    valid = st.sampled_from(GOOD_LINES)
    return valid if valid_only else mostly(valid, junk() | HUGE)


def headers(valid_only: bool = False) -> st.SearchStrategy[email_pb2.Header]:
    values = lines(valid_only) if valid_only else lines() | mailboxes() | st.sampled_from(["multipart/mixed"])
    return st.builds(
        lambda n, v: email_pb2.Header(name=n, value=v),
        choose(HEADER_NAMES, BAD_HEADER_NAMES, valid_only),
        values,
    )


def attachments(valid_only: bool = False) -> st.SearchStrategy[email_pb2.Attachment]:
    content = st.binary(max_size=40) | st.sampled_from([b"", b"\xff\xfe", b"From x\r\n.\r\n", b"%PDF"])
    return st.builds(
        lambda f, c, b: email_pb2.Attachment(filename=f, content_type=c, content=b),
        choose(FILENAMES, BAD_FILENAMES, valid_only),
        choose(CONTENT_TYPES, BAD_CONTENT_TYPES, valid_only),
        content,
    )


def some_emails(valid_only: bool) -> st.SearchStrategy[email_pb2.Email]:
    to = st.lists(mailboxes(valid_only), min_size=1, max_size=3)
    if not valid_only:
        to = mostly(to, st.lists(mailboxes(), max_size=3))
    return st.builds(
        lambda sender, to, cc, bcc, reply_to, subject, text, html, mid, hs, atts, ip, pool: new_email(
            sender,
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            subject=subject,
            text=text,
            html=html,
            message_id=mid,
            headers=hs,
            attachments=atts,
            delivery=email_pb2.Delivery(ip=ip, ip_pool=pool),
        ),
        mailboxes(valid_only),
        to,
        st.lists(mailboxes(valid_only), max_size=2),
        st.lists(mailboxes(valid_only), max_size=1),
        st.just("") | mailboxes(valid_only),
        lines(valid_only),
        texts(valid_only),
        st.just("") | texts(valid_only),
        choose(MESSAGE_IDS, BAD_MESSAGE_IDS, valid_only),
        st.lists(headers(valid_only), max_size=2),
        st.lists(attachments(valid_only), max_size=2),
        choose(IPS, BAD_IPS, valid_only),
        st.sampled_from(POOLS) if not valid_only else st.just(""),
    )


def emails() -> st.SearchStrategy[email_pb2.Email]:
    """Two in three of the shapes validation accepts (UTF-8 and IDN addresses, non-ASCII and
    folded text, extra headers, attachments); the rest adversarial anywhere."""
    return st.integers(0, 2).flatmap(lambda n: some_emails(valid_only=n > 0))


def requests() -> st.SearchStrategy[router_pb2.RouteEmailsRequest]:
    return st.builds(
        lambda es, pool: router_pb2.RouteEmailsRequest(emails=es, ip_pool=pool),
        st.lists(emails(), max_size=4),
        mostly(st.sampled_from(POOLS), junk(1)),
    )


# The mesh, once for the module.


class Tracebacks(logging.Handler):
    """Keeps every record that carries a traceback, or its text."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)

    def taken(self) -> list[str]:
        out = [self.format(r) for r in self.records]
        self.records.clear()
        return out


@dataclass
class Mesh:
    router: router_pb2_grpc.RouterServiceStub
    node: node_pb2_grpc.NodeServiceStub
    tracebacks: Tracebacks


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[Tracebacks]:
    handler = Tracebacks()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, tracebacks: Tracebacks) -> AsyncIterator[Mesh]:
    registry: RunningRegistry = await serve("127.0.0.1", 0, RegistryConfig(check_update_interval=0))
    sink = await EsmtpSink(smtputf8=True).start()
    consul = connect(registry.address)
    node: RunningNode | None = None
    router: RunningRouter | None = None
    try:
        await policy_store.put_policy(consul, "default", stored_policy())  # 20 ms batches
        config = NodeConfig(
            id="n1",
            egress_ips=[NODE_IP],
            spool=tmp_path_factory.mktemp("fuzz") / "spool.db",
            routes={"*": sink.address},
            ehlo_name="n1.epoxi.test",
            consul=registry.address,
            check_interval=CHECK_INTERVAL,
            retry_base=0.01,
            stop_grace=1.0,
        )
        node = await start_node(config)
        router = await start_router(
            RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0)
        )
        await sees(router, "n1")
        async with channel(router.address) as to_router, channel(node.address) as to_node:
            yield Mesh(
                router_pb2_grpc.RouterServiceStub(to_router),
                node_pb2_grpc.NodeServiceStub(to_node),
                tracebacks,
            )
    finally:
        if router is not None:
            await router.close()
        if node is not None:
            await node.close()
        await consul.close()
        await sink.stop()
        await registry.close()


async def settled(mesh: Mesh) -> node_pb2.GetQueueStatsResponse:
    """The node's queue counters once nothing is left to send."""

    async def done() -> node_pb2.GetQueueStatsResponse | None:
        stats: node_pb2.GetQueueStatsResponse = await mesh.node.GetQueueStats(
            node_pb2.GetQueueStatsRequest(), timeout=5
        )
        t = stats.totals
        return stats if t.queued + t.in_flight + t.deferred == 0 else None

    return await eventually(done)


def spooled(stats: node_pb2.GetQueueStatsResponse) -> int:
    """Every delivery the spool holds, in any state."""
    t = stats.totals
    return t.queued + t.in_flight + t.deferred + t.delivered + t.bounced


async def bounces(mesh: Mesh) -> list[str]:
    """Each bounced recipient, with its reply."""
    listed = await mesh.node.ListMessages(
        node_pb2.ListMessagesRequest(state=queue_pb2.DELIVERY_STATE_BOUNCED, page_size=1000), timeout=5
    )
    return [
        f"{r.recipient}: {r.enhanced_code} {r.text}"
        for m in listed.messages
        for r in m.recipients
        if r.state == queue_pb2.DELIVERY_STATE_BOUNCED
    ]


async def check_reply(mesh: Mesh, request: router_pb2.RouteEmailsRequest) -> None:
    before = await settled(mesh)
    try:
        reply = await mesh.router.RouteEmails(request, timeout=30)
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details)
        assert details and encoded_size(details) <= MAX_MESSAGE_BYTES
        assert spooled(await settled(mesh)) == spooled(before), "an INVALID_ARGUMENT spooled something"
        event("INVALID_ARGUMENT")
    else:
        assert reply.total_emails == len(request.emails)
        for b in reply.batches:
            assert b.status != router_pb2.BATCH_STATUS_UNKNOWN, b
            assert "INVALID_ARGUMENT" not in b.error, b  # the router accepted what the node refused
            if b.status == router_pb2.BATCH_STATUS_ACCEPTED:
                assert len(b.message_ids) == b.email_count, b
        # The server offers SMTPUTF8 and takes every recipient: what was accepted is delivered.
        if (await settled(mesh)).totals.bounced != before.totals.bounced:
            raise AssertionError(f"accepted mail bounced: {await bounces(mesh)}")
        event(f"OK, {reply.successful_batches} of {reply.total_batches} batches accepted")
    assert mesh.tracebacks.taken() == []


@FUZZ
@given(email=emails())
async def test_any_email_is_routed_or_refused_whole(mesh: Mesh, email: email_pb2.Email) -> None:
    await check_reply(mesh, router_pb2.RouteEmailsRequest(emails=[email]))


@FUZZ
@given(request=requests())
async def test_any_request_is_routed_or_refused_whole(
    mesh: Mesh, request: router_pb2.RouteEmailsRequest
) -> None:
    await check_reply(mesh, request)
