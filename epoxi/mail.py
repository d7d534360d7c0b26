"""Email validation and RFC 5322 rendering, with the standard library's ``email`` package."""

from __future__ import annotations

import email.policy
import email.utils
import re
from email.message import EmailMessage
from typing import Any

from epoxi.routing import is_ip, recipients
from epoxi.v1 import email_pb2

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000

# RFC 5321 limits: 64 octets local part, 255 domain; a practical dot-atom check, not full RFC 5322.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
_RESERVED_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version"}
_SMTP_POLICY = email.policy.SMTP.clone(max_line_length=78)


def addr_spec(mailbox: str) -> str:
    """The addr-spec of ``mailbox`` (``"Ann <a@x.org>"`` → ``"a@x.org"``); empty when unparsable."""
    if "\r" in mailbox or "\n" in mailbox:
        return ""
    _, addr = email.utils.parseaddr(mailbox)
    # parseaddr quietly repairs some malformed input ("a@exa mple.org"); accept only what it kept whole.
    written = mailbox[mailbox.find("<") + 1 : mailbox.rfind(">")] if "<" in mailbox else mailbox
    return addr if addr == written.strip() else ""


def address_problem(mailbox: str) -> str | None:
    addr = addr_spec(mailbox)
    if not addr or "@" not in addr:
        return "is not an email address"
    local, _, domain = addr.rpartition("@")
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return "has an invalid local part"
    labels = domain.split(".")
    if len(domain) > 255 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "has an invalid domain"
    return None


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
        if not _HEADER_NAME.match(h.name):
            problems.append(f"{where}.headers[{i}].name {h.name!r} is not a valid header field name")
        elif h.name.lower() in _RESERVED_HEADERS:
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


def new_message_id(sender: str) -> str:
    domain = addr_spec(sender).rpartition("@")[2] or "epoxi.invalid"
    return email.utils.make_msgid(domain=domain)


def render(e: email_pb2.Email) -> bytes:
    """The RFC 5322 message for ``e`` (Bcc is never written)."""
    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = getattr(e, "from")
    if e.to:
        msg["To"] = list(e.to)
    if e.cc:
        msg["Cc"] = list(e.cc)
    if e.reply_to:
        msg["Reply-To"] = e.reply_to
    msg["Subject"] = e.subject
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = e.message_id or new_message_id(getattr(e, "from"))
    for h in e.headers:
        msg[h.name] = h.value
    if e.text or not e.html:
        msg.set_content(e.text)
        if e.html:
            msg.add_alternative(e.html, subtype="html")
    else:
        msg.set_content(e.html, subtype="html")
    for a in e.attachments:
        maintype, _, subtype = (a.content_type or "application/octet-stream").partition("/")
        msg.add_attachment(
            a.content, maintype=maintype, subtype=subtype or "octet-stream", filename=a.filename
        )
    return msg.as_bytes()


def sender_address(e: email_pb2.Email) -> str:
    return addr_spec(getattr(e, "from"))


def new_email(sender: str, **fields: Any) -> email_pb2.Email:
    """An Email with ``from`` set (a Python keyword, so it cannot be a keyword argument)."""
    e = email_pb2.Email(**fields)
    setattr(e, "from", sender)
    return e
