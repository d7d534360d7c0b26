"""One SMTP transaction's message as an Email for the router, and the router's answer as the
SMTP reply, which means what it says:

- 250 only when every batch of the message is ACCEPTED (durably spooled by a node), with the
  spool IDs in the text;
- 451 4.3.0 when the mesh cannot take it now (no node, a FAILED or UNKNOWN batch, the router or
  the registry unreachable, a timeout), with the reason. The client's retry is safe: the router
  names each batch by the message's Message-ID (or one derived from its bytes), its envelope and
  its routing key, and a node that has a batch does not spool it twice;
- 552 5.3.4 for a message over the size limit, 554 5.6.0 for one the contract refuses (no
  header section, a line over 998 octets, ...): sending it again would not help.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from epoxi import raw_message, validation
from epoxi.excerpt import shown
from epoxi.routing import is_ip
from epoxi.v1 import email_pb2, router_pb2

# SMTP reply lines are at most 512 octets with the CRLF (RFC 5321 4.5.3.1.5).
MAX_REPLY_TEXT = 480


@dataclass(frozen=True)
class Source:
    """Where a submitter's mail leaves from: an IP, a pool, or the router's default."""

    ip: str = ""
    ip_pool: str = ""


def email_for(
    mail_from: str,
    rcpt_to: list[str],
    content: bytes,
    source: Source,
    ip_header: str,
    max_email_bytes: int,
) -> tuple[email_pb2.Email | None, str]:
    """The Email for one transaction, or the SMTP reply that refuses it."""
    delivery = email_pb2.Delivery(ip=source.ip, ip_pool=source.ip_pool)
    if ip_header:
        wanted = ip_header.lower()
        for name, value in raw_message.fields(content):
            if name.lower() == wanted:
                if not is_ip(value):
                    return None, f"554 5.6.0 The {ip_header} field {shown(value)} is not an IP address"
                delivery = email_pb2.Delivery(ip=value)
                break
    email = email_pb2.Email(
        raw=email_pb2.RawMessage(mail_from=mail_from, rcpt_to=rcpt_to, content=content), delivery=delivery
    )
    problems = validation.validate(email, "message", max_email_bytes)
    if any("the max_email_bytes setting" in p for p in problems):
        return None, f"552 5.3.4 Message too big: at most {max_email_bytes} bytes with its envelope"
    if problems:
        return None, _reply(554, "5.6.0", "Message refused: " + "; ".join(problems))
    return email, ""


def reply_for(response: router_pb2.RouteEmailsResponse) -> str:
    """The SMTP reply for the router's answer to one message."""
    batches = response.batches
    if batches and all(b.status == router_pb2.BATCH_STATUS_ACCEPTED for b in batches):
        ids = " ".join(i for b in batches for i in b.message_ids)
        return _reply(250, "2.0.0", f"Ok: queued as {ids}")
    reasons = [
        f"{b.routing_key or 'unroutable'}: {router_pb2.BatchStatus.Name(b.status).removeprefix('BATCH_STATUS_')}"
        f" ({b.error})"
        for b in batches
        if b.status != router_pb2.BATCH_STATUS_ACCEPTED
    ]
    return _reply(451, "4.3.0", "Try again later, the mesh cannot take it now: " + "; ".join(reasons))


def unavailable(reason: str) -> str:
    return _reply(451, "4.3.0", f"Try again later, the mesh cannot take it now: {reason}")


def refused(code: grpc.StatusCode, details: str) -> str:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _reply(552, "5.3.4", f"Message too big for the mesh: {details}")
    return _reply(554, "5.6.0", f"Message refused by the router: {details}")


def _reply(code: int, enhanced: str, text: str) -> str:
    text = " ".join(text.split())  # one line
    if len(text) > MAX_REPLY_TEXT:
        text = text[: MAX_REPLY_TEXT - 3] + "..."
    return f"{code} {enhanced} {text}"
