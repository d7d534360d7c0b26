"""The mail sink keeps every message it receives in its maildir, whichever sink wrote the others."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from devmesh.sink import Sink


def message(n: int) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "a@epoxi.test"
    m["To"] = f"rcpt{n}@epoxi.test"
    m["Subject"] = f"message {n}"
    m.set_content(f"body {n}")
    return m


async def deliver(sink: Sink, numbers: range) -> None:
    for n in numbers:
        await aiosmtplib.send(message(n), hostname=sink.host, port=sink.port)


def subjects(maildir: Path) -> list[str]:
    found = []
    for path in maildir.glob("*.eml"):
        subject = next(line for line in path.read_bytes().splitlines() if line.startswith(b"Subject: "))
        found.append(subject.decode().removeprefix("Subject: "))
    return sorted(found)


async def test_a_second_run_adds_to_the_first_runs_mail(tmp_path: Path) -> None:
    for run in range(2):
        sink = await Sink(maildir=tmp_path).start()
        try:
            await deliver(sink, range(run * 3, run * 3 + 3))
        finally:
            await sink.stop()

    assert subjects(tmp_path) == sorted(f"message {n}" for n in range(6))


async def test_two_sinks_at_once_share_a_maildir(tmp_path: Path) -> None:
    first, second = await Sink(maildir=tmp_path).start(), await Sink(maildir=tmp_path).start()
    try:
        await asyncio.gather(deliver(first, range(0, 20)), deliver(second, range(20, 40)))
    finally:
        await first.stop()
        await second.stop()

    assert subjects(tmp_path) == sorted(f"message {n}" for n in range(40))


async def test_the_sink_takes_utf8_mail(tmp_path: Path) -> None:
    # Without SMTPUTF8 the node bounces mail to jörg@example.de (5.6.7), and `epoxi dev` showed nothing.
    sink = await Sink(maildir=tmp_path).start()
    try:
        m = EmailMessage()
        m["From"] = "a@epoxi.test"
        m["To"] = "jörg@example.de"
        m["Subject"] = "Grüße"
        m.set_content("hallo")
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as smtp:
            assert smtp.supports_extension("smtputf8")
            await smtp.send_message(m)
        [received] = sink.received
        assert received.rcpt_tos == ["jörg@example.de"]
    finally:
        await sink.stop()
    assert "X-Epoxi-Envelope-To: jörg@example.de" in saved_text(tmp_path)


def saved_text(maildir: Path) -> str:
    [saved] = maildir.glob("*.eml")
    return saved.read_text("utf-8")
