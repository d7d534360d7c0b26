"""Delivery status notifications (RFC 3464) for bounced recipients, sent back to the envelope sender.

A DSN is a ``multipart/report; report-type=delivery-status`` message: a human-readable part, a
``message/delivery-status`` part (Reporting-MTA and Arrival-Date, then per recipient
Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original
header as ``text/rfc822-headers``. Its envelope sender is the null path, so a DSN never bounces
back; mail whose envelope sender is null gets none (RFC 5321 4.5.5).

The ``Bouncer`` is a pipeline hook: it spools each DSN itself, like any message, under the routing
key (sender's domain, the bounced mail's source IP), then puts that key on ``spooled``, a queue the
supervisor drains to start or wake the key's pipeline. It holds neither the supervisor nor a
pipeline. A crash between the two steps loses nothing: a node resumes every routing key with
unfinished mail. The DSN is spooled under the current span's context (the pipeline's
``bounce`` span while tracing is on), so its delivery joins the bounced mail's trace.
"""

from __future__ import annotations

import asyncio
import email.generator
import email.policy
import email.utils
import io
import logging
import time
from collections.abc import Mapping, Sequence
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import TYPE_CHECKING

from opentelemetry import trace

from epoxi.observability import tracing
from epoxi.routing import routing_key
from services.node.engine.extensions import header_end
from services.node.engine.hooks import PipelineHooks
from services.node.engine.instruments import NO_INSTRUMENTS, Instruments
from services.node.engine.reply import Reply
from services.node.engine.spool import Job, NewMessage, Outcome, Spool

if TYPE_CHECKING:
    from services.node.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

SUBJECT = "Undelivered Mail Returned to Sender"


def build(
    *,
    reporting_mta: str,
    dsn_from: str,
    sender: str,
    original: bytes,
    arrival: float,
    bounced: Mapping[str, Outcome],
    now: float | None = None,
) -> bytes:
    """The DSN for the ``bounced`` recipients (with the outcome of each one's last attempt) of the
    message ``original``, addressed to its envelope ``sender``."""
    # RFC 6533: a non-ASCII address (or reply) makes the report global: UTF-8 in its header and
    # its message/global-delivery-status part, and sent with SMTPUTF8.
    utf8 = not sender.isascii() or any(
        not r.isascii() or not _diagnostic(o.reply).isascii() for r, o in bounced.items()
    )
    kind = "global-delivery-status" if utf8 else "delivery-status"
    report = MIMEMultipart("report", report_type=kind)
    report["From"] = f"Mail Delivery System <{dsn_from}>"
    report["To"] = sender
    report["Subject"] = SUBJECT
    report["Date"] = email.utils.formatdate(now, usegmt=True)
    report["Message-ID"] = email.utils.make_msgid(domain=dsn_from.rpartition("@")[2] or reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834
    report.attach(_part(MIMEText(_human(reporting_mta, bounced), "plain", "utf-8")))

    status = _part(MIMEBase("message", kind))
    if utf8:
        status["Content-Transfer-Encoding"] = "8bit"
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, usegmt=True)
    status.set_payload([per_message, *(_per_recipient(r, o) for r, o in bounced.items())])
    report.attach(status)

    headers = original_headers(original)
    charset = "us-ascii" if headers.isascii() else "utf-8"
    report.attach(_part(MIMEText(headers, "rfc822-headers", charset)))
    out = io.BytesIO()
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    _Generator(out, mangle_from_=False, policy=policy).flatten(report)
    return out.getvalue()


class _Generator(email.generator.BytesGenerator):
    """The standard generator, writing message/global-delivery-status (RFC 6533) as it writes
    message/delivery-status: blocks of fields, here in UTF-8."""

    # The generator picks a handler by content type; typeshed leaves its handlers out.
    _handle_message_global_delivery_status = email.generator.BytesGenerator._handle_message_delivery_status  # type: ignore[attr-defined]


