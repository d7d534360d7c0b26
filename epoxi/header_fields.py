"""Extra header fields: which an email may set, and what their values may hold.

The renderer owns every field it writes or that the ``email`` package would parse as structured
(``email.headerregistry.HeaderRegistry``) and so could rewrite, drop or fail on:

- From, To, Cc, Bcc, Reply-To, Subject and Message-ID come from the email's own fields (Bcc is
  never written);
- Date and MIME-Version are the renderer's, and so is every ``Content-*`` field (Content-Type,
  Content-Transfer-Encoding, Content-Disposition, Content-ID, ...): the MIME structure follows
  from text, html and attachments;
- ``Resent-*`` fields (RFC 5322 3.6.6) are added by whoever re-introduces a delivered message;
  Orig-Date is the Date field's grammar name, which the email package parses as one;
- Return-Path is added by the server that makes the final delivery (RFC 5321 4.4).

Sender is the one structured field an email may set: at most once, and its value must be a
mailbox ``epoxi.address`` accepts, so it renders like From. Any other field name (``X-*``,
List-Unsubscribe, Received, ...) is unstructured text. A name is printable ASCII but ":", at most
76 characters (``Name:`` then fits a 78-character line); a value, like the Subject, is one line
of text: no CR or LF, nor any other control character but TAB, nor U+2028/U+2029.
"""

from __future__ import annotations

import re

NAME = re.compile(r"[!-9;-~]{1,76}\Z")
MAX_NAME = 76
SENDER = "sender"
# Written from the email's own fields: the header field's name, lower-case → the Email field.
OWN_FIELDS = {
    "from": "from",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
    "message-id": "message_id",
}
_RENDERERS = {
    "date": "is written by the renderer (the time the node renders the email)",
    "mime-version": "is written by the renderer",
    "orig-date": "is the Date field by another name; the renderer writes Date",
    "return-path": "is added by the server that delivers the message (RFC 5321 4.4); "
    "the envelope sender is the email's from",
}
_CONTENT = "is written by the renderer; set the body with text/html and attachments"
_RESENT = "is a Resent- field (RFC 5322 3.6.6), added by whoever resends a delivered message"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def name_problem(name: str) -> str | None:
    """Why an email may not set a field named ``name``; None when it may (Sender: see
    ``SENDER``, its value is checked apart)."""
    if NAME.match(name) is None:
        if len(name) > MAX_NAME and NAME.match(name[:MAX_NAME]):
            return f"is longer than {MAX_NAME} characters"
        return "is not a valid header field name (printable ASCII but ':', no spaces)"
    lower = name.lower()
    if (field := OWN_FIELDS.get(lower)) is not None:
        return f"is set from the email's own fields (its {field})"
    if (reason := _RENDERERS.get(lower)) is not None:
        return reason
    if lower.startswith("content-"):
        return _CONTENT
    if lower.startswith("resent-"):
        return _RESENT
    return None


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be one line of header text (a Subject, an extra field's value); None
    when it can."""
    if (c := _CONTROL.search(value)) is None:
        return None
    if "\r" in value or "\n" in value:
        return "contains CR or LF"
    return f"contains the control character U+{ord(c[0]):04X}"
