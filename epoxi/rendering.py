"""RFC 5322 rendering of an Email: written directly for the common shape, with the standard
library's ``email`` package for the rest.

What ``epoxi.validation.validate`` accepts renders, and parses back to the same fields
(tests/epoxi/test_contract.py checks it on generated emails). Addresses are written with an IDN
domain as its A-label, so a message stays ASCII unless an address it shows has a UTF-8 local
part: then its header is UTF-8 (RFC 6532) and it can only be sent as SMTPUTF8.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.policy
import email.utils
import functools
import hashlib
import random
import re
import time
from collections.abc import Sequence
from email.message import EmailMessage

from epoxi import header_fields
from epoxi.address import ATEXT as _ATEXT
from epoxi.address import DOT_ATOM as _DOT_ATOM
from epoxi.address import envelope_address, needs_smtputf8
from epoxi.attachments import mime_type, safe_filename
from epoxi.header_lines import address_field, folded_text, text_field
from epoxi.v1 import email_pb2

# cte_type 7bit: bodies go quoted-printable or base64, never 8bit, so a message with an ASCII
# header needs no 8BITMIME (the node bounces 8-bit mail to a server without it: 5.6.3).
_SMTP_POLICY = email.policy.SMTP.clone(max_line_length=78, cte_type="7bit")
_SMTPUTF8_POLICY = _SMTP_POLICY.clone(utf8=True)


def _id_domain(sender: str) -> str:
    domain = envelope_address(sender).rpartition("@")[2]
    return domain if domain and domain.isascii() else "epoxi.invalid"


def new_message_id(sender: str) -> str:
    """A random Message-ID, for an email rendered without one."""
    return email.utils.make_msgid(domain=_id_domain(sender))


class DerivedMessageIds:
    """Message-IDs derived from emails' content, for the emails of one request that have none.

    The ID is ``<{hex}@{sender's domain}>``: 128 bits of the SHA-256 of the email serialized
    (deterministically; its message_id is empty) followed by its occurrence number among the
    identical emails seen so far (8 bytes), so the same request (for a raw email: the same
    content and envelope) sent again names the same
    messages, and two identical emails in one request still get two IDs. About as long as
    ``new_message_id``'s, within ``validation.MESSAGE_ID_ALLOWANCE`` for any sender domain.
    """

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}

    def derive(self, e: email_pb2.Email) -> str:
        return self.derive_encoded(e, e.SerializeToString(deterministic=True))

    def derive_encoded(self, e: email_pb2.Email, encoded: bytes) -> str:
        """``derive``, for ``e`` already serialized deterministically as ``encoded``."""
        content = hashlib.sha256(encoded)
        identity = content.digest()  # the state goes on: digest() does not finalise it
        occurrence = self._seen.get(identity, 0)
        self._seen[identity] = occurrence + 1
        content.update(occurrence.to_bytes(8, "big"))
        sender = getattr(e, "from") or e.raw.mail_from  # a raw email's envelope sender
        return f"<{content.hexdigest()[:32]}@{_id_domain(sender)}>"


def render(e: email_pb2.Email) -> bytes:
    """The RFC 5322 message for ``e`` (Bcc is never written), with CRLF line endings.

    The common shape goes through ``render_fast``; whatever it cannot prove safe goes through
    ``render_slow``. Either way body lines are left as they are when they start with "." (SMTP
    dot-stuffing is the client's job) or "From " (quoting for mbox is the mailbox's job).
    """
    data = render_fast(e)
    return data if data is not None else render_slow(e)


def render_slow(e: email_pb2.Email) -> bytes:
    """``render`` with the standard library's ``email`` package: any email, 1-2 ms each.

    The package builds the MIME body (and writes the attachments' file names, RFC 2231 where
    they need it); the header fields are written by ``epoxi.header_lines`` (addresses, text) and
    directly (Date, Message-ID), so the package parses none of them. The header is UTF-8 when
    an address it shows has a UTF-8 local part, else ASCII.
    """
    sender: str = getattr(e, "from")
    to, cc, reply_to, headers = e.to, e.cc, e.reply_to, e.headers
    written = [sender, *to, *cc, reply_to, *(h.value for h in headers if _is_sender(h))]
    utf8 = any(needs_smtputf8(m) for m in written)
    lines = [address_field("From", [sender], utf8)]
    for name, mailboxes in (("To", to), ("Cc", cc), ("Reply-To", [reply_to] if reply_to else [])):
        if mailboxes:
            lines.append(address_field(name, mailboxes, utf8))
    lines.append(text_field("Subject", e.subject, utf8))
    lines.append(b"Date: " + _date(int(time.time())).encode("ascii"))
    lines.append(b"Message-ID: " + (e.message_id or new_message_id(sender)).encode("ascii"))
    for h in headers:
        if _is_sender(h):
            lines.append(address_field(h.name, [h.value], utf8))
        else:
            lines.append(text_field(h.name, h.value, utf8))
    body = EmailMessage(policy=_SMTPUTF8_POLICY if utf8 else _SMTP_POLICY)
    if e.text or not e.html:
        body.set_content(e.text)
        if e.html:
            body.add_alternative(e.html, subtype="html")
    else:
        body.set_content(e.html, subtype="html")
    for a in e.attachments:
        maintype, subtype = mime_type(a.content_type)
        body.add_attachment(a.content, maintype=maintype, subtype=subtype, filename=safe_filename(a.filename))
    # The body's own header (MIME-Version, Content-Type, Content-Transfer-Encoding) follows ours.
    return b"\r\n".join(lines) + b"\r\n" + body.as_bytes()


def _is_sender(h: email_pb2.Header) -> bool:
    return h.name.lower() == header_fields.SENDER


# The fast path writes the message directly, and only for input it can write without encoding:
# mailboxes of a plain ASCII shape, header values of printable ASCII (RFC 2047 encoding is the
# slow path's job), no attachments, and no extra header but plain text ones.
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_QTEXT = r"[!#-\[\]-~]+"  # printable ASCII less '"' and '\'
_DISPLAY_NAME = rf"(?:{_ATEXT}+(?: {_ATEXT}+)*|\"{_QTEXT}(?: {_QTEXT})*\")"
# "a@example.org", "<a@example.org>", 'Ann Lee <a@example.org>' or '"Lee, Ann" <a@example.org>';
# the group holds the domain, for a generated Message-ID.
_PLAIN_MAILBOX = re.compile(rf"(?:{_DOT_ATOM}@({_DOMAIN})|(?:{_DISPLAY_NAME} )?<{_DOT_ATOM}@({_DOMAIN})>)")
_PLAIN_MSG_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
_MAX_HEADER_LINE = 78  # RFC 5322 2.1.1 SHOULD; longer only for a word that cannot be folded
_MAX_LINE = 998  # RFC 5322 2.1.1 MUST, in octets, without the CRLF
_PLAIN = b'Content-Type: text/plain; charset="utf-8"'
_HTML = b'Content-Type: text/html; charset="utf-8"'


def render_fast(e: email_pb2.Email) -> bytes | None:
    """``render`` written directly (30-100x faster, benchmarks/render.py); None when ``e`` needs the slow path.

    Taken when: no attachments; From, To, Cc and Reply-To are plain mailboxes (an addr-spec, with
    an optional display name of atoms or a simple quoted string); Subject and the extra headers
    are printable ASCII and the extra headers are fields of text (not Sender, nor any that
    validation refuses); the Message-ID, when given, is a plain ``<id@right>``;
    and every header line fits in 998 octets (78 when folding at spaces or commas allows it).
    Bodies may hold any text: 7bit when ASCII with lines of at most 998 octets, otherwise
    quoted-printable (or base64 when that is shorter).
    """
    if e.attachments:
        return None
    sender: str = getattr(e, "from")
    from_match = _PLAIN_MAILBOX.fullmatch(sender)
    if from_match is None or len("From: " + sender) > _MAX_HEADER_LINE:
        return None
    lines = ["From: " + sender]
    for name, addresses in (("To", e.to), ("Cc", e.cc)):
        if addresses:
            folded = _fold_addresses(name + ": ", addresses)
            if folded is None:
                return None
            lines.append(folded)
    if e.reply_to:
        if _PLAIN_MAILBOX.fullmatch(e.reply_to) is None or len("Reply-To: " + e.reply_to) > _MAX_HEADER_LINE:
            return None
        lines.append("Reply-To: " + e.reply_to)
    subject = _fold_unstructured("Subject: ", e.subject)
    if subject is None:
        return None
    lines.append(subject)
    lines.append("Date: " + _date(int(time.time())))
    if e.message_id:
        if _PLAIN_MSG_ID.fullmatch(e.message_id) is None or len("Message-ID: " + e.message_id) > _MAX_LINE:
            return None
        lines.append("Message-ID: " + e.message_id)
    else:
        lines.append("Message-ID: " + email.utils.make_msgid(domain=from_match[1] or from_match[2]))
    for h in e.headers:
        # Only fields of plain text: not Sender, nor any validation refuses (Content-*, ...).
        if header_fields.name_problem(h.name) is not None or h.name.lower() == header_fields.SENDER:
            return None
        header = _fold_unstructured(h.name + ": ", h.value)
        if header is None:
            return None
        lines.append(header)
    lines.append("MIME-Version: 1.0")
    if e.text and e.html:
        text_cte, text = _encode_body(e.text)
        html_cte, html = _encode_body(e.html)
        boundary = _boundary(text, html)
        dash = b"--" + boundary.encode("ascii")
        lines.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')
        head = "\r\n".join(lines).encode("ascii")
        # The CRLF before a delimiter belongs to it (RFC 2046 5.1.1); each body ends in its own
        # CRLF, kept like render_slow keeps it.
        return b"".join(
            (
                *(head, b"\r\n\r\n", dash, b"\r\n"),
                *(_PLAIN, b"\r\n", text_cte, b"\r\n\r\n", text, b"\r\n", dash, b"\r\n"),
                *(_HTML, b"\r\n", html_cte, b"\r\n\r\n", html, b"\r\n", dash, b"--\r\n"),
            )
        )
    html_only = bool(e.html) and not e.text
    cte, data = _encode_body(e.html if html_only else e.text)
    head = "\r\n".join(lines).encode("ascii")
    return b"".join((head, b"\r\n", _HTML if html_only else _PLAIN, b"\r\n", cte, b"\r\n\r\n", data))


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _fold_addresses(prefix: str, mailboxes: Sequence[str]) -> str | None:
    """``prefix`` and the mailboxes, comma-separated, folded after commas into lines of ≤ 78."""
    for m in mailboxes:
        if _PLAIN_MAILBOX.fullmatch(m) is None:
            return None
    line = prefix + ", ".join(mailboxes)
    if len(line) <= _MAX_HEADER_LINE:
        return line
    lines: list[str] = []
    current = prefix + mailboxes[0]
    for m in mailboxes[1:]:
        if len(current) + 2 + len(m) < _MAX_HEADER_LINE:  # leave room for the "," of a fold
            current += ", " + m
        else:
            lines.append(current + ",")
            current = " " + m
    lines.append(current)
    if max(map(len, lines)) > _MAX_HEADER_LINE:
        return None
    return "\r\n".join(lines)


def _fold_unstructured(prefix: str, value: str) -> str | None:
    """``prefix`` (``"Name: "``) and ``value``, folded as ``header_lines.folded_text`` folds.

    A word too long for one line keeps a line to itself (RFC 2047 encoded-words would break it,
    and receivers do not decode them in fields such as List-Unsubscribe). None if ``value`` is
    not printable ASCII or a line would exceed 998 octets.
    """
    if not _printable(value):
        return None
    line = prefix + value
    if len(line) <= _MAX_HEADER_LINE:
        return line if value else prefix.rstrip(" ")
    lines = folded_text(prefix.rstrip(" "), value)
    if max(map(len, lines)) > _MAX_LINE:
        return None
    return "\r\n".join(lines)


def _encode_body(text: str) -> tuple[bytes, bytes]:
    """The Content-Transfer-Encoding header and the encoded body, as ``set_content`` would decode it.

    Line breaks (CRLF, CR or LF) become CRLF and the body ends with one, as in ``render_slow``.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    if text.isascii() and "\0" not in text and _lines_fit(text, _MAX_LINE):
        return b"Content-Transfer-Encoding: 7bit", text.replace("\n", "\r\n").encode("ascii")
    # Canonical text has CRLF line breaks before it is encoded (RFC 2045 6.8); b2a_qp keeps them
    # as hard breaks, breaks longer lines at 76 with "=" CRLF, and encodes trailing whitespace,
    # NUL and a lone ".".
    data = text.replace("\n", "\r\n").encode("utf-8")
    qp = binascii.b2a_qp(data)
    # The base64 length, with a CRLF per 76 characters; the smaller wins, as in render_slow.
    if len(qp) <= -(-len(data) // 3) * 4 + -(-len(data) // 57) * 2:
        return b"Content-Transfer-Encoding: quoted-printable", qp
    return b"Content-Transfer-Encoding: base64", base64.encodebytes(data).replace(b"\n", b"\r\n")


def _lines_fit(text: str, limit: int) -> bool:
    """Whether no line of ``text`` (split at "\\n") is longer than ``limit`` characters.

    It jumps from a line's start to just past the last line break within ``limit + 1``
    characters, so a 100 KB body takes about a hundred C scans instead of a list of every line;
    a window with no line break in it is a line too long."""
    pos, end = 0, len(text)
    while end - pos > limit:
        last = text.rfind("\n", pos, pos + limit + 1)
        if last < 0:
            return False
        pos = last + 1
    return True


def _boundary(*parts: bytes) -> str:
    """A multipart boundary that appears nowhere in ``parts``."""
    while True:
        boundary = f"=_{random.getrandbits(128):032x}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in p for p in parts):
            return boundary


@functools.lru_cache(maxsize=1)
def _date(second: int) -> str:
    """RFC 5322 date-time in UTC as "+0000", as render_slow writes it ("GMT" is an obsolete zone)."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))
