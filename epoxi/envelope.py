"""The envelope of an Email: who sends it, who receives it, and in which domains.

A raw email (``Email.raw``) carries its envelope itself: its sender is ``raw.mail_from`` and
its recipients ``raw.rcpt_to``, whatever its header fields say.

Envelope addresses are addr-specs with an IDN domain as its A-label (``epoxi.address``); a UTF-8
local part stays as written, and makes the message need SMTPUTF8.
"""

from __future__ import annotations

from typing import Any

from epoxi.address import domain_of, envelope_address
from epoxi.v1 import email_pb2

__all__ = ["domain_of", "domains", "new_email", "recipients", "recipients_in", "sender_address"]


def new_email(sender: str, **fields: Any) -> email_pb2.Email:
    """An Email with ``from`` set (a Python keyword, so it cannot be a keyword argument)."""
    e = email_pb2.Email(**fields)
    setattr(e, "from", sender)
    return e


def sender_address(e: email_pb2.Email) -> str:
    """The envelope sender (MAIL FROM) of ``e``: "" for a raw email's null reverse-path."""
    sender = getattr(e, "from")
    if not sender and e.HasField("raw"):
        return envelope_address(e.raw.mail_from) if e.raw.mail_from else ""
    return envelope_address(sender)


def recipients(email: email_pb2.Email) -> list[str]:
    """The mailboxes of ``email``'s recipients as written: to, cc and bcc; for a raw email, its
    envelope's rcpt_to."""
    found = [*email.to, *email.cc, *email.bcc]
    if not found and email.HasField("raw"):
        return list(email.raw.rcpt_to)
    return found


def recipients_in(email: email_pb2.Email, domain: str) -> list[str]:
    """The envelope recipients (RCPT TO) of ``email`` in ``domain`` (an A-label, lower-case)."""
    return [envelope_address(r) for r in recipients(email) if domain_of(r) == domain]


def domains(email: email_pb2.Email) -> list[str]:
    """Recipient domains of ``email`` in first-seen order (A-labels, lower-case)."""
    to = email.to
    if len(to) == 1 and not email.cc and not email.bcc:
        return [domain_of(to[0])]  # the common case, without the list and dict of the general one
    return list(dict.fromkeys(domain_of(r) for r in recipients(email)))
