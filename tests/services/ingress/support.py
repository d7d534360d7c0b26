"""Helpers for the ingress tests: a users file, messages, and smtplib run off the event loop."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from services.ingress.passwords import hash_password

T = TypeVar("T")

ALICE_IP = "127.0.0.3"  # alice's configured source IP
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


def write_users(path: Path) -> Path:
    """alice sends from ALICE_IP; bob from the default pool."""
    path.write_text(
        f'[users.alice]\npassword = "{hash_password(PASSWORDS["alice"], n=2**10)}"\nsource_ip = "{ALICE_IP}"\n'
        f'[users.bob]\npassword = "{hash_password(PASSWORDS["bob"], n=2**10)}"\nip_pool = "default"\n'
    )
    return path


def client_tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def in_thread(fn: Callable[[], T]) -> T:
    """smtplib blocks: run it in a thread, so the in-process mesh keeps running."""
    return await asyncio.to_thread(fn)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def connect(address: str, ca: Path, user: str | None = "alice") -> smtplib.SMTP:
    """An SMTP session to ``address``: EHLO, STARTTLS, EHLO and AUTH as ``user`` (None: no AUTH)."""
    host, port = host_port(address)
    smtp = smtplib.SMTP(host, port, local_hostname="client.test", timeout=60)
    try:
        smtp.starttls(context=client_tls(ca))
        smtp.ehlo("client.test")
        if user is not None:
            smtp.login(user, PASSWORDS[user])
    except BaseException:
        smtp.close()  # a refused session leaves no socket for the garbage collector to report
        raise
    return smtp


MESSAGE = (
    b"From: Alice <alice@shop.test>\r\n"
    b"To: ann@a.test\r\n"
    b"Subject: order 1\r\n"
    b"Message-ID: <order-1@shop.test>\r\n"
    b"\r\n"
    b"Your order is on its way.\r\n"
)
