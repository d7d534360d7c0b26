"""A UTF-8 email end to end over real gRPC: router, a real node and a real aiosmtpd server, with
and without SMTPUTF8. The envelope carries UTF-8 local parts and A-label domains, the header is
UTF-8 (RFC 6532); a server without SMTPUTF8 gets nothing, and the recipient bounces at once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devmesh.registry.app import RunningRegistry
from epoxi import policy_store
from epoxi.envelope import new_email
from epoxi.registry.client import Consul
from epoxi.v1 import email_pb2, node_pb2, queue_pb2
from services.node.outbound import DeliveryConfig
from services.router.main import RunningRouter
from tests.services.node.esmtp_sink import EsmtpSink
from tests.services.router.support import route, sees
from tests.support import Nodes, eventually, stored_policy

IP = "127.0.0.2"
SENDER = "jörg@xn--mnchen-3ya.de"
RECIPIENT = "björn@xn--r8jz45g.xn--zckzah"  # björn@例え.テスト


def utf8_email() -> email_pb2.Email:
    return new_email(
        "Jörg Müller <jörg@münchen.de>",
        to=["björn@例え.テスト"],
        subject="Grüße",
        text="hallo",
        delivery=email_pb2.Delivery(ip=IP),
    )


@pytest.fixture(params=[True, False], ids=["smtputf8", "no smtputf8"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[EsmtpSink]:
    s = await EsmtpSink(smtputf8=request.param).start()
    yield s
    await s.stop()


@pytest.fixture
async def node_to_server(
    registry: RunningRegistry, consul: Consul, server: EsmtpSink, tmp_path: Path
) -> AsyncIterator[Nodes]:
    await policy_store.put_policy(consul, "default", stored_policy())  # the DSN's pipeline: 20 ms batches
    nodes = Nodes(tmp_path, server.address, registry.address)
    await nodes.start(
        "a", IP, retry_base=0.05, delivery=DeliveryConfig(dsn_from="MAILER-DAEMON@a.epoxi.test")
    )
    yield nodes
    await nodes.close()


async def test_a_utf8_email_goes_with_smtputf8_or_bounces_at_once(
    router: RunningRouter, node_to_server: Nodes, server: EsmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    await sees(router, "a")
    reply = await route(router, utf8_email())
    [batch] = reply.batches
    assert batch.ok, batch.error
    [message_id] = batch.message_ids
    node = node_to_server.stub("a")
    if server.smtputf8:
        [t] = await server.wait_for(1)
        assert (t.mail_from, t.rcpt_tos, t.mail_options) == (
            SENDER,
            [RECIPIENT],
            ["BODY=8BITMIME", "SMTPUTF8"],
        )
        assert "From: Jörg Müller <jörg@xn--mnchen-3ya.de>\r\n".encode() in t.data
        assert "Subject: Grüße\r\n".encode() in t.data
        return

    async def bounced() -> queue_pb2.RecipientStatus | None:
        found = await node.GetMessage(node_pb2.GetMessageRequest(message_id=message_id), timeout=5)
        [r] = found.message.recipients
        return r if r.state == queue_pb2.DELIVERY_STATE_BOUNCED else None

    r = await eventually(bounced)
    assert (r.recipient, r.attempts, r.smtp_code, r.enhanced_code) == (RECIPIENT, 1, 0, "5.6.7")
    assert r.text == f"127.0.0.1 does not offer SMTPUTF8, which the sender {SENDER} needs"

    # The DSN to the UTF-8 sender needs SMTPUTF8 too: it bounces, and being a DSN, ends there.
    async def settled() -> node_pb2.GetQueueStatsResponse | None:
        stats = await node.GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
        return stats if stats.totals.bounced == 2 else None

    stats = await eventually(settled)
    assert (stats.totals.delivered, stats.totals.queued, stats.totals.deferred) == (0, 0, 0)
    assert server.received == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
