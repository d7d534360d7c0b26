"""Mail addresses: the addr-spec of a mailbox, and whether it is one we can send to.

Internationalised addresses are accepted (RFC 6531, SMTPUTF8): a domain in Unicode is an IDN,
valid when IDNA 2008 (with the UTS 46 mapping) gives it an A-label, and it is routed, put in
the envelope and written in headers by that A-label (``a_label``), so ``user@bücher.de`` and
``user@xn--bcher-kva.de`` are one destination. A local part may hold UTF-8 beyond ASCII; such an
address can only travel as SMTPUTF8 (``needs_smtputf8``). ASCII mailboxes keep to the regex
shortcuts below: only non-ASCII input pays for the IDNA path.
"""

from __future__ import annotations

import email.utils
import functools
import re

import idna

# RFC 5321 limits: 64 octets local part, 255 domain; a practical dot-atom check, not full RFC 5322.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# RFC 5322 3.2.3 atext, and a dot-atom of it: one home for every module that matches them.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM = rf"{ATEXT}+(?:\.{ATEXT}+)*"
_ATEXT = ATEXT
# RFC 6531 3.3: atext with UTF-8 beyond ASCII (printable: checked apart, see _utf8_local_problem).
_UTF8_LOCAL = re.compile(rf"(?:{_ATEXT}|[^\x00-\x7f])+(?:\.(?:{_ATEXT}|[^\x00-\x7f])+)*\Z")
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
# Line breaks and other controls (but TAB) that no header may carry; U+2028 and U+2029 too, which
# some readers (and the email package) take for line breaks.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

# The longest mailbox, in UTF-8 octets: an addr-spec of up to 320 (RFC 5321 4.5.3.1) and a
# display name; with its quoting (at most doubling the name) it still fits one 998-octet line.
MAX_MAILBOX = 400
_MAX_IDNA_REASON = 100


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
    # parseaddr quietly repairs some malformed input ("a@exa mple.org") and drops what follows
    # the brackets ("Ann <a@x.org> b@y.org"): accept only what it kept whole, and ends the mailbox.
    if "<" not in mailbox:
        return addr if addr == mailbox.strip() else ""
    end = mailbox.rfind(">")
    if mailbox[end + 1 :].strip():
        return ""
    return addr if addr == mailbox[mailbox.find("<") + 1 : end].strip() else ""


def display_name(mailbox: str) -> str:
    """The display name of ``mailbox`` (``"Ann <a@x.org>"`` → ``"Ann"``), unquoted; may be empty."""
    return email.utils.parseaddr(mailbox)[0]


def a_label(domain: str) -> str:
    """``domain`` as DNS and SMTP name it: lower-cased ASCII, an IDN by its A-labels
    (``"Bücher.de"`` → ``"xn--bcher-kva.de"``); ValueError (``idna.IDNAError``) for an invalid IDN."""
    if domain.isascii():
        return domain.lower()
    return _idna_a_label(domain)


@functools.lru_cache(maxsize=4096)
def _idna_a_label(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii")


def envelope_address(mailbox: str) -> str:
    """The addr-spec of ``mailbox`` as the SMTP envelope and the headers carry it: the local part
    as written, the domain an A-label when it is an IDN (ASCII domains keep their case)."""
    addr = addr_spec(mailbox)
    if addr.isascii():
        return addr
    local, at, domain = addr.rpartition("@")
    if not at or domain.isascii():
        return addr
    try:
        return f"{local}@{_idna_a_label(domain)}"
    except UnicodeError:  # not an address validation accepts
        return addr


def domain_of(mailbox: str) -> str:
    """The domain of an addr-spec or ``Name <addr-spec>`` mailbox, as routing names it: lower-case,
    an IDN by its A-label."""
    # What follows the last "@" of a mailbox address_problem accepts: the domain, then perhaps
    # spaces, ">" and spaces.
    domain = mailbox.rpartition("@")[2].strip().rstrip(">").strip()
    if domain.isascii():
        return domain.lower()
    try:
        return _idna_a_label(domain)
    except UnicodeError:  # not an address validation accepts
        return domain.lower()


def needs_smtputf8(address: str) -> bool:
    """Whether ``address`` (a mailbox or an addr-spec) can only be sent as SMTPUTF8 (RFC 6531):
    its local part is not ASCII. An IDN domain alone does not need it: its A-label is ASCII."""
    if address.isascii():
        return False
    return not addr_spec(address).rpartition("@")[0].isascii()


def address_problem(mailbox: str) -> str | None:
    """Why ``mailbox`` is not an address we can send to; None when it is."""
    if len(mailbox) <= MAX_MAILBOX and (_VALID_PLAIN.match(mailbox) or _VALID_NAMED.match(mailbox)):
        return None  # the common shapes, checked in one match (the same verdict as below)
    return _checked_problem(mailbox)


def _checked_problem(mailbox: str) -> str | None:
    """``address_problem`` step by step: any mailbox."""
    if len(mailbox) > MAX_MAILBOX or len(mailbox.encode("utf-8", "surrogatepass")) > MAX_MAILBOX:
        return f"is longer than {MAX_MAILBOX} octets"
    if (c := _CONTROL.search(mailbox)) is not None:
        return f"contains the control character U+{ord(c[0]):04X}"
    addr = addr_spec(mailbox)
    if not addr or "@" not in addr:
        return "is not an email address"
    local, _, domain = addr.rpartition("@")
    if local.isascii():
        if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
            return "has an invalid local part"
    elif (p := _utf8_local_problem(local)) is not None:
        return p
    if not domain.isascii():
        try:
            domain = _idna_a_label(domain)
        except UnicodeError as e:
            reason = str(e) if len(str(e)) <= _MAX_IDNA_REASON else str(e)[:_MAX_IDNA_REASON] + "..."
            return f"has an invalid internationalised domain (IDNA 2008: {reason})"
    labels = domain.split(".")
    if len(domain) > 255 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "has an invalid domain"
    return None


def _utf8_local_problem(local: str) -> str | None:
    """Why ``local``, not ASCII, is not an RFC 6531 dot-atom of at most 64 octets; None when it is."""
    if not _UTF8_LOCAL.match(local) or len(local.encode("utf-8", "surrogatepass")) > 64:
        return "has an invalid local part"
    if not all(c.isprintable() for c in local if not c.isascii()):
        return "has an invalid local part (an invisible or unassigned character)"
    return None
