"""TLS material for gRPC, read once at start-up: this process's certificate and key, and the CA
that verifies its peers.

Each file is read and checked with the standard ``ssl`` module before grpc sees it (a PEM that
does not parse, a key that does not match its certificate, an encrypted key), so a bad file
stops the service at start-up with a message naming it, never at the first handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file and why."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{what} {path}: cannot read it: {e.strerror or e}") from None
    if not data.strip():
        raise TlsError(f"{what} {path}: the file is empty")
    return data


def _no_password() -> str:
    raise TlsError("the key is encrypted; give an unencrypted PEM key (readable by this service only)")


def _check_pair(cert: str | Path, key: str | Path, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except TlsError as e:
        raise TlsError(f"{what} key {key}: {e}") from None
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(e) else e.reason
        raise TlsError(f"{what} {cert} with key {key}: {reason or e}") from None


def _check_ca(ca: str | Path, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TlsError(f"{what} {ca}: no PEM certificate in it ({e.reason or e})") from None


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents: ``cert`` and ``key`` (both or neither) and ``ca``."""

    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # never in a log line
    ca: bytes | None = None

    @classmethod
    def read(
        cls,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None,
        names: tuple[str, str, str] = ("certificate", "key", "CA"),
    ) -> TlsFiles:
        """Read and check the files given; ``names`` are how messages call them."""
        cert_name, key_name, ca_name = names
        if bool(cert) != bool(key):
            given, missing = (cert_name, key_name) if cert else (key_name, cert_name)
            raise TlsError(f"{given} given without {missing}: give both, or neither for plaintext")
        pem_cert = pem_key = pem_ca = None
        if cert and key:
            pem_cert, pem_key = _read(cert, cert_name), _read(key, key_name)
            _check_pair(cert, key, cert_name)
        if ca:
            pem_ca = _read(ca, ca_name)
            _check_ca(ca, ca_name)
        return cls(pem_cert, pem_key, pem_ca)

    @property
    def has_identity(self) -> bool:
        return self.cert is not None and self.key is not None

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """TLS with this certificate; with ``require_client_auth``, only clients whose certificate
        the CA signed get a connection (mTLS)."""
        assert self.cert is not None and self.key is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS verifying the server with the CA, presenting this certificate when there is one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.key if self.has_identity else None,
            certificate_chain=self.cert if self.has_identity else None,
        )
