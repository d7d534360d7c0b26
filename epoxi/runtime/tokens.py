"""The bearer tokens a server accepts (the tokens file), and the constant-time match of one.

The file has one token per line, ``NAME SCOPES TOKEN``; blank lines and lines starting with
``#`` are ignored::

    # name     scopes         token
    router     mesh           9f2c...          (the router's calls to the nodes)
    ops        read,admin     4b7e...

SCOPES is a comma-separated list of ``read``, ``submit``, ``admin`` and ``mesh`` (the
``epoxi.v1.Scope`` values, see protos/epoxi/v1/access.proto); a method needs its one scope, and
no scope implies another. A TOKEN is at least 16 visible ASCII characters (no spaces).

Only SHA-256 digests of the tokens are kept, and a presented token is compared with every one of
them with ``hmac.compare_digest``: the time taken does not depend on which token matched, how
much of one matched, or its length.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from epoxi.v1 import access_pb2

MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*\Z")
_TOKEN = re.compile(r"[\x21-\x7e]+\Z")

# "read" -> SCOPE_READ, ... (every scope but SCOPE_UNSPECIFIED)
SCOPES: dict[str, int] = {
    name.removeprefix("SCOPE_").lower(): value
    for name, value in access_pb2.Scope.items()
    if value != access_pb2.SCOPE_UNSPECIFIED
}


def scope_name(scope: int) -> str:
    """``SCOPE_ADMIN`` -> ``admin``: the name the tokens file and the refusals use."""
    return access_pb2.Scope.Name(scope).removeprefix("SCOPE_").lower()  # type: ignore[arg-type]


class TokensError(ValueError):
    """A tokens file that cannot be used; the message says where and why (never a token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[int]
    digest: bytes

    @classmethod
    def of(cls, name: str, scopes: Iterable[int], token: str) -> Token:
        return cls(name, frozenset(scopes), _digest(token))

    def allows(self, scope: int) -> bool:
        return scope in self.scopes

    @property
    def scope_names(self) -> str:
        return ",".join(sorted(map(scope_name, self.scopes))) or "none"


class Tokens:
    """The tokens a server accepts."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self._tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tokens]

    def find(self, presented: str) -> Token | None:
        """The token ``presented`` is, or None; compares with every token, without an early exit."""
        digest = _digest(presented)
        found = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def parse_tokens(text: str, source: str = "the tokens file") -> Tokens:
    """The tokens of a tokens file's ``text``; TokensError naming ``source`` and the line."""
    tokens: list[Token] = []
    seen_names: dict[str, int] = {}
    seen_digests: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise TokensError(f"{where}: expected NAME SCOPES TOKEN, found {len(fields)} fields")
        name, scopes_text, secret = fields
        if not _NAME.match(name):
            raise TokensError(f"{where}: {name!r} is not a token name (letters, digits, . _ @ -)")
        if name in seen_names:
            raise TokensError(f"{where}: the name {name!r} is already used on line {seen_names[name]}")
        scopes = []
        for part in scopes_text.split(","):
            scope = SCOPES.get(part.strip().lower())
            if scope is None:
                known = ", ".join(SCOPES)
                raise TokensError(f"{where}: {part!r} is not a scope (the scopes: {known})")
            scopes.append(scope)
        if len(secret) < MIN_TOKEN_LENGTH or not _TOKEN.match(secret):
            raise TokensError(
                f"{where}: the token of {name!r} must be at least {MIN_TOKEN_LENGTH} visible ASCII characters"
            )
        token = Token.of(name, scopes, secret)
        if token.digest in seen_digests:
            raise TokensError(f"{where}: {name!r} has the same token as {seen_digests[token.digest]!r}")
        seen_names[name] = number
        seen_digests[token.digest] = name
        tokens.append(token)
    if not tokens:
        raise TokensError(f"{source} has no tokens: every protected method would refuse every caller")
    return Tokens(tokens)


def read_tokens(path: str | Path, source: str | None = None) -> Tokens:
    """The tokens file at ``path``; TokensError when it cannot be read or used."""
    source = source or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TokensError(f"{source}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TokensError(f"{source}: not UTF-8 text") from None
    return parse_tokens(text, source)
