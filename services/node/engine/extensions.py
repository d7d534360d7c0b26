"""The SMTP extensions a message needs from the server, and the node's own bounce when it lacks them.

SMTPUTF8 (RFC 6531) is needed for a non-ASCII envelope address (a UTF-8 local part: domains
travel as A-labels) or a non-ASCII header section (RFC 6532); with it, MAIL carries the
``SMTPUTF8`` parameter and the addresses go as UTF-8. 8BITMIME (RFC 6152) is needed for content
with octets above 127, announced as ``BODY=8BITMIME``. The renderer writes 7bit,
quoted-printable or base64 bodies, so only a UTF-8 header, or a DSN's UTF-8 delivery status
(RFC 6533), makes content 8-bit.

The node does not downgrade: what the server cannot take as it is bounces at once (no retry
would change the server's extensions), with the RFC 3463 codes registered for it (RFC 5248,
RFC 6533):

- 5.6.7 "Non-ASCII addresses not permitted for that sender/recipient": the sender's or this
  recipient's address is not ASCII, and the server does not offer SMTPUTF8;
- 5.6.9 "UTF-8 header message cannot be transferred to one or more recipients": the addresses
  are ASCII, the header section is not, and the server does not offer SMTPUTF8;
- 5.6.3 "Conversion required but not supported": the body has 8-bit octets and the server does
  not offer 8BITMIME.

Only the recipients that need what is missing bounce: one whose own address is the only
non-ASCII part of the message (a UTF-8 Bcc) leaves the others to go without SMTPUTF8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.node.engine.reply import Reply

NON_ASCII_ADDRESS = "5.6.7"
UTF8_HEADER = "5.6.9"
EIGHT_BIT_BODY = "5.6.3"

# Whether the server offers an extension, by its lower-case EHLO keyword.
Offers = Callable[[str], bool]


def header_end(data: bytes) -> int:
    """Where the header section of ``data`` ends: at its first empty line, else at the end."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends, default=len(data))


@dataclass(frozen=True)
class Needs:
    """What one message (its envelope and content) needs from the server."""

    sender: str
    utf8_sender: bool
    utf8_recipients: frozenset[str]
    utf8_header: bool
    eight_bit_body: bool

    @classmethod
    def of(cls, sender: str, recipients: Sequence[str], data: bytes) -> Needs:
        utf8_recipients = frozenset(r for r in recipients if not r.isascii())
        if data.isascii():  # the common case: one scan
            return cls(sender, not sender.isascii(), utf8_recipients, False, False)
        end = header_end(data)
        return cls(
            sender, not sender.isascii(), utf8_recipients, not data[:end].isascii(), not data[end:].isascii()
        )

    @property
    def smtputf8(self) -> bool:
        return self.utf8_sender or self.utf8_header or bool(self.utf8_recipients)

    @property
    def eight_bit(self) -> bool:
        return self.utf8_header or self.eight_bit_body

    def refusal(self, recipient: str, offers: Offers, host: str) -> Reply | None:
        """The node's permanent reply for ``recipient`` when ``host`` (which ``offers`` these
        extensions) cannot take the message for it as it is; None when it can."""
        if not offers("smtputf8"):
            if self.utf8_sender:
                return _refused(NON_ASCII_ADDRESS, f"the sender {self.sender}", host)
            if recipient in self.utf8_recipients:
                return _refused(NON_ASCII_ADDRESS, f"the recipient {recipient}", host)
            if self.utf8_header:
                return _refused(UTF8_HEADER, "the message's UTF-8 header", host)
        if self.eight_bit_body and not offers("8bitmime"):
            return Reply.local(
                f"{host} does not offer 8BITMIME, which the message's 8-bit body needs", EIGHT_BIT_BODY
            )
        return None

    def sent_with(self, recipients: Sequence[str], offers: Offers) -> tuple[list[str], str]:
        """The MAIL parameters and the address encoding for a transaction to ``recipients``, none
        of them refused."""
        utf8 = self.utf8_sender or self.utf8_header or any(r in self.utf8_recipients for r in recipients)
        options = ["BODY=8BITMIME"] if self.eight_bit and offers("8bitmime") else []
        if utf8:
            options.append("SMTPUTF8")
        return options, "utf-8" if utf8 else "ascii"


def _refused(enhanced: str, what: str, host: str) -> Reply:
    return Reply.local(f"{host} does not offer SMTPUTF8, which {what} needs", enhanced)
