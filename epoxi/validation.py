"""Whether an Email can be accepted: every reason it cannot, each naming the field.

An email's size is its encoded ``Email`` message (``ByteSize()``): what gRPC carries on every
hop; one without a Message-ID is counted with ``MESSAGE_ID_ALLOWANCE`` bytes for the one the
router adds, so what passes here passes on the node too. Its limit is one setting, ``max_email_bytes`` (``max_email_bytes_setting``), which the
router and the node both declare; it also sizes their gRPC messages (``epoxi.runtime.limits``).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from epoxi.address import address_problem
from epoxi.routing import is_ip
from epoxi.settings import setting
from epoxi.v1 import email_pb2

MAX_EMAIL_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000
# A generated Message-ID (rendering.new_message_id: about 40 characters and the sender's domain),
# with its field's tag and length.
MESSAGE_ID_ALLOWANCE = 320
# Every service reads this variable too, after its own (EPOXI_ROUTER_..., EPOXI_NODE_...).
MAX_EMAIL_BYTES_ENV = "EPOXI_MAX_EMAIL_BYTES"

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)

HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# Set from the email's own fields; the renderer writes them.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version"}
)


def parse_size(text: str) -> int:
    """A positive byte count: ``26214400``, ``25MiB``, ``512KiB`` (``KB``, ``MB``, ``GB``: the same)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or a number with KiB, MiB or GiB)")
    unit = (m.group(2) or "").lower()
    n = int(m.group(1)) * _UNITS[unit if unit in ("", "b") else unit[0] + "ib"]
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return n


def format_size(n: int) -> str:
    """``n`` bytes, with the largest binary unit that divides it (``25 MiB``), else in bytes."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def max_email_bytes_setting(env_prefix: str) -> Any:
    """The ``max_email_bytes`` setting, declared once for every service that takes emails: the
    largest email accepted, checked by ``validate`` and sizing the gRPC messages of the hop."""
    return setting(
        MAX_EMAIL_BYTES,
        parse=parse_size,
        env=(f"{env_prefix}MAX_EMAIL_BYTES", MAX_EMAIL_BYTES_ENV),
        shown=format_size(MAX_EMAIL_BYTES).replace(" ", ""),
        metavar="SIZE",
        help="the largest email accepted (its encoded size; bytes, or KiB, MiB, GiB); "
        "the same on every router and node",
    )


def validate(e: email_pb2.Email, where: str = "email", max_bytes: int = MAX_EMAIL_BYTES) -> list[str]:
    """Every reason ``e`` cannot be accepted, each naming the field; ``max_bytes`` is the
    ``max_email_bytes`` setting."""
    # Each field read once: every read of a protobuf field builds a Python object.
    problems: list[str] = []
    sender = getattr(e, "from")
    if not sender:
        problems.append(f"{where}.from is required")
    elif (p := address_problem(sender)) is not None:
        problems.append(f"{where}.from {sender!r} {p}")
    to, cc, bcc = e.to, e.cc, e.bcc
    count = len(to) + len(cc) + len(bcc)
    if not count:
        problems.append(f"{where} has no recipients (to, cc and bcc are empty)")
    if count > MAX_RECIPIENTS:
        problems.append(f"{where} has {count} recipients; at most {MAX_RECIPIENTS} are allowed")
    for field, values in (("to", to), ("cc", cc), ("bcc", bcc)):
        for i, r in enumerate(values):
            if (p := address_problem(r)) is not None:
                problems.append(f"{where}.{field}[{i}] {r!r} {p}")
    reply_to = e.reply_to
    if reply_to and (p := address_problem(reply_to)) is not None:
        problems.append(f"{where}.reply_to {reply_to!r} {p}")
    message_id = e.message_id
    if _has_crlf(e.subject):
        problems.append(f"{where}.subject contains CR or LF")
    if _has_crlf(message_id):
        problems.append(f"{where}.message_id contains CR or LF")
    headers = e.headers
    if headers:
        for i, h in enumerate(headers):
            name, value = h.name, h.value
            if not HEADER_NAME.match(name):
                problems.append(f"{where}.headers[{i}].name {name!r} is not a valid header field name")
            elif name.lower() in RESERVED_HEADERS:
                problems.append(f"{where}.headers[{i}].name {name!r} is set from the email's own fields")
            if _has_crlf(value):
                problems.append(f"{where}.headers[{i}] ({name}) value contains CR or LF")
    attachments = e.attachments
    if attachments:
        for i, a in enumerate(attachments):
            filename = a.filename
            if not filename or _has_crlf(filename):
                problems.append(f"{where}.attachments[{i}].filename is required and must be one line")
    ip = e.delivery.ip
    if ip and not is_ip(ip):
        problems.append(f"{where}.delivery.ip {ip!r} is not an IP address")
    size = e.ByteSize() + (0 if message_id else MESSAGE_ID_ALLOWANCE)
    if size > max_bytes:
        problems.append(
            f"{where} is {size} bytes; the limit is {max_bytes} bytes ({format_size(max_bytes)}, "
            "the max_email_bytes setting)"
        )
    return problems


def _has_crlf(value: str) -> bool:
    return "\r" in value or "\n" in value