def _part(part: Message) -> Message:
    del part["MIME-Version"]  # only the top level carries it
    return part


def _per_recipient(recipient: str, o: Outcome) -> Message:
    block = Message()
    # RFC 6533 3: a non-ASCII address is of type utf-8 (and only in a global report).
    block["Final-Recipient"] = f"{'rfc822' if recipient.isascii() else 'utf-8'}; {recipient}"
    block["Action"] = "failed"
    block["Status"] = o.reply.status_code
    if o.reply.host:
        block["Remote-MTA"] = f"dns; {o.reply.host}"
    # "smtp" only for what a server replied; a local failure (no connection, DNS) says so.
    kind = "smtp" if o.reply.code else "X-Epoxi"
    block["Diagnostic-Code"] = f"{kind}; {_diagnostic(o.reply)}"
    block["Last-Attempt-Date"] = email.utils.formatdate(o.attempted_at, usegmt=True)
    return block


def _diagnostic(r: Reply) -> str:
    """The reply as the server sent it, on one line (folded by the generator if long)."""
    text = " ".join(r.line.split())
    return f"{r.code} {text}" if r.code else text


def _human(reporting_mta: str, bounced: Mapping[str, Outcome]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery status report and the header of your message are attached.",
        "",
    ]
    for recipient, o in bounced.items():
        where = f" (host {o.reply.host} said)" if o.reply.host else ""
        lines.append(f"<{recipient}>{where}: {_diagnostic(o.reply)}")
    return "\n".join(lines) + "\n"


def original_headers(data: bytes) -> str:
    """The header section of an RFC 5322 message, as text."""
    return data[: header_end(data)].decode("utf-8", errors="replace").replace("\r\n", "\n") + "\n"


class Bouncer(PipelineHooks):
    """Spools a DSN for each bounced message whose sender can take one, and puts the DSN's routing
    key on ``spooled`` for the supervisor."""

    def __init__(
        self,
        spool: Spool,
        spooled: asyncio.Queue[str],
        dsn_from: str,
        reporting_mta: str,
        instruments: Instruments = NO_INSTRUMENTS,
    ) -> None:
        self.spool = spool
        self.instruments = instruments
        self.spooled = spooled
        self.dsn_from = dsn_from
        self.reporting_mta = reporting_mta

    async def bounced(self, pipeline: Pipeline, job: Job, outcomes: Sequence[Outcome]) -> None:
        sender = job.sender.strip("<>")
        if not sender or not outcomes:
            return  # a bounce of a bounce, or nothing to report
        domain = sender.rpartition("@")[2]
        if not domain:
            log.warning(
                "no DSN for message %s: sender %r has no domain",
                job.message_id,
                job.sender,
                extra={"routing_key": pipeline.routing_key, "message_id": job.message_id},
            )
            return
        recipients = {d.id: d.recipient for d in job.deliveries}
        bounced = {recipients[o.delivery_id]: o for o in outcomes}
        stored = await self.spool.message(job.message_id)
        arrival = stored[0].created_at if stored is not None else time.time()
        data = build(
            reporting_mta=self.reporting_mta,
            dsn_from=self.dsn_from,
            sender=sender,
            original=job.data,
            arrival=arrival,
            bounced=bounced,
        )
        key = routing_key(domain, pipeline.source_ip)
        traced = tracing.enabled()
        [dsn_id] = await self.spool.enqueue(
            key, [NewMessage("", [sender], data)], traceparent=tracing.traceparent() if traced else ""
        )
        if traced:
            trace.get_current_span().set_attribute("epoxi.dsn.message_id", dsn_id)
        self.instruments.dsn()
        self.spooled.put_nowait(key)
        log.info(
            "message %s: DSN %s to %s for %s",
            job.message_id,
            dsn_id,
            sender,
            ", ".join(bounced),
            extra={"routing_key": pipeline.routing_key, "message_id": job.message_id},
        )
