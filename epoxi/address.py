"""Mail addresses: the addr-spec of a mailbox, and whether it is one we can send to."""

from __future__ import annotations

import email.utils
import re

# RFC 5321 limits: 64 octets local part, 255 domain; a practical dot-atom check, not full RFC 5322.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_ADDR = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# A bare dot-atom addr-spec: what parseaddr would return unchanged.
_PLAIN_ADDR = re.compile(rf"{_DOT_ATOM_ADDR}\Z")
# The same in angle brackets, after an optional display name of atoms with single spaces
# ("Ann Lee <a@example.org>", "<a@example.org>"): parseaddr returns what the brackets hold.
_DISPLAY_NAME = rf"{_ATEXT}+(?: {_ATEXT}+)*"
_NAMED_ADDR = re.compile(rf"(?:{_DISPLAY_NAME} )?<({_DOT_ATOM_ADDR})>\Z")
# Those two shapes when address_problem finds nothing wrong with them: a local part of at most
# 64 characters, and at least two labels of 1-63 characters (no "-" first or last) in at most 255.
_LABEL_RE = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"


def _valid_addr(end: str) -> str:
    local = rf"(?=[^@]{{1,64}}@){_ATEXT}+(?:\.{_ATEXT}+)*"
    return rf"{local}@(?=[A-Za-z0-9.-]{{1,255}}{end}){_LABEL_RE}(?:\.{_LABEL_RE})+{end}"


_VALID_PLAIN = re.compile(_valid_addr(r"\Z"))
_VALID_NAMED = re.compile(rf"(?:{_DISPLAY_NAME} )?<" + _valid_addr(r">\Z"))


def addr_spec(mailbox: str) -> str:
    """The addr-spec of ``mailbox`` (``"Ann <a@x.org>"`` → ``"a@x.org"``); empty when unparsable."""
    # The common shapes first: parseaddr costs most of the router's CPU. Both shortcuts agree
    # with _parsed_addr_spec (tests/epoxi/test_address.py checks a table and random mailboxes).
    if _PLAIN_ADDR.match(mailbox):
        return mailbox
    if (m := _NAMED_ADDR.match(mailbox)) is not None:
        return m[1]
    return _parsed_addr_spec(mailbox)


def _parsed_addr_spec(mailbox: str) -> str:
    """``addr_spec`` by ``email.utils.parseaddr``: any mailbox."""
    if "\r" in mailbox or "\n" in mailbox:
        return ""
    _, addr = email.utils.parseaddr(mailbox)
    # parseaddr quietly repairs some malformed input ("a@exa mple.org"); accept only what it kept whole.
    written = mailbox[mailbox.find("<") + 1 : mailbox.rfind(">")] if "<" in mailbox else mailbox
    return addr if addr == written.strip() else ""


def address_problem(mailbox: str) -> str | None:
    """Why ``mailbox`` is not an address we can send to; None when it is."""
    if _VALID_PLAIN.match(mailbox) or _VALID_NAMED.match(mailbox):
        return None  # the common shapes, checked in one match (the same verdict as below)
    return _checked_problem(mailbox)


def _checked_problem(mailbox: str) -> str | None:
    """``address_problem`` step by step: any mailbox."""
    addr = addr_spec(mailbox)
    if not addr or "@" not in addr:
        return "is not an email address"
    local, _, domain = addr.rpartition("@")
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return "has an invalid local part"
    labels = domain.split(".")
    if len(domain) > 255 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "has an invalid domain"
    return None
