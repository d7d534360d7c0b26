"""Delivery status notifications (RFC 3464) for bounced recipients, sent back to the envelope sender.

A DSN is a ``multipart/report; report-type=delivery-status`` message: a human-readable part, a
``message/delivery-status`` part (Reporting-MTA and Arrival-Date, then per recipient
Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original
header as ``text/rfc822-headers``. Its envelope sender is the null path, so a DSN never bounces
back; mail whose envelope sender is null gets none (RFC 5321 4.5.5). The ``Bouncer`` spools each
DSN like any message, for the pipeline (sender's domain, the bounced mail's source IP).
"""

from __future__ import annotations

import email.policy
import email.utils
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import TYPE_CHECKING, Protocol

from epoxi.policy import Policy
from services.node.engine.delivery import Result
from services.node.engine.spool import Job, NewMessage, Spool

if TYPE_CHECKING:
    from services.node.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

SUBJECT = "Undelivered Mail Returned to Sender"


@dataclass(frozen=True)
class Failure:
    """A recipient that bounced: the last reply, and when it came."""

    recipient: str
    result: Result
    at: float


def build(
    *,
    reporting_mta: str,
    dsn_from: str,
    sender: str,
    original: bytes,
    arrival: float,
    failures: Sequence[Failure],
    now: float | None = None,
) -> bytes:
    """The DSN for ``failures`` of the message ``original``, addressed to its envelope ``sender``."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <{dsn_from}>"
    report["To"] = sender
    report["Subject"] = SUBJECT
    report["Date"] = email.utils.formatdate(now, usegmt=True)
    report["Message-ID"] = email.utils.make_msgid(domain=dsn_from.rpartition("@")[2] or reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834
    report.attach(_part(MIMEText(_human(reporting_mta, failures), "plain", "utf-8")))

    status = _part(MIMEBase("message", "delivery-status"))
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, usegmt=True)
    status.set_payload([per_message, *(_per_recipient(f) for f in failures)])
    report.attach(status)

    headers = original_headers(original)
    charset = "us-ascii" if headers.isascii() else "utf-8"
    report.attach(_part(MIMEText(headers, "rfc822-headers", charset)))
    return report.as_bytes(policy=email.policy.SMTP)


def _part(part: Message) -> Message:
    del part["MIME-Version"]  # only the top level carries it
    return part


def _per_recipient(f: Failure) -> Message:
    block = Message()
    block["Final-Recipient"] = f"rfc822; {f.recipient}"
    block["Action"] = "failed"
    block["Status"] = f.result.status_code
    if f.result.host:
        block["Remote-MTA"] = f"dns; {f.result.host}"
    # "smtp" only for what a server replied; a local failure (no connection, DNS) says so.
    kind = "smtp" if f.result.code else "X-Epoxi"
    block["Diagnostic-Code"] = f"{kind}; {_reply(f.result)}"
    block["Last-Attempt-Date"] = email.utils.formatdate(f.at, usegmt=True)
    return block


def _reply(r: Result) -> str:
    text = " ".join(r.text.split())  # one line: folded by the generator if long
    return f"{r.code} {text}" if r.code else text


def _human(reporting_mta: str, failures: Sequence[Failure]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery status report and the header of your message are attached.",
        "",
    ]
    for f in failures:
        where = f" (host {f.result.host} said)" if f.result.host else ""
        lines.append(f"<{f.recipient}>{where}: {_reply(f.result)}")
    return "\n".join(lines) + "\n"


def original_headers(data: bytes) -> str:
    """The header section of an RFC 5322 message, as text."""
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=len(data))
    return data[:end].decode("utf-8", errors="replace").replace("\r\n", "\n") + "\n"


class Mailer(Protocol):
    """What the bouncer needs of the node."""

    spool: Spool

    async def start_pipeline(
        self, domain: str, source_ip: str, policy: Policy | None = None
    ) -> tuple[Pipeline, bool]: ...

    async def enqueue_rendered(self, p: Pipeline, messages: Sequence[NewMessage]) -> list[str]: ...


@dataclass
class Bouncer:
    """Spools a DSN for each bounced message whose sender can take one."""

    node: Mailer
    dsn_from: str
    reporting_mta: str
    # The policy of a pipeline started for DSNs; None: the node's choice for a new pipeline.
    policy: Policy | None = None

    async def bounced(self, source_ip: str, job: Job, failures: Sequence[Failure]) -> None:
        sender = job.sender.strip("<>")
        if not sender or not failures:
            return  # a bounce of a bounce, or nothing to report
        domain = sender.rpartition("@")[2]
        if not domain:
            log.warning("no DSN for message %s: sender %r has no domain", job.message_id, job.sender)
            return
        stored = await self.node.spool.message(job.message_id)
        arrival = stored[0].created_at if stored is not None else time.time()
        data = build(
            reporting_mta=self.reporting_mta,
            dsn_from=self.dsn_from,
            sender=sender,
            original=job.data,
            arrival=arrival,
            failures=failures,
        )
        p, _ = await self.node.start_pipeline(domain, source_ip, self.policy)
        [dsn_id] = await self.node.enqueue_rendered(p, [NewMessage("", [sender], data)])
        log.info(
            "message %s: DSN %s to %s for %s",
            job.message_id,
            dsn_id,
            sender,
            ", ".join(f.recipient for f in failures),
        )
