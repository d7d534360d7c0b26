"""What ``epoxi send --file`` reads: emails from JSON lines or a directory of .eml files, each
with the index a retry names it by, or the reason it cannot be sent.

JSON lines: each non-blank line is one ``epoxi.v1.Email`` in proto JSON (``json_format``: field
names in lowerCamelCase or as in the proto). The simple form ``{"from": ..., "to": [...],
"subject": ..., "text": ..., "html": ...}`` is that too; ``"to"`` may also be one string. An
email's index is its 0-based line number in the file.

A directory: each ``*.eml`` file (sorted by name) is one RFC 5322 message, sent as it is
(``Email.raw``). Its envelope is ``--from``/``--to`` when given, else taken from the header as
``sendmail -t`` (and RouteRawEmail, ``services.router.raw``) does: the From address, and every
To, Cc and Bcc address, the Bcc fields then removed. An email's index is its file's name.

Every email is checked as the router checks it (``epoxi.validation``), so one bad line fails
alone rather than the whole batch it would travel in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from epoxi import raw_message, validation
from epoxi.envelope import new_email
from epoxi.v1 import email_pb2

EML_SUFFIX = ".eml"


@dataclass(frozen=True)
class Defaults:
    """What the command line fills in: ``sender`` for JSON emails without one and as a raw
    message's MAIL FROM; ``recipients`` as a raw message's RCPT TO; ``ip`` and ``ip_pool`` for
    emails without a delivery."""

    sender: str | None = None
    recipients: tuple[str, ...] = ()
    ip: str = ""
    ip_pool: str = ""


@dataclass(frozen=True)
class Item:
    # The 0-based line number, or the .eml file's position in the sorted directory.
    index: int
    # The .eml file's name; "" for a line.
    file: str
    email: email_pb2.Email | None
    # Why it cannot be sent; "" when ``email`` is set.
    problem: str = ""

    @property
    def key(self) -> str:
        """What a failed-file entry names it by: the file's name, or the line number."""
        return self.file or str(self.index)


def is_directory(path: Path) -> bool:
    return path.is_dir()


def count(path: Path, only: set[str] | None = None) -> int:
    """How many emails ``read`` yields."""
    return sum(1 for key in _keys(path) if only is None or key in only)


def _keys(path: Path) -> Iterator[str]:
    if is_directory(path):
        yield from (f.name for f in _eml_files(path))
        return
    with path.open("rb") as f:
        for index, line in enumerate(f):
            if line.strip():
                yield str(index)


def read(path: Path, defaults: Defaults, only: set[str] | None = None) -> Iterator[Item]:
    """The emails of ``path`` (a JSON lines file or an .eml directory), lazily, in order; with
    ``only``, just those whose ``Item.key`` it holds."""
    if is_directory(path):
        for index, f in enumerate(_eml_files(path)):
            if only is None or f.name in only:
                yield _eml_item(index, f, defaults)
        return
    with path.open("rb") as lines:
        for index, line in enumerate(lines):
            if line.strip() and (only is None or str(index) in only):
                yield _json_item(index, line, defaults)


def _eml_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.suffix == EML_SUFFIX and f.is_file())


def _checked(index: int, file: str, e: email_pb2.Email) -> Item:
    problems = validation.validate(e)
    if problems:
        return Item(index, file, None, "; ".join(problems))
    return Item(index, file, e)


def _with_delivery(e: email_pb2.Email, defaults: Defaults) -> None:
    if not e.HasField("delivery") and (defaults.ip or defaults.ip_pool):
        e.delivery.CopyFrom(email_pb2.Delivery(ip=defaults.ip, ip_pool=defaults.ip_pool))


def _json_item(index: int, line: bytes, defaults: Defaults) -> Item:
    try:
        found: Any = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Item(index, "", None, f"not JSON: {err}")
    if not isinstance(found, dict):
        return Item(index, "", None, f"not a JSON object but {type(found).__name__}")
    if isinstance(found.get("to"), str):
        found["to"] = [found["to"]]
    try:
        e = json_format.ParseDict(found, email_pb2.Email())
    except json_format.ParseError as err:
        return Item(index, "", None, f"not an epoxi.v1.Email: {err}")
    if not getattr(e, "from") and not e.HasField("raw") and defaults.sender:
        setattr(e, "from", defaults.sender)
    _with_delivery(e, defaults)
    return _checked(index, "", e)


def _eml_item(index: int, path: Path, defaults: Defaults) -> Item:
    try:
        data = path.read_bytes()
    except OSError as err:
        return Item(index, path.name, None, f"cannot read: {err.strerror}")
    if (p := raw_message.content_problem(data)) is not None:
        return Item(index, path.name, None, f"the message {p}")
    env = raw_message.envelope(data, defaults.sender, defaults.recipients)
    problems = [
        *(f"{p}: give --from" for p in env.sender_problems),
        *(f"{p}: give --to" for p in env.recipient_problems),
    ]
    if problems:
        return Item(index, path.name, None, "; ".join(problems))
    e = email_pb2.Email(
        raw=email_pb2.RawMessage(mail_from=env.mail_from, rcpt_to=env.rcpt_to, content=env.content)
    )
    _with_delivery(e, defaults)
    return _checked(index, path.name, e)


def single(defaults: Defaults, subject: str, text: str) -> email_pb2.Email:
    """The one email of ``epoxi send --to ...``."""
    return new_email(
        defaults.sender or "",
        to=list(defaults.recipients),
        subject=subject,
        text=text,
        delivery=email_pb2.Delivery(ip=defaults.ip),
    )
