"""The ingress's users: who may submit, with which password, and from which source IP.

A TOML file (``--users-file``; never a flag with a password in it)::

    [users.shop]
    password = "scrypt$16384$8$1$...$..."   # python -m services.ingress.passwords
    source_ip = "192.0.2.10"                # the mail of this user leaves from this IP
    [users.newsletter]
    password = "scrypt$..."
    ip_pool = "bulk"                        # or from an IP of this pool

A user with neither sends from the router's default pool. The file is read once, at start-up;
anything wrong with it stops the ingress with a message naming the user and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from epoxi.routing import is_ip
from services.ingress import passwords


class UsersError(ValueError):
    """A users file that cannot be used."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    source_ip: str = ""
    ip_pool: str = ""


class Users:
    def __init__(self, users: dict[str, User]) -> None:
        self._users = users

    def __len__(self) -> int:
        return len(self._users)

    def authenticate(self, login: bytes, password: bytes) -> User | None:
        """The user ``login`` names when ``password`` is theirs; else None. CPU-bound (scrypt):
        run it in a thread. An unknown login costs as much as a known one."""
        user = self._users.get(login.decode("utf-8", errors="replace"))
        if user is None:
            passwords.verify(password, passwords.DECOY)
            return None
        return user if passwords.verify(password, user.password_hash) else None


def load(path: str | Path) -> Users:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsersError(f"users file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsersError(f"users file {path} is not TOML: {e}") from None
    table = data.get("users", {})
    if not isinstance(table, dict) or set(data) - {"users"}:
        raise UsersError(f"users file {path}: put each user in a [users.<name>] table, and nothing else")
    users = {}
    for name, fields in table.items():
        where = f"users file {path}: user {name!r}"
        if not isinstance(fields, dict):
            raise UsersError(f"{where} is not a table")
        unknown = set(fields) - {"password", "source_ip", "ip_pool"}
        if unknown:
            raise UsersError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        hashed, ip, pool = fields.get("password"), fields.get("source_ip", ""), fields.get("ip_pool", "")
        if not isinstance(hashed, str):
            raise UsersError(f"{where} has no password hash")
        try:
            passwords.check_hash(hashed)
        except passwords.BadHash as e:
            raise UsersError(f"{where}: the password {e}") from None
        if not isinstance(ip, str) or (ip and not is_ip(ip)):
            raise UsersError(f"{where}: source_ip {ip!r} is not an IP address")
        if not isinstance(pool, str) or (ip and pool):
            raise UsersError(f"{where}: give source_ip or ip_pool (a name), not both")
        users[name] = User(name, hashed, ip, pool)
    return Users(users)
