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
    env = raw_message.envelope(data, request.mail_from or None, request.rcpt_to)
    problems = [
        *(
            f'mail_from is empty, and {p}: give mail_from ("<>" for the null reverse-path)'
            for p in env.sender_problems
        ),
        *(f"rcpt_to is empty, and {p}" for p in env.recipient_problems),
    ]
    if problems:
        return email_pb2.Email(), problems
    email = email_pb2.Email(
        raw=email_pb2.RawMessage(mail_from=env.mail_from, rcpt_to=env.rcpt_to, content=env.content),
        delivery=request.delivery,
    )
    return email, []
