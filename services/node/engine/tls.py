"""STARTTLS between MTAs: opportunistic by default (RFC 7435), or required, or required and verified.

Opportunistic TLS encrypts whenever the server offers STARTTLS, without checking its certificate —
most MX hosts present self-signed or mismatched ones — and a failed handshake falls back to
plaintext. ``REQUIRED`` refuses to send in plaintext; ``VERIFY`` also checks the certificate
chain and that it names the host (the MX name, or the route's host).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from enum import StrEnum


class TlsMode(StrEnum):
    OFF = "off"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    VERIFY = "verify"


@dataclass(frozen=True)
class TlsPolicy:
    mode: TlsMode = TlsMode.OPPORTUNISTIC
    # CA certificates (PEM file) for VERIFY; None: the system's.
    cafile: str | None = None
    context: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", client_context(self.mode, self.cafile))

    @property
    def enabled(self) -> bool:
        return self.mode is not TlsMode.OFF

    @property
    def required(self) -> bool:
        return self.mode in (TlsMode.REQUIRED, TlsMode.VERIFY)


def client_context(mode: TlsMode, cafile: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile if mode is TlsMode.VERIFY else None)
    if mode is not TlsMode.VERIFY:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
