"""The envelope of an Email: who sends it, who receives it, and in which domains.

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
    """The envelope sender (MAIL FROM) of ``e``."""
    return envelope_address(getattr(e, "from"))


def recipients(email: email_pb2.Email) -> list[str]:
    """The mailboxes of ``email``'s recipients as written: to, cc and bcc."""
    return [*email.to, *email.cc, *email.bcc]


def recipients_in(email: email_pb2.Email, domain: str) -> list[str]:
    """The envelope recipients (RCPT TO) of ``email`` in ``domain`` (an A-label, lower-case)."""
    return [envelope_address(r) for r in recipients(email) if domain_of(r) == domain]


def domains(email: email_pb2.Email) -> list[str]:
    """Recipient domains of ``email`` in first-seen order (A-labels, lower-case)."""
    to = email.to
    if len(to) == 1 and not email.cc and not email.bcc:
        return [domain_of(to[0])]  # the common case, without the list and dict of the general one
    return list(dict.fromkeys(domain_of(r) for r in recipients(email)))
