"""Header fields as the slow renderer writes them, folded: address fields and text fields.

Written here rather than by the ``email`` package, whose folder can break an address list (it
has put the comma between two mailboxes inside an encoded-word, losing the second one) and drop
spaces from text (it has put a space between two encoded-words, where readers ignore it).

Address fields (From, To, Cc, Reply-To, Sender): each mailbox is written from what
``epoxi.address`` reads in it: its display name, then its addr-spec with the domain as an
A-label. The display name is kept as atoms when it is atoms, else quoted; in an ASCII header a
name that is not printable ASCII becomes RFC 2047 encoded-words, while a UTF-8 header (``utf8``,
RFC 6532) keeps printable UTF-8 as it is. Lines fold at the spaces
between words and before ``<``, at 78 octets where the words allow; a mailbox of at most
``address.MAX_MAILBOX`` octets never needs a line over 998.

Text fields (Subject, the extra headers): printable text (ASCII, or any in a UTF-8 header) is
written as it is, folded before spaces like ``rendering.render_fast`` folds; text with TAB,
invisible characters, non-ASCII in an ASCII header or a word too long for 998 octets is written
whole as RFC 2047 encoded-words, which give it back exactly.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence

from epoxi.address import ATEXT as _ATEXT
from epoxi.address import display_name, envelope_address

_ATOMS = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*\Z")
# RFC 6532 3.2: atext also holds UTF-8 beyond ASCII.
_UTF8_ATEXT = rf"(?:{_ATEXT}|[^\x00-\x7f])"
_UTF8_ATOMS = re.compile(rf"{_UTF8_ATEXT}+(?: {_UTF8_ATEXT}+)*\Z")
_MAX_LINE = 78
_MAX_OCTETS = 998
# Fold text before a space that starts a word, so no folded line is only whitespace.
_FOLD_POINT = re.compile(r"(?= [^ ])")
# Bytes of text per encoded-word: "=?utf-8?b?" + 60 base64 characters + "?=" is 72 of the 75 allowed.
_WORD_BYTES = 45


def address_field(name: str, mailboxes: Sequence[str], utf8: bool) -> bytes:
    """The header field ``name: mailbox, mailbox, ...``, folded with CRLF, without a final CRLF."""
    words: list[str] = []
    for i, mailbox in enumerate(mailboxes):
        mailbox_words = _mailbox_words(mailbox, utf8)
        if i < len(mailboxes) - 1:
            mailbox_words[-1] += ","
        words += mailbox_words
    return _folded_words(name + ":", words).encode("utf-8" if utf8 else "ascii")


def text_field(name: str, value: str, utf8: bool) -> bytes:
    """The header field ``name: value``, folded with CRLF, without a final CRLF."""
    charset = "utf-8" if utf8 else "ascii"
    if value.isprintable() and (utf8 or value.isascii()):
        lines = folded_text(name + ":", value)
        if all(len(line.encode(charset)) <= _MAX_OCTETS for line in lines):
            return "\r\n".join(lines).encode(charset)
    return _folded_words(name + ":", _encoded_words(value)).encode("ascii")


def folded_text(prefix: str, value: str) -> list[str]:
    """``prefix`` (``"Name:"``), a space and ``value``, folded before spaces into lines of at most
    78 octets where the words allow; a word too long keeps a line to itself."""
    if not value:
        return [prefix]
    chunks = _FOLD_POINT.split(value)
    lines: list[str] = []
    current = prefix + " " + chunks[0]
    has_word = bool(chunks[0].strip(" "))  # a fold right after "Name:" would keep the spaces
    for chunk in chunks[1:]:
        if has_word and len(current.encode()) + len(chunk.encode()) > _MAX_LINE:
            lines.append(current)
            current = chunk
        else:
            current += chunk
        has_word = True
    lines.append(current)
    return lines


def _folded_words(prefix: str, words: Sequence[str]) -> str:
    """``prefix`` and ``words`` separated by spaces, folded before a word where a line would
    pass 78 octets (a line holds at least one word)."""
    lines = [prefix]
    for word in words:
        line = lines[-1]
        if len(line.encode()) + 1 + len(word.encode()) > _MAX_LINE and line != prefix:
            lines.append(" " + word)
        else:
            lines[-1] = line + " " + word
    return "\r\n".join(lines)


def _mailbox_words(mailbox: str, utf8: bool) -> list[str]:
    """The words of ``mailbox`` as written, each a place a line may fold before."""
    addr = envelope_address(mailbox) or mailbox
    name = display_name(mailbox)
    if not name:
        return [addr]
    return [*_phrase(name, utf8), f"<{addr}>"]


def _phrase(name: str, utf8: bool) -> list[str]:
    if (_UTF8_ATOMS if utf8 else _ATOMS).match(name) and all(c.isprintable() for c in name):
        return name.split(" ")
    if (utf8 or name.isascii()) and name.isprintable():
        return ['"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"']
    return _encoded_words(name)


def _encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 "B" encoded-words, each of whole characters (readers join them)."""
    words = []
    chunk = b""
    for c in text:
        data = c.encode("utf-8")
        if len(chunk) + len(data) > _WORD_BYTES:
            words.append(chunk)
            chunk = b""
        chunk += data
    words.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(w).decode('ascii')}?=" for w in words]
