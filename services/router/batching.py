"""Turn a RouteEmails request into batches, one routing key each, each small enough to send.

A batch holds at most ``max_batch`` emails and at most ``max_batch_bytes`` of them encoded
(``epoxi.runtime.limits.batch_bytes``: what one EnqueueBatch may carry besides its own fields).
Every valid email is below that, so each fits in a batch of its own at least.

Each batch knows where its emails are in the request (``indexes``) and is named by its
``idempotency_key``: a hash of the routing key and the emails' Message-IDs in order. An email
without a Message-ID gets one derived from its content (``epoxi.rendering.DerivedMessageIds``),
so the same request, planned again over the same view, gives the same batches with the same
Message-IDs and the same keys, and a node that spooled a batch recognises it when it comes again.
A raw email is named by its Message-ID and its envelope (``raw_dedupe_id``). A request's
Idempotency-Key, when it has one, is folded into each of its batches' keys.

Each email is serialized once, here (for a derived Message-ID, the same bytes are hashed), and a
batch's EnqueueBatchRequest is put together from those bytes (``Batch.request``), however many
batches the email is in and however many nodes the batch is sent to.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from epoxi import raw_message, rendering
from epoxi.envelope import domains
from epoxi.routing import routing_key
from epoxi.runtime import limits, wire
from epoxi.v1 import email_pb2, node_pb2

DEFAULT_POOL = "default"
_MESSAGE_ID = wire.number(email_pb2.Email, "message_id")
_KEY, _EMAILS, _IDEMPOTENCY_KEY = (
    wire.number(node_pb2.EnqueueBatchRequest, name) for name in ("routing_key", "emails", "idempotency_key")
)


@dataclass
class Batch:
    routing_key: str
    domain: str
    source_ip: str
    emails: list[email_pb2.Email] = field(default_factory=list)
    # Each of ``emails`` serialized.
    encoded: list[bytes] = field(default_factory=list)
    # Where each email is in the request (RouteEmailsRequest.emails), in batch order.
    indexes: list[int] = field(default_factory=list)
    # The emails' encoded size inside a request: each with its field's tag and length.
    size: int = 0

    # The request's Idempotency-Key ("" without one), folded into the batch's key.
    call_key: str = ""
    # What names each email in the idempotency key: its Message-ID (a raw one: ``raw_dedupe_id``).
    dedupe_ids: list[str] = field(default_factory=list)

    @property
    def message_ids(self) -> list[str]:
        return [e.message_id for e in self.emails]

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.routing_key, self.dedupe_ids, self.call_key)

    def request(self) -> bytes:
        """The batch's ``EnqueueBatchRequest``, serialized (from ``encoded``)."""
        parts = [wire.field(_KEY, self.routing_key.encode())]
        parts.extend(wire.field(_EMAILS, e) for e in self.encoded)
        parts.append(wire.field(_IDEMPOTENCY_KEY, self.idempotency_key.encode()))
        return b"".join(parts)


@dataclass
class Unroutable:
    """Emails that got no source IP, with the reason."""

    reason: str
    emails: list[email_pb2.Email] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)

    @property
    def message_ids(self) -> list[str]:
        return [e.message_id for e in self.emails]


def raw_dedupe_id(e: email_pb2.Email) -> str:
    """What names a raw email in its batch's idempotency key: its Message-ID with its envelope,
    since one message may go in several SMTP transactions, each to other recipients, under one
    Message-ID. (A rendered email is named by its Message-ID alone.)"""
    raw = e.raw
    return "\0".join((e.message_id, raw.mail_from, *raw.rcpt_to))


def idempotency_key(key: str, message_ids: Sequence[str], call_key: str = "") -> str:
    """SHA-256 (hex) of the routing key and the Message-IDs in order (a raw email's with its
    envelope), and the request's Idempotency-Key when it has one, each length-prefixed so that
    no two lists run together into the same bytes."""
    h = hashlib.sha256()
    parts = (key, *message_ids) if not call_key else (key, *message_ids, "idempotency-key", call_key)
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.hexdigest()


