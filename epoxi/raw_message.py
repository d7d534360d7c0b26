"""Raw RFC 5322 messages (``Email.raw``): the rules their bytes and envelope follow, and what is
read from their header section.

A raw message is relayed as its author wrote it and never rendered. The only change made to its
bytes is to line ends (``canonical``): a bare LF becomes CRLF, and a message not ending in CRLF
gets one, as SMTP's DATA would add it anyway; so what the node spools is what the receiving
server gets (SMTP dot-stuffing is only on the wire). A bare CR, a NUL, a line longer than 998
octets (RFC 5322 2.1.1) or content without a header section is refused (``content_problem``).

Header fields are read as bytes and decoded as UTF-8 (RFC 6532), never rewritten: the Message-ID
(``message_id``), the From/To/Cc/Bcc addresses (``addresses``, for an envelope taken from the
header, as ``sendmail -t`` takes it: ``envelope``), and the Bcc field removed from such a
message (``without_bcc``).
"""

from __future__ import annotations

import email.headerregistry
import email.policy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email import errors

from epoxi.address import addr_spec, address_problem
from epoxi.message_id import message_id_problem

MAX_LINE = 998  # octets, without the CRLF
NULL_PATH = "<>"
# A header field's first line: its name (printable ASCII but ":") and the colon.
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def canonical(content: bytes) -> bytes:
    """``content`` with CRLF line ends: a bare LF becomes CRLF, and a final CRLF is added when
    missing. Content that has them already is returned as it is (the common case, one scan)."""
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf:
        content = _BARE_LF.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def header_end(content: bytes) -> int:
    """Where the header section ends: at the first empty line, else at the end."""
    m = _HEADER_END.search(content)
    return len(content) if m is None else m.start()


def content_problem(content: bytes) -> str | None:
    """Why ``content`` cannot be relayed; None when it can. Line ends may be bare LF (they are
    made CRLF by ``canonical``)."""
    if not content:
        return "is empty"
    if _FIELD.match(content) is None:
        return "does not start with a header field (name, colon, value): it has no header section"
    if (m := _BARE_CR.search(content)) is not None:
        return f"has a CR not followed by LF at octet {m.start()}"
    if (i := content.find(b"\0")) >= 0:
        return f"has a NUL at octet {i}"
    if (m := _LONG_LINE.search(content)) is not None:
        return f"has a line longer than {MAX_LINE} octets at octet {m.start()} (RFC 5322 2.1.1)"
    head = content[: header_end(content)]
    for n, line in enumerate(head.split(b"\n")):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation
        if _FIELD.match(line) is None:
            return f"has a header line {n + 1} that is neither a field nor a continuation"
    return None


def fields(content: bytes) -> Iterator[tuple[str, str]]:
    """The header fields of ``content``: each name as written and its value unfolded (UTF-8,
    undecodable octets replaced), in order."""
    head = content[: header_end(content)].decode("utf-8", errors="replace")
    name, value = "", ""
    for line in re.split(r"\r?\n", head):
        if line[:1] in (" ", "\t") and name:
            value += line
            continue
        if name:
            yield name, value.strip()
        name, _, value = line.partition(":")
        name = name.rstrip(" \t")
    if name:
        yield name, value.strip()


def message_id(content: bytes) -> str:
    """The Message-ID field's msg-id (``epoxi.message_id``'s rules), or "" when there is none
    or it is not one the router can key by."""
    for name, value in fields(content):
        if name.lower() == "message-id":
            return value if message_id_problem(value) is None else ""
    return ""


def addresses(content: bytes, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The addr-specs in the fields ``names`` (lower-case, e.g. ``("to", "cc", "bcc")``), in
    order, and the problems found (each naming the field)."""
    found: list[str] = []
    problems: list[str] = []
    for name, value in fields(content):
        lower = name.lower()
        if lower not in names:
            continue
        header = _ADDRESS_FIELDS(lower, value)
        if not isinstance(header, email.headerregistry.AddressHeader):
            continue
        parsed = [a.addr_spec for a in header.addresses]
        # A UTF-8 local part is RFC 6532's, not a defect here.
        defects = [d for d in header.defects if not isinstance(d, errors.NonASCIILocalPartDefect)]
        if defects or any(not a or address_problem(a) is not None for a in parsed):
            problems.append(f"the {name} field {value[:100]!r} is not a list of email addresses")
            continue
        found += [addr_spec(a) for a in parsed]
    return found, problems


_ADDRESS_FIELDS = email.headerregistry.HeaderRegistry()


def without_bcc(content: bytes) -> bytes:
    """``content`` without its Bcc fields (with their continuation lines); the rest unchanged."""
    m = _HEADER_END.search(content)
    # The header section with its last line's end, and what follows (the empty line, the body).
    cut = len(content) if m is None else m.start() + (2 if content[m.start() : m.start() + 1] == b"\r" else 1)
    lines = content[:cut].splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = _BCC.match(line) is not None
        if not dropping:
            kept.append(line)
    if len(kept) == len(lines):
        return content
    return b"".join(kept) + content[cut:]


_BCC = re.compile(rb"(?i)bcc[ \t]*:")


@dataclass(frozen=True)
class Envelope:
    """A message's envelope as ``sendmail -t`` takes it (``envelope``), and what stands in its way."""

    mail_from: str
    rcpt_to: list[str]
    content: bytes  # without its Bcc fields when the recipients came from the header
    sender_problems: list[str]  # why no sender could be taken from the From field
    recipient_problems: list[str]  # why no recipients could be taken from To, Cc and Bcc


def envelope(content: bytes, mail_from: str | None, rcpt_to: Sequence[str]) -> Envelope:
    """``mail_from`` (``"<>"``: the null reverse-path), else the one address of the From field;
    ``rcpt_to``, else every address of the To, Cc and Bcc fields, each once, in order, and then
    the Bcc fields are removed, so the other recipients do not see them."""
    sender_problems: list[str] = []
    if mail_from is not None:
        sender = "" if mail_from == NULL_PATH else mail_from
    else:
        senders, sender_problems = addresses(content, ("from",))
        if len(senders) != 1 and not sender_problems:
            sender_problems.append(f"the From field has {len(senders)} addresses")
        sender = senders[0] if senders else ""
    recipients = list(rcpt_to)
    recipient_problems: list[str] = []
    if not recipients:
        found, recipient_problems = addresses(content, ("to", "cc", "bcc"))
        recipients = list(dict.fromkeys(found))
        if not recipients and not recipient_problems:
            recipient_problems.append("the To, Cc and Bcc fields have no address")
        content = without_bcc(content)
    return Envelope(sender, recipients, content, sender_problems, recipient_problems)
