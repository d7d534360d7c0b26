"""The benchmark's mail: N emails of about ``size`` bytes, one recipient each, spread round-robin
over routing keys (recipient domain x source IP), and an SMTP blaster that sends them with the
node's own client code (``services.node.engine.smtp.SmtpSender``: the pipelining client, source-bound,
connections reused)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from epoxi import envelope, rendering
from epoxi.routing import routing_key
from epoxi.v1 import email_pb2
from services.node.engine.mx import Destinations, Host
from services.node.engine.smtp import Message, SmtpSender

SENDER = "Epoxi Bench <bench@sender.bench.test>"
# The header field that names a message for the latency sink (``benchmarks.latency_sink``).
TRACK_HEADER = "X-Bench-Id"
_LINE = "The quick brown fox jumps over the lazy dog; Epoxi mesh benchmark payload.\n"


@dataclass(frozen=True)
class Key:
    domain: str
    source_ip: str

    @property
    def routing_key(self) -> str:
        return routing_key(self.domain, self.source_ip)


def keys(count: int, ips: Sequence[str]) -> list[Key]:
    """``count`` routing keys over ``ips``: domains d0, d1, ... each paired with every IP in turn."""
    return [Key(f"d{i // len(ips)}.bench.test", ips[i % len(ips)]) for i in range(count)]


def _body(size: int) -> str:
    """Plain text such that the rendered message is about ``size`` bytes."""
    key = Key("d0.bench.test", "127.0.0.2")
    n = max(0, size - len(rendering.render(_email(0, key, ""))))
    text = _text(n)
    # Each LF goes out as CRLF: take the difference off once, so 100 KB is 100 KB and not 101.3.
    n = max(0, n - (len(rendering.render(_email(0, key, text))) - size))
    return _text(n)


def _text(n: int) -> str:
    return (_LINE * (n // len(_LINE) + 1))[:n].rstrip("\n") + "\n"


def _email(i: int, key: Key, text: str, track: str | None = None) -> email_pb2.Email:
    e = envelope.new_email(
        SENDER,
        to=[f"user{i}@{key.domain}"],
        subject=f"Benchmark message {i}",
        text=text,
        delivery=email_pb2.Delivery(ip=key.source_ip),
    )
    if track is not None:
        e.headers.add(name=TRACK_HEADER, value=track_id(track, i))
    return e


def track_id(prefix: str, i: int) -> str:
    """The ``TRACK_HEADER`` value of email ``i`` made with ``emails(..., track=prefix)``."""
    return f"{prefix}-{i}"


def emails(count: int, ks: Sequence[Key], size: int, track: str | None = None) -> list[email_pb2.Email]:
    """Email ``i`` goes to key ``i % len(ks)``; no Message-ID, so the router assigns one as for any
    client. With ``track``, each carries ``TRACK_HEADER: <track>-<i>`` (``track_id``)."""
    text = _body(size)
    return [_email(i, ks[i % len(ks)], text, track) for i in range(count)]


@dataclass(frozen=True)
class Rendered:
    key: Key
    sender: str
    recipient: str
    data: bytes


def rendered(es: Sequence[email_pb2.Email], ks: Sequence[Key]) -> list[Rendered]:
    """What a node would put on the wire for each email (rendered once, outside any timing)."""
    out = []
    for i, e in enumerate(es):
        out.append(Rendered(ks[i % len(ks)], envelope.sender_address(e), e.to[0], rendering.render(e)))
    return out


@dataclass(frozen=True)
class BlastResult:
    seconds: float
    accepted: int
    failed: int


async def blast(
    messages: Sequence[Rendered],
    target: str,
    connections_per_key: int,
    bind_source: bool = True,
    ehlo_name: str = "bench.epoxi.test",
    chunking: bool = False,
) -> BlastResult:
    """Send every message to ``target`` over ``connections_per_key`` reused connections per key,
    each bound to its key's source IP (as a pipeline's lanes are), all keys at once; as a lane
    does, each takes its next message as a content goes, so its envelope can go with it."""
    host, _, port = target.rpartition(":")
    sender = SmtpSender(Destinations({"*": Host(host, int(port))}), ehlo_name, chunking=chunking)
    queues: dict[Key, deque[Rendered]] = {}
    for m in messages:
        queues.setdefault(m.key, deque()).append(m)
    accepted = failed = 0

    async def lane(key: Key, queue: deque[Rendered]) -> None:
        nonlocal accepted, failed
        conn = sender.connection(key.domain, key.source_ip if bind_source else "127.0.0.1")
        ahead: list[Rendered] = []

        def follow() -> Message | None:
            if not queue:
                return None
            ahead.append(queue.popleft())
            return Message(ahead[-1].sender, [ahead[-1].recipient], ahead[-1].data)

        try:
            while ahead or queue:
                m = ahead.pop() if ahead else queue.popleft()
                results = await conn.send(m.sender, [m.recipient], m.data, follow)
                if all(r.accepted for r in results.values()):
                    accepted += 1
                else:
                    failed += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for key, queue in queues.items():
            for _ in range(min(connections_per_key, len(queue))):
                tg.create_task(lane(key, queue))
    return BlastResult(time.perf_counter() - start, accepted, failed)
