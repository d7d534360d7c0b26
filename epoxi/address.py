"""Mail addresses: the addr-spec of a mailbox, and whether it is one we can send to."""

from __future__ import annotations

import email.utils
import re

# RFC 5321 limits: 64 octets local part, 255 domain; a practical dot-atom check, not full RFC 5322.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# A bare dot-atom addr-spec: what parseaddr would return unchanged.
_PLAIN_ADDR = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z"
)


def addr_spec(mailbox: str) -> str:
    """The addr-spec of ``mailbox`` (``"Ann <a@x.org>"`` → ``"a@x.org"``); empty when unparsable."""
    if _PLAIN_ADDR.match(mailbox):
        return mailbox  # the common case, and parseaddr costs most of the router's CPU
    if "\r" in mailbox or "\n" in mailbox:
        return ""
    _, addr = email.utils.parseaddr(mailbox)
    # parseaddr quietly repairs some malformed input ("a@exa mple.org"); accept only what it kept whole.
    written = mailbox[mailbox.find("<") + 1 : mailbox.rfind(">")] if "<" in mailbox else mailbox
    return addr if addr == written.strip() else ""


def address_problem(mailbox: str) -> str | None:
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
