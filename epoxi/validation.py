"""Whether an Email can be accepted: every reason it cannot, each naming the field."""

from __future__ import annotations

import re

from epoxi.address import address_problem
from epoxi.envelope import recipients
from epoxi.routing import is_ip
from epoxi.v1 import email_pb2

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000

HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# Set from the email's own fields; the renderer writes them.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version"}
)


def validate(e: email_pb2.Email, where: str = "email") -> list[str]:
    """Every reason ``e`` cannot be accepted, each naming the field."""
    problems: list[str] = []
    sender = getattr(e, "from")
    if not sender:
        problems.append(f"{where}.from is required")
    elif (p := address_problem(sender)) is not None:
        problems.append(f"{where}.from {sender!r} {p}")
    rcpts = recipients(e)
    if not rcpts:
        problems.append(f"{where} has no recipients (to, cc and bcc are empty)")
    if len(rcpts) > MAX_RECIPIENTS:
        problems.append(f"{where} has {len(rcpts)} recipients; at most {MAX_RECIPIENTS} are allowed")
    for field in ("to", "cc", "bcc"):
        for i, r in enumerate(getattr(e, field)):
            if (p := address_problem(r)) is not None:
                problems.append(f"{where}.{field}[{i}] {r!r} {p}")
    if e.reply_to and (p := address_problem(e.reply_to)) is not None:
        problems.append(f"{where}.reply_to {e.reply_to!r} {p}")
    for field in ("subject", "message_id"):
        if _has_crlf(getattr(e, field)):
            problems.append(f"{where}.{field} contains CR or LF")
    for i, h in enumerate(e.headers):
        if not HEADER_NAME.match(h.name):
            problems.append(f"{where}.headers[{i}].name {h.name!r} is not a valid header field name")
        elif h.name.lower() in RESERVED_HEADERS:
            problems.append(f"{where}.headers[{i}].name {h.name!r} is set from the email's own fields")
        if _has_crlf(h.value):
            problems.append(f"{where}.headers[{i}] ({h.name}) value contains CR or LF")
    for i, a in enumerate(e.attachments):
        if not a.filename or _has_crlf(a.filename):
            problems.append(f"{where}.attachments[{i}].filename is required and must be one line")
    if e.delivery.ip and not is_ip(e.delivery.ip):
        problems.append(f"{where}.delivery.ip {e.delivery.ip!r} is not an IP address")
    size = e.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        problems.append(f"{where} is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    return problems


def _has_crlf(value: str) -> bool:
    return "\r" in value or "\n" in value
