"""Who may call a service and how its gRPC travels: one settings group every service shares.

``SecurityConfig`` is the settings (a ``settings.group`` of each service's config; the same
environment names everywhere, so one environment configures a whole mesh); ``load_security``
reads its files once, at start-up, into a ``Security``: what the server and the channels of
``epoxi.runtime`` are built with. Any file that cannot be used is a ``SecurityError`` that
names it, and the service does not start.

* Server: TLS when ``EPOXI_TLS_CERT``/``EPOXI_TLS_KEY`` are given, else plaintext; with
  ``EPOXI_TLS_CLIENT_AUTH=require`` only clients with a certificate ``EPOXI_TLS_CA`` signed
  connect (mTLS). Bearer tokens from ``EPOXI_TOKENS_FILE`` (``epoxi.runtime.tokens``); without
  one every method is open, as before. ``EPOXI_OPEN_READ=1`` leaves SCOPE_READ methods open.
* Client: TLS when this process has a CA or a certificate of its own, verifying servers with
  ``EPOXI_TLS_CA`` (else the system's roots) and presenting the certificate for mTLS; this
  process's token (``EPOXI_TOKEN_FILE``, or ``EPOXI_TOKEN``) on every call.

Token values never come from a flag (flags show in ``ps``): only the file paths have flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from epoxi import settings
from epoxi.runtime.access import AccessControl, sending_token
from epoxi.runtime.tls import TlsError, TlsFiles
from epoxi.runtime.tokens import MIN_TOKEN_LENGTH, Tokens, TokensError, read_tokens
from epoxi.settings import setting

log = logging.getLogger(__name__)

CLIENT_AUTH = ("none", "require")


class SecurityError(ValueError):
    """A security setting or file that cannot be used: the service refuses to start."""


class Secret:
    """A value that is never shown: its ``repr`` and ``str`` hide it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<hidden>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_client_auth(text: str) -> str:
    value = text.strip().lower()
    if value not in CLIENT_AUTH:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(CLIENT_AUTH)}")
    return value


def parse_switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not 1 or 0 (true/false, yes/no, on/off)")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS and bearer-token settings, the same environment names for every service."""

    tls_cert: str | None = setting(
        None,
        env="EPOXI_TLS_CERT",
        metavar="PEM",
        help="this process's certificate (PEM): the server's, and the client certificate it presents",
    )
    tls_key: str | None = setting(
        None, env="EPOXI_TLS_KEY", metavar="PEM", help="the certificate's private key (PEM, unencrypted)"
    )
    tls_ca: str | None = setting(
        None,
        env="EPOXI_TLS_CA",
        metavar="PEM",
        help="CA certificates (PEM) that verify peers: the servers this process dials (over TLS when "
        "set), and client certificates when --tls-client-auth is require",
    )
    tls_client_auth: str = setting(
        "none",
        parse=parse_client_auth,
        env="EPOXI_TLS_CLIENT_AUTH",
        metavar="none|require",
        help="require: refuse clients without a certificate signed by --tls-ca (mutual TLS); none",
    )
    tls_server_name: str | None = setting(
        None,
        env="EPOXI_TLS_SERVER_NAME",
        metavar="NAME",
        help="check servers' certificates for this name instead of the host dialled (also the "
        "registry's TLSServerName for this service's health check)",
    )
    tokens_file: str | None = setting(
        None,
        env="EPOXI_TOKENS_FILE",
        metavar="FILE",
        shown="none: every method is open",
        help="the bearer tokens this server accepts, one 'NAME SCOPES TOKEN' a line (docs/security.md)",
    )
    open_read: bool = setting(
        False,
        parse=parse_switch,
        env="EPOXI_OPEN_READ",
        metavar="0|1",
        shown="0",
        help="1: read-only discovery (SCOPE_READ methods) needs no token",
    )
    token_file: str | None = setting(
        None,
        env="EPOXI_TOKEN_FILE",
        metavar="FILE",
        help="a file holding the bearer token this process sends on its own gRPC calls",
    )
    token: Secret | None = setting(
        None,
        parse=Secret,
        env="EPOXI_TOKEN",
        cli=False,
        help="the bearer token this process sends on its own gRPC calls (instead of EPOXI_TOKEN_FILE)",
    )


