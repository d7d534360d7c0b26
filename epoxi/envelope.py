"""The envelope of an Email: who sends it, who receives it, and in which domains."""

from __future__ import annotations

from typing import Any

from epoxi.address import addr_spec
from epoxi.v1 import email_pb2


def new_email(sender: str, **fields: Any) -> email_pb2.Email:
    """An Email with ``from`` set (a Python keyword, so it cannot be a keyword argument)."""
    e = email_pb2.Email(**fields)
    setattr(e, "from", sender)
    return e


def sender_address(e: email_pb2.Email) -> str:
    return addr_spec(getattr(e, "from"))


def domain_of(address: str) -> str:
    """The lower-cased domain of an addr-spec or ``Name <addr-spec>`` mailbox."""
    return address.rsplit("@", 1)[-1].rstrip(">").strip().lower()


def recipients(email: email_pb2.Email) -> list[str]:
    return [*email.to, *email.cc, *email.bcc]


def recipients_in(email: email_pb2.Email, domain: str) -> list[str]:
    return [r for r in recipients(email) if domain_of(r) == domain]


def domains(email: email_pb2.Email) -> list[str]:
    """Recipient domains of ``email`` in first-seen order."""
    to = email.to
    if len(to) == 1 and not email.cc and not email.bcc:
        return [domain_of(to[0])]  # the common case, without the list and dict of the general one
    return list(dict.fromkeys(domain_of(r) for r in recipients(email)))