def choose_ip(e: email_pb2.Email, default_pool: str, pools: dict[str, list[str]]) -> tuple[str, str]:
    """The source IP for ``e`` and, when there is none, why. Pool picks are stable per domain."""
    delivery = e.delivery
    if delivery.ip:
        return delivery.ip, ""
    pool = delivery.ip_pool or default_pool or DEFAULT_POOL
    ips = pools.get(pool)
    if not ips:
        return "", f"no passing node sends from ip pool {pool!r}"
    first_domain = domains(e)[0]
    return ips[zlib.crc32(first_domain.encode()) % len(ips)], ""


def plan(
    emails: Sequence[email_pb2.Email],
    default_pool: str,
    pools: dict[str, list[str]],
    max_batch: int,
    max_batch_bytes: int = limits.batch_bytes(),
    call_key: str = "",
) -> tuple[list[Batch], list[Unroutable]]:
    """Batches of at most ``max_batch`` emails and ``max_batch_bytes`` per routing key, in
    first-seen order, and the emails that have no source IP, by reason.

    An email with recipients in several domains goes into one batch per domain, under one
    Message-ID (derived here when the caller gave none), and with its one request index in each.
    A raw email takes the Message-ID of its header when the caller gave none, and its content
    gets CRLF line ends (``epoxi.raw_message.canonical``). ``call_key`` is the request's
    Idempotency-Key, folded into every batch's key.
    """
    open_batches: dict[str, Batch] = {}
    batches: list[Batch] = []
    unroutable: dict[str, Unroutable] = {}
    derived = rendering.DerivedMessageIds()
    for index, e in enumerate(emails):
        encoded: bytes | None = None
        if e.HasField("raw"):
            e = _prepared_raw(e, derived)
            name = raw_dedupe_id(e)
        else:
            if not e.message_id:
                encoded = e.SerializeToString(deterministic=True)
                message_id = derived.derive_encoded(e, encoded)
                e = _with_message_id(e, message_id)
                encoded += wire.field(_MESSAGE_ID, message_id.encode())  # it was empty: not in it
            name = e.message_id
        ip, reason = choose_ip(e, default_pool, pools)
        if not ip:
            u = unroutable.setdefault(reason, Unroutable(reason))
            u.emails.append(e)
            u.indexes.append(index)
            continue
        if encoded is None:
            encoded = e.SerializeToString()
        size = limits.element_size(len(encoded))
        for domain in domains(e):
            key = routing_key(domain, ip)
            batch = open_batches.get(key)
            if (
                batch is None
                or len(batch.emails) >= max_batch
                or (batch.emails and batch.size + size > max_batch_bytes)
            ):
                batch = open_batches[key] = Batch(key, domain, ip, call_key=call_key)
                batches.append(batch)
            batch.emails.append(e)
            batch.encoded.append(encoded)
            batch.dedupe_ids.append(name)
            batch.indexes.append(index)
            batch.size += size
    return batches, list(unroutable.values())


def _with_message_id(e: email_pb2.Email, message_id: str) -> email_pb2.Email:
    copy = email_pb2.Email()
    copy.CopyFrom(e)
    copy.message_id = message_id
    return copy


def _prepared_raw(e: email_pb2.Email, derived: rendering.DerivedMessageIds) -> email_pb2.Email:
    """``e`` (raw) with CRLF line ends, and a Message-ID: given, else its header's, else derived
    from its content and envelope."""
    content = e.raw.content
    fixed = raw_message.canonical(content)
    if e.message_id and fixed is content:
        return e
    copy = email_pb2.Email()
    copy.CopyFrom(e)
    if fixed is not content:
        copy.raw.content = fixed
    if not copy.message_id:
        copy.message_id = raw_message.message_id(fixed) or derived.derive(copy)
    return copy
