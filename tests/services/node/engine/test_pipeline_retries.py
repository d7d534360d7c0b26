"""A pipeline against a flaky server: greylisting 4xx replies and dropped connections."""

from __future__ import annotations

import random
from collections import Counter

from devmesh.sink import Sink
from epoxi import rendering
from services.node.engine.pipeline import Pipeline
from services.node.engine.retry import Retry
from services.node.engine.spool import Counts, NewMessage, Spool, State
from tests.services.node.support import KEY, SOURCE_IP, email, fast_policy, smtp_to
from tests.support import eventually


async def test_mail_to_a_flaky_server_all_arrives_once_with_every_attempt_recorded(
    spool: Spool, sink: Sink
) -> None:
    replies, drops = random.Random(3), random.Random(5)
    sink.reply_rule = lambda rcpt: "451 4.3.0 greylisted, try again" if replies.random() < 0.3 else None
    # Hang up mid-session: often at a second recipient, after the first was accepted, so the
    # transaction fails for both; sometimes at a first one, which a reused connection retries.
    sink.drop_rule = lambda rcpt: drops.random() < (0.5 if "-cc@" in rcpt else 0.1)
    messages = [
        NewMessage("ann@sender.test", rcpts, rendering.render(email(*rcpts)))
        for rcpts in (
            [f"m{i}@example.com"] + ([f"m{i}-cc@example.com"] if i % 3 == 0 else []) for i in range(30)
        )
    ]
    expected = sorted(r for m in messages for r in m.recipients)
    p = Pipeline(
        routing_key=KEY,
        domain="example.com",
        source_ip=SOURCE_IP,
        policy=fast_policy(max_retries=40, max_connections=3, batch_size=10),
        spool=spool,
        sender=smtp_to(sink),
        retry=Retry(base=0.005, cap=0.02),
    )
    p.start()
    try:
        ids = await spool.enqueue(KEY, messages)
        p.wake()

        async def finished() -> Counts | None:
            c = await p.counts()
            return c if c.unfinished == 0 else None

        assert await eventually(finished, 20) == Counts(delivered=len(expected))
    finally:
        await p.stop(grace=1)
    assert sorted(sink.recipients()) == expected  # each exactly once

    failures: Counter[tuple[int, str, str]] = Counter()
    for mid in ids:
        stored = await spool.message(mid)
        assert stored is not None
        row, attempts = stored
        for d in row.deliveries:
            history = [a for a in attempts if a.recipient == d.recipient]
            assert [a.attempt for a in history] == list(range(1, d.attempts + 1))
            *deferred, last = history
            assert (last.result, last.reply.code) == (State.DELIVERED, 250)
            assert {a.result for a in deferred} <= {State.DEFERRED}
            failures.update((a.reply.code, a.reply.enhanced, a.reply.text[:10]) for a in deferred)
    # Both kinds of trouble happened, and each was recorded: the reply, or that there was none.
    greylisted = (451, "4.3.0", "greylisted")
    hung_up = (0, "4.4.2", "connection")  # no reply: the node's own enhanced code
    assert failures[greylisted] > 0
    assert failures[hung_up] > 0
    assert set(failures) == {greylisted, hung_up}
