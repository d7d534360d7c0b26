"""Attachments: which content types they may declare, and the file names they are rendered with.

A content type is ``type "/" subtype``: two RFC 2045 tokens of at most 127 characters each
(RFC 6838 4.2), compared case-insensitively, without parameters; empty means
application/octet-stream. ``multipart/*`` and ``message/*`` are refused: the renderer attaches
content as base64 bytes, which those types may not be (RFC 2046 5.1.1, 5.2.1).

A file name is rendered sanitised (``safe_filename``): only what follows its last ``/`` or ``\\``
(a receiver must not be told a directory), without control characters, line or paragraph
separators or bidirectional controls (which can disguise an extension), trimmed of surrounding
whitespace, and cut to ``MAX_FILENAME`` octets of UTF-8 keeping a short extension. Non-ASCII
names are written as RFC 2231 parameters (raw UTF-8 in a message that is SMTPUTF8 anyway).
A name that is empty once sanitised (``"../"``, ``".."``) is refused by validation.
"""

from __future__ import annotations

import re

DEFAULT_CONTENT_TYPE = "application/octet-stream"
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]{1,127}"
CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})\Z")
_BUILT_BY_THE_RENDERER = frozenset({"multipart", "message"})

# A common limit of file systems for one name.
MAX_FILENAME = 255
_MAX_KEPT_EXTENSION = 16
_DROPPED = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_DIRECTORIES = re.compile(r".*[/\\]", re.DOTALL)


def content_type_problem(content_type: str) -> str | None:
    """Why ``content_type`` (not empty) cannot be an attachment's; None when it can."""
    m = CONTENT_TYPE.match(content_type)
    if m is None:
        return "is not a MIME type: type/subtype, RFC 2045 tokens, without parameters"
    if m[1].lower() in _BUILT_BY_THE_RENDERER:
        return (
            f"is a {m[1].lower()} type, which the renderer builds itself; "
            f"attach the content as {DEFAULT_CONTENT_TYPE}"
        )
    return None


def mime_type(content_type: str) -> tuple[str, str]:
    """The (maintype, subtype) an attachment is rendered with, lower-case."""
    maintype, _, subtype = (content_type or DEFAULT_CONTENT_TYPE).lower().partition("/")
    return maintype, subtype


def safe_filename(filename: str) -> str:
    """``filename`` as it is rendered; empty when nothing of it is left (see the module's doc)."""
    name = _DIRECTORIES.sub("", _DROPPED.sub("", filename)).strip()
    if name in (".", ".."):
        return ""
    data = name.encode("utf-8")
    if len(data) <= MAX_FILENAME:
        return name
    stem, dot, extension = name.rpartition(".")
    kept = (dot + extension).encode("utf-8") if stem and len(extension) <= _MAX_KEPT_EXTENSION else b""
    cut = data[: MAX_FILENAME - len(kept)].decode("utf-8", "ignore").rstrip()
    return cut + kept.decode("utf-8")
