"""Whether an Email can be accepted: every reason it cannot, each naming the field.

An email with ``raw`` set is not rendered: it is checked against ``epoxi.raw_message``'s rules
(``content_problem``), its envelope addresses are bare addr-specs (``addr_spec_problem``), and
nothing but delivery and message_id may be set beside it. Otherwise, what this accepts,
``epoxi.rendering.render`` renders: the rules for addresses are
``epoxi.address``'s, for extra header fields ``epoxi.header_fields``'s, for the Message-ID
``epoxi.message_id``'s and for attachments ``epoxi.attachments``'s. Values are quoted in
problems cut to a bounded length (``epoxi.excerpt.shown``).

An email's size is its encoded ``Email`` message (``ByteSize()``): what gRPC carries on every
hop; one without a Message-ID is counted with ``MESSAGE_ID_ALLOWANCE`` bytes for the one the
router adds, so what passes here passes on the node too. Its limit is one setting, ``max_email_bytes`` (``max_email_bytes_setting``), which the
router and the node both declare; it also sizes their gRPC messages (``epoxi.runtime.limits``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from epoxi import attachments as attachment_rules
from epoxi import header_fields, raw_message
from epoxi.address import addr_spec, address_problem
from epoxi.excerpt import shown
from epoxi.message_id import message_id_problem
from epoxi.routing import is_ip
from epoxi.settings import setting
from epoxi.v1 import email_pb2

MAX_EMAIL_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000
# A generated Message-ID (rendering.new_message_id, DerivedMessageIds: at most 44 characters and
# the sender's domain as an A-label, at most 253), with its field's tag and length.
MESSAGE_ID_ALLOWANCE = 320
# Every service reads this variable too, after its own (EPOXI_ROUTER_..., EPOXI_NODE_...).
MAX_EMAIL_BYTES_ENV = "EPOXI_MAX_EMAIL_BYTES"

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)


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
        if e.HasField("raw"):  # a raw email has no from: rendered ones never pay for this
            return _raw_problems(e, where, max_bytes)
        problems.append(f"{where}.from is required")
    elif (p := address_problem(sender)) is not None:
        problems.append(f"{where}.from {shown(sender)} {p}")
    to, cc, bcc = e.to, e.cc, e.bcc
    count = len(to) + len(cc) + len(bcc)
    if not count:
        problems.append(f"{where} has no recipients (to, cc and bcc are empty)")
    if count > MAX_RECIPIENTS:
        problems.append(f"{where} has {count} recipients; at most {MAX_RECIPIENTS} are allowed")
    for field, values in (("to", to), ("cc", cc), ("bcc", bcc)):
        for i, r in enumerate(values):
            if (p := address_problem(r)) is not None:
                problems.append(f"{where}.{field}[{i}] {shown(r)} {p}")
    reply_to = e.reply_to
    if reply_to and (p := address_problem(reply_to)) is not None:
        problems.append(f"{where}.reply_to {shown(reply_to)} {p}")
    subject = e.subject
    if subject and (p := header_fields.text_problem(subject)) is not None:
        problems.append(f"{where}.subject {p}")
    message_id = e.message_id
    if message_id and (p := message_id_problem(message_id)) is not None:
        problems.append(f"{where}.message_id {shown(message_id)} {p}")
    headers = e.headers
    if headers:
        problems += _header_problems(headers, where)
    attachments = e.attachments
    if attachments:
        problems += _attachment_problems(attachments, where)
    problems += _delivery_and_size_problems(e, where, max_bytes, message_id)
    return problems


def _delivery_and_size_problems(e: email_pb2.Email, where: str, max_bytes: int, message_id: str) -> list[str]:
    problems = []
    ip = e.delivery.ip
    if ip and not is_ip(ip):
        problems.append(f"{where}.delivery.ip {shown(ip)} is not an IP address")
    size = e.ByteSize() + (0 if message_id else MESSAGE_ID_ALLOWANCE)
    if size > max_bytes:
        problems.append(
            f"{where} is {size} bytes; the limit is {max_bytes} bytes ({format_size(max_bytes)}, "
            "the max_email_bytes setting)"
        )
    return problems


# What may be set beside raw: the rest describes a message to render.
_BESIDE_RAW = frozenset({"raw", "delivery", "message_id"})


def _raw_problems(e: email_pb2.Email, where: str, max_bytes: int) -> list[str]:
    """``validate`` for an email with ``raw`` set (``epoxi.raw_message``)."""
    problems = [
        f"{where}.{f.name} must be empty with raw set (only delivery and message_id may be set beside it)"
        for f, _ in e.ListFields()
        if f.name not in _BESIDE_RAW
    ]
    raw = e.raw
    mail_from = raw.mail_from
    if mail_from and (p := addr_spec_problem(mail_from)) is not None:
        problems.append(f"{where}.raw.mail_from {shown(mail_from)} {p}")
    rcpt_to = raw.rcpt_to
    if not rcpt_to:
        problems.append(f"{where}.raw.rcpt_to is empty: give at least one envelope recipient")
    if len(rcpt_to) > MAX_RECIPIENTS:
        problems.append(f"{where}.raw has {len(rcpt_to)} recipients; at most {MAX_RECIPIENTS} are allowed")
    for i, r in enumerate(rcpt_to):
        if (p := addr_spec_problem(r)) is not None:
            problems.append(f"{where}.raw.rcpt_to[{i}] {shown(r)} {p}")
    if (p := raw_message.content_problem(raw.content)) is not None:
        problems.append(f"{where}.raw.content {p}")
    message_id = e.message_id
    if message_id and (p := message_id_problem(message_id)) is not None:
        problems.append(f"{where}.message_id {shown(message_id)} {p}")
    problems += _delivery_and_size_problems(e, where, max_bytes, message_id)
    return problems


def addr_spec_problem(address: str) -> str | None:
    """Why ``address`` is not an addr-spec we can send to (an envelope address: no display name,
    no angle brackets); None when it is."""
    if (p := address_problem(address)) is not None:
        return p
    if addr_spec(address) != address:
        return "is not a bare addr-spec (an envelope address has no display name or angle brackets)"
    return None


def _header_problems(headers: Sequence[email_pb2.Header], where: str) -> list[str]:
    problems = []
    senders = 0
    for i, h in enumerate(headers):
        name, value = h.name, h.value
        if (p := header_fields.name_problem(name)) is not None:
            problems.append(f"{where}.headers[{i}].name {shown(name)} {p}")
        label = f" ({name})" if header_fields.NAME.match(name) else ""
        if name.lower() == header_fields.SENDER:
            senders += 1
            if senders > 1:
                problems.append(f"{where}.headers[{i}] is a second Sender; an email has at most one")
            if (p := address_problem(value)) is not None:
                problems.append(f"{where}.headers[{i}]{label} value {shown(value)} {p}")
        elif (p := header_fields.text_problem(value)) is not None:
            problems.append(f"{where}.headers[{i}]{label} value {p}")
    return problems


def _attachment_problems(attachments: Sequence[email_pb2.Attachment], where: str) -> list[str]:
    problems = []
    for i, a in enumerate(attachments):
        filename, content_type = a.filename, a.content_type
        if not filename:
            problems.append(f"{where}.attachments[{i}].filename is required")
        elif not attachment_rules.safe_filename(filename):
            problems.append(
                f"{where}.attachments[{i}].filename {shown(filename)} has no name left once directories, "
                "control characters and surrounding spaces are dropped"
            )
        if content_type and (p := attachment_rules.content_type_problem(content_type)) is not None:
            problems.append(f"{where}.attachments[{i}].content_type {shown(content_type)} {p}")
    return problems
