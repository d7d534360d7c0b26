"""Password hashes for the ingress's users file: scrypt, compared in constant time.

A hash is ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>``. Make one with
``python -m services.ingress.passwords`` (it reads the password from standard input, so it never
shows in ``ps`` or the shell's history).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1
KEY_BYTES = 32
SALT_BYTES = 16
# Room for n=2**17 (128 * r * n bytes) and more: what a hash may ask for is bounded.
MAX_MEMORY = 256 * 1024 * 1024


class BadHash(ValueError):
    """A stored hash that is not one this module makes."""


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = os.urandom(SALT_BYTES)
    key = _derive(password.encode("utf-8"), salt, n, r, p, KEY_BYTES)
    return "$".join((SCHEME, str(n), str(r), str(p), _b64(salt), _b64(key)))


def check_hash(stored: str) -> None:
    """Raise ``BadHash`` saying what is wrong with ``stored``."""
    _parse(stored)


def verify(password: bytes, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant-time comparison)."""
    n, r, p, salt, key = _parse(stored)
    return hmac.compare_digest(_derive(password, salt, n, r, p, len(key)), key)


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise BadHash(
            f"is not a {SCHEME}$n$r$p$salt$key hash (make one with python -m services.ingress.passwords)"
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as e:
        raise BadHash(f"has a bad number or base64 field ({e})") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * n > MAX_MEMORY or len(key) < 16 or not salt:
        raise BadHash("has scrypt parameters out of range (n a power of 2, r, p >= 1, key >= 16 bytes)")
    return n, r, p, salt, key


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=MAX_MEMORY + 1024 * 1024, dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Checked against for a user who does not exist, so that the answer takes as long either way.
DECOY = hash_password("")


def main() -> int:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("give the password on standard input", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
