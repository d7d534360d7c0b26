"""A busy lane sends each message's envelope with the previous message's content (RFC 2920 3.1),
against aiosmtpd announcing PIPELINING: every message still arrives once, and a rule that the
content's reply sets off holds the message already announced."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from epoxi.routing import routing_key
from epoxi.shaping import BOUNCE, Rule, ShapingTable
from services.node.engine.mx import Destinations
from services.node.engine.pipeline import Pipeline
from services.node.engine.retry import Retry
from services.node.engine.shaping import Shaper
from services.node.engine.smtp import SmtpSender
from services.node.engine.spool import Spool, State
from tests.services.node.engine.real_servers import AiosmtpdServer
from tests.services.node.support import SOURCE_IP, fast_policy, messages
from tests.support import eventually

DOMAIN = "example.com"
KEY = routing_key(DOMAIN, SOURCE_IP)
BANNED = f"550 5.7.606 Access denied, banned sending IP [{SOURCE_IP}]"


async def _server(**kwargs: object) -> AiosmtpdServer:
    return await AiosmtpdServer(pipelining=True, **kwargs).start()  # type: ignore[arg-type]


@pytest.fixture
async def server() -> AsyncIterator[AiosmtpdServer]:
    s = await _server()
    yield s
    await s.stop()


def _pipeline(spool: Spool, server: AiosmtpdServer, shaper: Shaper | None = None) -> Pipeline:
    sender = SmtpSender(Destinations({DOMAIN: server.route}), "node.epoxi.test", timeout=5, chunking=False)
    p = Pipeline(
        routing_key=KEY,
        domain=DOMAIN,
        source_ip=SOURCE_IP,
        policy=fast_policy(KEY, max_connections=1, batch_size=10, batch_timeout=0.5, max_retries=0),
        spool=spool,
        sender=sender,
        retry=Retry(base=0.05, cap=0.2),
        shaper=shaper if shaper is not None else Shaper(sender.destinations, ShapingTable(), "n1"),
    )
    p.start()
    return p


async def _finished(p: Pipeline, n: int) -> None:
    async def done() -> bool:
        c = await p.counts()
        return c.delivered + c.bounced == n and c.unfinished == 0

    await eventually(done, 30)


async def test_a_busy_lane_sends_each_envelope_with_the_previous_content(
    spool: Spool, server: AiosmtpdServer
) -> None:
    recipients = [f"r{i}@{DOMAIN}" for i in range(10)]
    await spool.enqueue(KEY, messages(*recipients))  # one claim of 10, one lane
    p = _pipeline(spool, server)
    try:
        await _finished(p, 10)
        assert (await p.counts()).delivered == 10
    finally:
        await p.stop(grace=1)
    assert sorted(r for t in server.received for r in t.rcpt_tos) == sorted(recipients)
    assert server.commands.reads.count([".", "MAIL", "RCPT", "DATA"]) == 9


async def test_a_block_set_off_by_a_contents_reply_holds_the_message_announced_with_it(spool: Spool) -> None:
    server = await _server(content_reply=lambda _content: BANNED)
    rule = Rule("banned", BOUNCE, 60.0, code="550", enhanced_code="5.7.", text="banned sending ip")
    shaper = Shaper(Destinations({DOMAIN: server.route}), ShapingTable(rules={"banned": rule}), "n1")
    ids = await spool.enqueue(KEY, messages(*(f"r{i}@{DOMAIN}" for i in range(10))))
    p = _pipeline(spool, server, shaper)
    try:
        await _finished(p, 10)
        assert (await p.counts()).bounced == 10
    finally:
        await p.stop(grace=1)
        await server.stop()
    assert server.received == []
    attempts = []
    for mid in ids:
        found = await spool.message(mid)
        assert found is not None
        message, history = found
        last = history[-1]
        assert (last.result, last.reply.code, last.reply.enhanced) == (State.BOUNCED, 550, "5.7.606")
        attempts.append(message.deliveries[0].attempts)
    # One content reached the server; the message announced with it was dropped unsent with
    # the connection, and bounced with the rest, its attempt unspent.
    assert sorted(attempts) == [0] * 9 + [1]
    assert server.commands.reads.count([".", "MAIL", "RCPT", "DATA"]) == 1
