"""The users file and its password hashes: what is accepted, and every refusal naming the user."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.ingress import passwords, users
from services.ingress.users import UsersError

FAST = 2**10  # scrypt's n for tests: the format is what is tested, not the cost


def test_a_hash_verifies_its_password_only() -> None:
    stored = passwords.hash_password("s3cret", n=FAST)
    assert stored.startswith("scrypt$1024$8$1$")
    assert passwords.verify(b"s3cret", stored)
    assert not passwords.verify(b"s3cret ", stored)
    assert passwords.hash_password("s3cret", n=FAST) != stored  # salted


@pytest.mark.parametrize(
    "stored", ["plain", "scrypt$1024$8$1$xx$yy", "scrypt$1000$8$1$AAAA$" + "A" * 44, "md5$1$2$3$4$5"]
)
def test_a_bad_hash_is_refused(stored: str) -> None:
    with pytest.raises(passwords.BadHash):
        passwords.check_hash(stored)


def test_the_hash_command_reads_standard_input() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.ingress.passwords"],
        input="pw\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert passwords.verify(b"pw", out)


def test_users_authenticate_with_their_source(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text(
        f'[users.a]\npassword = "{passwords.hash_password("pa", n=FAST)}"\nsource_ip = "192.0.2.1"\n'
        f'[users.b]\npassword = "{passwords.hash_password("pb", n=FAST)}"\nip_pool = "bulk"\n'
    )
    found = users.load(path)
    a = found.authenticate(b"a", b"pa")
    assert a is not None and (a.name, a.source_ip, a.ip_pool) == ("a", "192.0.2.1", "")
    b = found.authenticate(b"b", b"pb")
    assert b is not None and b.ip_pool == "bulk"
    assert found.authenticate(b"a", b"pb") is None
    assert found.authenticate(b"nobody", b"pa") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[users.a]\n", "user 'a' has no password hash"),
        ('[users.a]\npassword = "x"\n', "user 'a': the password is not a scrypt"),
        ('[users.a]\npassword = "{h}"\nsource_ip = "nowhere"\n', "source_ip 'nowhere' is not an IP address"),
        ('[users.a]\npassword = "{h}"\nsource_ip = "192.0.2.1"\nip_pool = "p"\n', "not both"),
        ('[users.a]\npassword = "{h}"\nquota = 1\n', "unknown fields: quota"),
        ("[others]\n", "nothing else"),
        ("not toml [", "is not TOML"),
    ],
)
def test_a_bad_users_file_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text.replace("{h}", passwords.hash_password("p", n=FAST)))
    with pytest.raises(UsersError, match=problem):
        users.load(path)


def test_a_missing_users_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsersError, match="No such file"):
        users.load(tmp_path / "absent.toml")