@dataclass(frozen=True)
class Security:
    """A process's loaded security: plaintext and open when built with no arguments."""

    tls: TlsFiles | None = None
    require_client_auth: bool = False
    server_name: str | None = None
    tokens: Tokens | None = None
    open_read: bool = False
    token: Secret | None = None

    @property
    def serves_tls(self) -> bool:
        return self.tls is not None and self.tls.has_identity

    @property
    def dials_tls(self) -> bool:
        return self.tls is not None

    # Server side

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (or mTLS) credentials for a server port; None: plaintext."""
        if self.tls is None or not self.tls.has_identity:
            return None
        return self.tls.server_credentials(self.require_client_auth)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [AccessControl(self.tokens, self.open_read)]

    def check_fields(self) -> dict[str, Any]:
        """What a registry GRPC check of this server needs (Consul's field names)."""
        if not self.serves_tls:
            return {}
        fields: dict[str, Any] = {"GRPCUseTLS": True}
        if self.server_name:
            fields["TLSServerName"] = self.server_name
        return fields

    def with_tls_check(self, registration: dict[str, Any]) -> dict[str, Any]:
        """``registration`` (``agent.service.register`` arguments) with its GRPC check over TLS
        when this server serves TLS."""
        if not self.serves_tls or "check" not in registration:
            return registration
        return {**registration, "check": {**registration["check"], **self.check_fields()}}

    # Client side

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the channels this process dials; None: plaintext."""
        return None if self.tls is None else self.tls.channel_credentials()

    def channel_options(self) -> list[tuple[str, str]]:
        if self.tls is not None and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [] if self.token is None else sending_token(self.token.reveal())

    def describe(self) -> str:
        """How this server is reached, for the start-up log: never a secret."""
        if not self.serves_tls:
            transport = "plaintext"
        elif self.require_client_auth:
            transport = "mutual TLS"
        else:
            transport = "TLS"
        access = (
            "no access control (no tokens file)"
            if self.tokens is None
            else f"{len(self.tokens)} bearer tokens ({', '.join(self.tokens.names)})"
            + (", reads open" if self.open_read else "")
        )
        return f"{transport}, {access}"


PLAINTEXT = Security()


def load_security(config: SecurityConfig) -> Security:
    """Read the files ``config`` names; SecurityError when one cannot be used."""
    try:
        return _load(config)
    except (TlsError, TokensError) as e:
        raise SecurityError(str(e)) from None


def _load(config: SecurityConfig) -> Security:
    require = config.tls_client_auth == "require"
    if require and not (config.tls_cert and config.tls_key):
        raise SecurityError(
            "EPOXI_TLS_CLIENT_AUTH=require needs the server's own certificate: give EPOXI_TLS_CERT and EPOXI_TLS_KEY"
        )
    if require and not config.tls_ca:
        raise SecurityError(
            "EPOXI_TLS_CLIENT_AUTH=require needs EPOXI_TLS_CA, the CA that signs the client certificates"
        )
    tls = None
    if config.tls_cert or config.tls_key or config.tls_ca:
        tls = TlsFiles.read(
            config.tls_cert,
            config.tls_key,
            config.tls_ca,
            names=("TLS certificate (EPOXI_TLS_CERT)", "TLS key (EPOXI_TLS_KEY)", "TLS CA (EPOXI_TLS_CA)"),
        )
        if config.tls_key:
            _warn_if_others_read(config.tls_key, "TLS key (EPOXI_TLS_KEY)")
    tokens = None
    if config.tokens_file:
        tokens = read_tokens(config.tokens_file, f"tokens file (EPOXI_TOKENS_FILE) {config.tokens_file}")
        _warn_if_others_read(config.tokens_file, "tokens file (EPOXI_TOKENS_FILE)")
    return Security(
        tls=tls,
        require_client_auth=require,
        server_name=config.tls_server_name or None,
        tokens=tokens,
        open_read=config.open_read,
        token=_own_token(config),
    )


def _own_token(config: SecurityConfig) -> Secret | None:
    if config.token_file and config.token is not None:
        raise SecurityError("give EPOXI_TOKEN_FILE or EPOXI_TOKEN, not both")
    if config.token is not None:
        return _checked_token(config.token.reveal(), "EPOXI_TOKEN")
    if not config.token_file:
        return None
    what = f"token file (EPOXI_TOKEN_FILE) {config.token_file}"
    try:
        text = Path(config.token_file).read_text(encoding="utf-8")
    except OSError as e:
        raise SecurityError(f"{what}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"{what}: not UTF-8 text") from None
    _warn_if_others_read(config.token_file, "token file (EPOXI_TOKEN_FILE)")
    return _checked_token(text.strip(), what)


def _checked_token(token: str, what: str) -> Secret:
    if len(token) < MIN_TOKEN_LENGTH or not all("\x21" <= ch <= "\x7e" for ch in token):
        raise SecurityError(f"{what}: a token is at least {MIN_TOKEN_LENGTH} visible ASCII characters")
    return Secret(token)


def _warn_if_others_read(path: str, what: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("%s %s is readable by every user of this machine; chmod o-r it", what, path)


def security_from_environment(environ: dict[str, str] | None = None) -> Security:
    """The ``Security`` the shared environment names (EPOXI_TLS_*, EPOXI_TOKEN*, ...) describe:
    for tools that have no settings of their own."""
    try:
        config = settings.from_args(SecurityConfig, argparse.Namespace(), environ=environ)
    except ValueError as e:
        raise SecurityError(str(e)) from None
    return load_security(config)
