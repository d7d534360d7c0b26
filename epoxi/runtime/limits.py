"""How large one gRPC message may be on a hop, from the hop's one email limit (``max_email_bytes``).

A request carries many emails, so the transport limit is not the email limit itself:

- ``message_limit(max_email_bytes)`` is ``EMAILS_AT_LIMIT`` emails at the limit plus
  ``ENVELOPE_BYTES`` for the request's own fields (100 MiB + 64 KiB by default). Every server
  receives, and every channel sends and receives, messages up to it.
- So an email above the email limit still reaches the handler (up to that size), and is refused
  with INVALID_ARGUMENT naming the limit (``epoxi.validation``), not RESOURCE_EXHAUSTED by the
  transport. A request above ``message_limit`` is refused by gRPC itself with RESOURCE_EXHAUSTED
  ("Received message larger than max"): the client splits it.
- The router packs each EnqueueBatch's emails into ``batch_bytes`` (``services.router.batching``),
  and any valid email fits in one; a node with the same setting never refuses a batch for size.
"""

from __future__ import annotations

from google.protobuf.message import Message

from epoxi.validation import MAX_EMAIL_BYTES

EMAILS_AT_LIMIT = 4
# A request's own fields besides its emails (routing key, IP pool, ...).
ENVELOPE_BYTES = 64 * 1024


def message_limit(max_email_bytes: int = MAX_EMAIL_BYTES) -> int:
    """The largest gRPC message on a hop whose emails are at most ``max_email_bytes``."""
    return EMAILS_AT_LIMIT * max_email_bytes + ENVELOPE_BYTES


def batch_bytes(max_email_bytes: int = MAX_EMAIL_BYTES) -> int:
    """How many bytes of emails (``encoded_size``) one request on such a hop may carry."""
    return message_limit(max_email_bytes) - ENVELOPE_BYTES


def encoded_size(item: Message) -> int:
    """``item``'s size as an element of a repeated field: its tag, its length and its bytes."""
    return element_size(item.ByteSize())


def element_size(n: int) -> int:
    """The size, as an element of a repeated field, of an item whose own bytes are ``n``."""
    return 1 + _varint_size(n) + n


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel or server options that send and receive messages up to ``max_message_bytes``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
