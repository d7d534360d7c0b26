"""Test PKI, built on ``devmesh.certs``: a CA, a certificate every service uses (server and client
certificate, for 127.0.0.1, ::1 and localhost), a client-only certificate, and a second CA with a
certificate of its own that the first CA does not trust.

    pki = make_pki(tmp_path / "pki")
    config = pki.security(client_auth="require")  # a SecurityConfig with the service's files
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from devmesh.certs import Issuer, issue, make_ca
from epoxi.runtime.security import SecurityConfig

__all__ = [
    "Issuer",
    "Pki",
    "issue",
    "make_ca",
    "make_pki",
    "new_token",
    "tokens_file",
    "write_ca",
    "write_cert",
]


def write_ca(ca: Issuer, path: Path) -> Path:
    path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_encrypted_key(issuer: Issuer, path: Path, password: bytes = b"secret") -> Path:
    path.write_bytes(
        issuer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return path


def write_cert(issuer: Issuer, directory: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.pem`` and ``<stem>-key.pem`` (unencrypted PKCS#8, mode 0600) in ``directory``."""
    cert = directory / f"{stem}.pem"
    key = directory / f"{stem}-key.pem"
    cert.write_bytes(issuer.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        issuer.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    return cert, key


@dataclass(frozen=True)
class Pki:
    """The files: ``ca``; ``cert``/``key`` (the services'; also ``encrypted_key``, the same key
    encrypted); ``client_cert``/``client_key`` (a client-only certificate of the same CA);
    ``other_ca`` and ``other_cert``/``other_key`` (a CA nobody here trusts, and a
    server-and-client certificate it signed)."""

    directory: Path
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path

    @property
    def encrypted_key(self) -> Path:
        return self.directory / "service-key-encrypted.pem"

    def security(self, client_auth: str = "none", **overrides: object) -> SecurityConfig:
        """The services' ``SecurityConfig``: their certificate, key and CA."""
        config = SecurityConfig(
            tls_cert=str(self.cert), tls_key=str(self.key), tls_ca=str(self.ca), tls_client_auth=client_auth
        )
        return replace(config, **overrides)  # type: ignore[arg-type]

    def env(self, client_auth: str = "none") -> dict[str, str]:
        """The same as environment variables, for processes."""
        env = {"EPOXI_TLS_CERT": str(self.cert), "EPOXI_TLS_KEY": str(self.key), "EPOXI_TLS_CA": str(self.ca)}
        if client_auth != "none":
            env["EPOXI_TLS_CLIENT_AUTH"] = client_auth
        return env


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("Epoxi test CA")
    other = make_ca("Some other CA")
    write_ca(ca, directory / "ca.pem")
    write_ca(other, directory / "other-ca.pem")
    service = issue(ca, "epoxi service")
    cert, key = write_cert(service, directory, "service")
    write_encrypted_key(service, directory / "service-key-encrypted.pem")
    client_cert, client_key = write_cert(
        issue(ca, "epoxi client", hosts=(), ips=(), server=False), directory, "client"
    )
    other_cert, other_key = write_cert(issue(other, "impostor"), directory, "other")
    return Pki(
        directory,
        directory / "ca.pem",
        cert,
        key,
        client_cert,
        client_key,
        directory / "other-ca.pem",
        other_cert,
        other_key,
    )


def new_token() -> str:
    return secrets.token_urlsafe(24)


def tokens_file(path: Path, tokens: dict[str, tuple[str, str]]) -> Path:
    """Write a tokens file: name -> (scopes, token)."""
    lines = ["# name scopes token", *(f"{n} {scopes} {token}" for n, (scopes, token) in tokens.items())]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path
