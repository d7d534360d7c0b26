"""Queue inspection: spool rows as ``epoxi.v1`` messages, and ``ListMessages`` page tokens.

A page token is opaque to callers: URL-safe base64 of the listing's filter and the position of
the last message returned, so a token only continues the listing it came from.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
from dataclasses import dataclass

from epoxi.proto_time import timestamp
from epoxi.v1 import queue_pb2
from services.node.engine.reply import Reply
from services.node.engine.spool import (
    AttemptRow,
    Cursor,
    DeliveryRow,
    KeyStats,
    MessageRow,
    State,
)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

STATES: dict[State, queue_pb2.DeliveryState.ValueType] = {
    State.QUEUED: queue_pb2.DELIVERY_STATE_QUEUED,
    State.INFLIGHT: queue_pb2.DELIVERY_STATE_IN_FLIGHT,
    State.DEFERRED: queue_pb2.DELIVERY_STATE_DEFERRED,
    State.DELIVERED: queue_pb2.DELIVERY_STATE_DELIVERED,
    State.BOUNCED: queue_pb2.DELIVERY_STATE_BOUNCED,
}
SPOOL_STATES = {v: k for k, v in STATES.items()}
# What a recipient not tried yet shows.
NO_REPLY = Reply(0, "", "")


class BadPageToken(ValueError):
    pass


@dataclass(frozen=True)
class Page:
    """Where a listing continues: its filter and the last message already returned."""

    routing_key: str
    state: int
    after: Cursor

    def token(self) -> str:
        raw = json.dumps([self.routing_key, self.state, *self.after], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Page:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            key, state, created_at, message_id = json.loads(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
            raise BadPageToken("page_token is not a token this node issued") from None
        if not (
            isinstance(key, str)
            and isinstance(state, int)
            and isinstance(created_at, int | float)
            and isinstance(message_id, str)
        ):
            raise BadPageToken("page_token is not a token this node issued")
        return cls(key, state, (float(created_at), message_id))


def page_size(requested: int) -> int:
    """AIP-158: 0 takes the default and sizes above the maximum are lowered to it."""
    if requested < 0:
        raise ValueError(f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def stats_proto(key: str, stats: KeyStats, running: bool) -> queue_pb2.QueueStats:
    out = queue_pb2.QueueStats(routing_key=key, counters=stats.counts.to_proto(), running=running)
    if stats.next_attempt_at is not None:
        out.next_attempt_at.CopyFrom(timestamp(stats.next_attempt_at))
    return out


def _recipient(d: DeliveryRow) -> queue_pb2.RecipientStatus:
    reply = d.reply or NO_REPLY
    out = queue_pb2.RecipientStatus(
        recipient=d.recipient,
        state=STATES[d.state],
        attempts=d.attempts,
        smtp_code=reply.code,
        enhanced_code=reply.enhanced,
        text=reply.text,
    )
    if d.state in (State.QUEUED, State.DEFERRED):
        out.next_attempt_at.CopyFrom(timestamp(d.next_attempt_at))
    return out


def message_proto(m: MessageRow) -> queue_pb2.QueuedMessage:
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(m.head)
    return queue_pb2.QueuedMessage(
        id=m.id,
        routing_key=m.routing_key,
        sender=m.sender,
        accepted_at=timestamp(m.created_at),
        size_bytes=m.size,
        subject=_header(headers.get("Subject")),
        message_id_header=_header(headers.get("Message-ID")),
        recipients=[_recipient(d) for d in m.deliveries],
    )


def attempt_proto(a: AttemptRow) -> queue_pb2.DeliveryAttempt:
    return queue_pb2.DeliveryAttempt(
        attempted_at=timestamp(a.attempted_at),
        recipient=a.recipient,
        attempt=a.attempt,
        result=STATES[a.result],
        smtp_code=a.reply.code,
        enhanced_code=a.reply.enhanced,
        text=a.reply.text,
    )


def _header(value: object) -> str:
    """A header value, decoded and unfolded."""
    return " ".join(str(value).split()) if value is not None else ""
