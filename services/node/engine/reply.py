"""An SMTP reply, parsed once where it arrives: its code, its RFC 3463 enhanced code, its text.

A failure with no server reply (no connection, a lost connection, DNS) is a reply of the node's
own: code 0 and an enhanced code of its choosing (``Reply.local``), whose class decides: 5.x.x
bounces (mail the server cannot take as it is), anything else is tried again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3463 status codes for failures with no SMTP reply.
NO_ANSWER = "4.4.1"
BAD_CONNECTION = "4.4.2"
ROUTING_FAILURE = "4.4.3"

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@dataclass(frozen=True)
class Reply:
    """What the server (or, with code 0, the node) said about one recipient."""

    code: int
    enhanced: str  # the RFC 3463 code that led the text; "" when there was none
    text: str  # the rest of the text
    host: str = ""  # the host that replied; empty when no server did

    @classmethod
    def parse(cls, code: int, text: str, host: str = "") -> Reply:
        """The reply ``code`` ``text``: an enhanced code leads the text when its class is the
        code's first digit (RFC 3463); a code 0 reply (the node's own) may lead with any."""
        if not text.isascii():
            # The client keeps octets that are not UTF-8 as surrogates, which the spool (UTF-8)
            # cannot store: they become U+FFFD.
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        m = _ENHANCED.match(text)
        if m is None or (code and code // 100 != int(m.group(1))):
            return cls(code, "", text, host)
        return cls(code, ".".join(m.groups()), text[m.end() :], host)

    @classmethod
    def local(cls, text: str, enhanced: str = NO_ANSWER) -> Reply:
        """A failure with no SMTP reply (connection refused, timeout, lost connection, DNS failure),
        or the node's own refusal (a 5.x.x ``enhanced`` code: permanent)."""
        return cls(0, enhanced, text)

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx, or the node's own 5.x.x: the recipient bounces now."""
        return 500 <= self.code < 600 or (self.code == 0 and self.enhanced.startswith("5."))

    @property
    def temporary(self) -> bool:
        """4xx, or no reply at all (unless the node's own is 5.x.x): try again later."""
        return not (self.accepted or self.permanent)

    @property
    def status_code(self) -> str:
        """The RFC 3463 status: the enhanced code, else one derived from the reply's class."""
        if self.enhanced:
            return self.enhanced
        return "2.0.0" if self.accepted else "5.0.0" if self.permanent else "4.0.0"

    @property
    def line(self) -> str:
        """The text with its enhanced code in front, as the server sent it (up to whitespace)."""
        return " ".join(filter(None, (self.enhanced, self.text)))
