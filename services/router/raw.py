"""What RouteRawEmail and a call's Idempotency-Key become before routing.

RouteRawEmail's message is ``message/rfc822`` (parameters allowed, any case; anything else is
INVALID_ARGUMENT). Its envelope comes from the request, else from the message's header, as
``sendmail -t`` takes it:

- ``mail_from`` empty: the address of the From field (exactly one); ``"<>"`` is the null
  reverse-path;
- ``rcpt_to`` empty: every address of the To, Cc and Bcc fields, each once, in order; and then
  the Bcc fields are removed from the message, so its other recipients do not see them. With
  ``rcpt_to`` given the message's bytes are left as they are (but for line ends,
  ``epoxi.raw_message.canonical``).
"""

from __future__ import annotations

from collections.abc import Iterable

from epoxi import raw_message
from epoxi.excerpt import shown
from epoxi.v1 import email_pb2, router_pb2

RFC822 = "message/rfc822"
IDEMPOTENCY_KEY = "idempotency-key"
MAX_CALL_KEY = 255
NULL_PATH = "<>"


def call_idempotency_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, str]:
    """The call's Idempotency-Key ("" without one) and, when it cannot be one, why."""
    values = [v for k, v in metadata or () if k == IDEMPOTENCY_KEY]
    if not values:
        return "", ""
    if len(values) > 1:
        return "", f"{IDEMPOTENCY_KEY} is given {len(values)} times; give it once"
    key = values[0]
    if isinstance(key, bytes) or not key:
        return "", f"{IDEMPOTENCY_KEY} is empty or binary; give printable ASCII"
    if len(key) > MAX_CALL_KEY:
        return "", f"{IDEMPOTENCY_KEY} is {len(key)} characters; at most {MAX_CALL_KEY} are allowed"
    if not (key.isascii() and key.isprintable()):
        return "", f"{IDEMPOTENCY_KEY} {shown(key)} is not printable ASCII"
    return key, ""


def raw_email(request: router_pb2.RouteRawEmailRequest) -> tuple[email_pb2.Email, list[str]]:
    """The Email with ``raw`` set that ``request`` describes, and what is wrong with the request
    (an Email is returned only when nothing is)."""
    message = request.message
    content_type = message.content_type
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != RFC822:
        return email_pb2.Email(), [
            f"message.content_type {shown(content_type)} is not {RFC822}: the message must be an "
            "RFC 5322 message"
        ]
    data = message.data
    if (p := raw_message.content_problem(data)) is not None:
        return email_pb2.Email(), [f"message.data {p}"]
    problems: list[str] = []
    mail_from = request.mail_from
    if mail_from == NULL_PATH:
        mail_from = ""
    elif not mail_from:
        senders, bad = raw_message.addresses(data, ("from",))
        problems += [f"mail_from is empty, and {p}" for p in bad]
        if len(senders) != 1 and not bad:
            problems.append(
                f"mail_from is empty, and the From field has {len(senders)} addresses: give mail_from "
                '("<>" for the null reverse-path)'
            )
        mail_from = senders[0] if senders else ""
    rcpt_to = list(request.rcpt_to)
    if not rcpt_to:
        found, bad = raw_message.addresses(data, ("to", "cc", "bcc"))
        problems += [f"rcpt_to is empty, and {p}" for p in bad]
        rcpt_to = list(dict.fromkeys(found))
        if not rcpt_to and not bad:
            problems.append("rcpt_to is empty, and the To, Cc and Bcc fields have no address")
        data = raw_message.without_bcc(data)
    if problems:
        return email_pb2.Email(), problems
    email = email_pb2.Email(
        raw=email_pb2.RawMessage(mail_from=mail_from, rcpt_to=rcpt_to, content=data),
        delivery=request.delivery,
    )
    return email, []
