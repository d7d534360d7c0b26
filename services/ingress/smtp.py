"""The SMTP side of the ingress, on aiosmtpd: ESMTP with SIZE, PIPELINING, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES, STARTTLS (when it has a certificate) and AUTH PLAIN and LOGIN (when it has
users, offered only over TLS: after STARTTLS, or on the implicit TLS listener).

Replies:

- MAIL: 553 5.1.7 for a sender that is not an addr-spec we can send from; 552 5.3.4 when its
  SIZE= is over the limit; 530 5.7.0 without AUTH when anonymous submission is off;
- RCPT: 553 5.1.3 for a recipient that is not an addr-spec (550 5.1.2 when its domain is what
  is wrong); 452 4.5.3 past ``max_recipients``;
- DATA: 552 5.3.4 over the size limit; then what ``services.ingress.submission`` says: 250
  with the queue IDs only once the router has every batch durably spooled, else 4xx or 5xx.
- AUTH before TLS: 538 5.7.11; any command but EHLO, STARTTLS, NOOP and QUIT before STARTTLS
  when TLS is required: 530 5.7.0.

The message is relayed as the client wrote it: no Received field is added, nothing is
rewritten (``epoxi.raw_message``). Its source IP is its user's (``services.ingress.users``),
or what the operator-enabled header says, else the router's default pool.

While tracing is on, each message whose DATA reaches the handler is a SERVER span ``smtp
ingress`` (``network.peer.*``, ``epoxi.message_id``, ``epoxi.recipients``,
``epoxi.smtp.reply_code``), and the RouteEmails call is made inside it: the router's span is
its child. Sessions, messages and failed logins are counted by ``services.ingress.metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from opentelemetry.trace import SpanKind, Status, StatusCode

from epoxi import raw_message, validation
from epoxi.excerpt import shown
from epoxi.observability import tracing
from epoxi.v1 import router_pb2
from services.ingress import submission
from services.ingress.metrics import IngressMetrics
from services.ingress.routers import MeshUnavailable, Refused, RouterLink
from services.ingress.submission import Source
from services.ingress.users import User, Users

log = logging.getLogger(__name__)

# RFC 5321 4.5.3.1: the sum of an envelope's fixed parts and this much per recipient.
ENVELOPE_PER_RECIPIENT = 330
ENVELOPE_BASE = 2048
INVALID = "535 5.7.8 Authentication credentials invalid"


def data_size_limit(max_email_bytes: int, max_recipients: int) -> int:
    """The SIZE the ingress announces: what leaves room for the envelope in ``max_email_bytes``."""
    return max(1, max_email_bytes - ENVELOPE_BASE - ENVELOPE_PER_RECIPIENT * max_recipients)


@dataclass(frozen=True)
class SmtpPolicy:
    hostname: str
    max_email_bytes: int
    max_recipients: int
    allow_anonymous: bool
    anonymous: Source
    # The header field that chooses the source IP ("" off).
    ip_header: str = ""


class IngressHandler:
    def __init__(
        self, policy: SmtpPolicy, users: Users | None, link: RouterLink, metrics: IngressMetrics | None = None
    ) -> None:
        self.policy = policy
        self.users = users
        self.link = link
        self.metrics = metrics if metrics is not None else IngressMetrics(None)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses if self.users is not None or not r.startswith("250-AUTH")]
        return [*kept[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", kept[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if address != "<>" and (p := validation.addr_spec_problem(address)) is not None:
            return f"553 5.1.7 Sender {shown(address)} {p}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        limit = self.policy.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients: at most {limit} per message; send the rest in another"
        if (p := validation.addr_spec_problem(address)) is not None:
            if "domain" in p:
                return f"550 5.1.2 Recipient {shown(address)} {p}"
            return f"553 5.1.3 Recipient {shown(address)} {p}"
        if address not in envelope.rcpt_tos:  # a recipient given twice gets the message once
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not tracing.enabled():
            reply, _ = await self._take(session, envelope)
            self.metrics.message(reply)
            return reply
        host, port = _peer(session)
        with tracing.span(
            "smtp ingress",
            kind=SpanKind.SERVER,
            attributes={
                "network.peer.address": host,
                "network.peer.port": port,
                "epoxi.recipients": len(envelope.rcpt_tos),
            },
        ) as span:
            reply, response = await self._take(session, envelope)
            ids = [i for b in response.batches for i in b.email_message_ids] if response else []
            message_id = ids[0] if ids else raw_message.message_id(envelope.original_content or b"")
            if message_id:
                span.set_attribute("epoxi.message_id", message_id)
            span.set_attribute("epoxi.smtp.reply_code", int(reply[:3]))
            if not reply.startswith("2"):
                span.set_status(Status(StatusCode.ERROR, reply))
        self.metrics.message(reply)
        return reply

    async def _take(
        self, session: Session, envelope: Envelope
    ) -> tuple[str, router_pb2.RouteEmailsResponse | None]:
        """The reply to one message's DATA, and the router's answer when it got one."""
        content = envelope.original_content or b""
        user = session.auth_data if isinstance(session.auth_data, User) else None
        source = Source(user.source_ip, user.ip_pool) if user is not None else self.policy.anonymous
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        email, refusal = submission.email_for(
            mail_from,
            list(envelope.rcpt_tos),
            content,
            source,
            self.policy.ip_header,
            self.policy.max_email_bytes,
        )
        if email is None:
            return refusal, None
        try:
            response = await self.link.route(email)
        except MeshUnavailable as e:
            log.warning("message from %s not taken: %s", session.peer, e)
            return submission.unavailable(str(e)), None
        except Refused as e:
            return submission.refused(e.code, e.details), None
        reply = submission.reply_for(response)
        log.info("message from %s (%s): %s", session.peer, user.name if user else "anonymous", reply)
        return reply, response

    # AUTH, over TLS only (aiosmtpd refuses it before). Checked in a thread: scrypt is CPU-bound.

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 PLAIN needs authzid NUL authcid NUL password")
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _initial_response(server, args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await _challenge(server, "Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        if self.users is None:
            self.metrics.auth_failure()
            return AuthResult(success=False, handled=False, message=INVALID)
        user = await asyncio.to_thread(self.users.authenticate, login, password)
        if user is None:
            self.metrics.auth_failure()
            return AuthResult(success=False, handled=False, message=INVALID)
        return AuthResult(success=True, auth_data=user)


def _peer(session: Session) -> tuple[str, int]:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return str(peer), 0


async def _initial_response(server: SMTP, args: list[str], prompt: str) -> bytes | None:
    if len(args) == 1:
        return await _challenge(server, prompt)
    try:
        return base64.b64decode(args[1], validate=True)
    except binascii.Error:
        await server.push("501 5.5.2 Cannot decode the base64 response")
        return None


async def _challenge(server: SMTP, prompt: str) -> bytes | None:
    answer = await server.challenge_auth(prompt)
    return answer if isinstance(answer, bytes) else None  # aborted, or not base64: answered


class IngressSMTP(SMTP):
    """aiosmtpd's SMTP, its own replies given RFC 3463 codes."""

    def __init__(self, handler: IngressHandler, size_limit: int, implicit_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, data_size_limit=size_limit, **kwargs)
        self._implicit_tls = implicit_tls
        self._handler_metrics = handler.metrics
        self._counted = False
        self._rewrites = {
            "552 Error: message size exceeds fixed maximum message size": (
                f"552 5.3.4 Message size exceeds fixed maximum message size ({size_limit} bytes)"
            ),
            "552 Error: Too much mail data": f"552 5.3.4 Message too big: at most {size_limit} bytes",
            "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
            "503 Error: need MAIL command": "503 5.5.1 Need MAIL command first",
            "503 Error: need RCPT command": "503 5.5.1 Need RCPT command first",
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:  # STARTTLS makes it again, for the same session
            self._counted = True
            self._handler_metrics.session()
        super().connection_made(transport)
        if self._implicit_tls and transport.get_extra_info("ssl_object") is not None:
            # aiosmtpd knows TLS only from STARTTLS (by this attribute, for AUTH and EHLO):
            # a connection that is TLS from its first byte is one too.
            self._tls_protocol = transport  # type: ignore[assignment]

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = self._rewrites.get(status, status)
        await super().push(status)


def session_factory(
    handler: IngressHandler,
    size_limit: int,
    tls_context: ssl.SSLContext | None,
    *,
    implicit_tls: bool,
    require_tls: bool,
) -> Callable[[], IngressSMTP]:
    """A protocol factory for one listener: STARTTLS offered when there is a certificate and the
    connection is not TLS already; AUTH offered only over TLS."""
    policy = handler.policy

    def build() -> IngressSMTP:
        return IngressSMTP(
            handler,
            size_limit,
            implicit_tls,
            hostname=policy.hostname,
            ident="Epoxi ingress",
            enable_SMTPUTF8=True,
            tls_context=None if implicit_tls else tls_context,
            require_starttls=require_tls and not implicit_tls,
            auth_required=not policy.allow_anonymous,
            auth_require_tls=True,
        )

    return build
