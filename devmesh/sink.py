"""A local mail sink: a real aiosmtpd SMTP server that keeps what it receives.

``epoxi dev`` points every domain at one of these, and the tests use it to see what a node
delivered and from which source address. ``replies`` makes it answer chosen recipients with
a given SMTP reply (e.g. ``"451 4.3.0 try later"``), to exercise deferral and bounces;
``drop_rule`` makes it hang up at chosen recipients. With ``tls_context`` it offers STARTTLS.
It counts the SMTP sessions it served (``sessions``) and the most open at once (``peak_sessions``).
"""

from __future__ import annotations

import asyncio
import datetime
import email.parser
import email.policy
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Transaction(Protocol):
    @property
    def rcpt_tos(self) -> list[str]: ...


T = TypeVar("T", bound=_Transaction)


class Receiving(Generic[T]):
    """What a sink on aiosmtpd does besides answering: stop, say its address, and tell what it
    has received (``received``, ``changed`` set on each arrival)."""

    host: str
    port: int
    received: list[T]
    changed: asyncio.Event
    _server: asyncio.AbstractServer | None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def recipients(self) -> list[str]:
        return [r for m in self.received for r in m.rcpt_tos]

    async def wait_for(self, count: int, seconds: float = 30.0) -> list[T]:
        """Wait until at least ``count`` recipients have been received."""

        async def until() -> None:
            while len(self.recipients()) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), seconds)
        return self.received


@dataclass(frozen=True)
class Received:
    peer: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    helo: str = ""
    tls: bool = False
    # When it arrived (time.monotonic()).
    at: float = 0.0

    def message(self) -> Any:
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)


@dataclass
class _Handler:
    sink: Sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.sink.rcpt_hook is not None:
            await self.sink.rcpt_hook(address)
        if self.sink.drop_rule is not None and self.sink.drop_rule(address):
            assert server.transport is not None
            server.transport.close()  # hang up mid-session
            return "421 4.4.2 closing"  # written nowhere: the connection is gone
        reply = self.sink.reply_for(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        received = Received(
            peer=str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer),
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            helo=session.host_name or "",
            tls=session.ssl is not None,
            at=time.monotonic(),
        )
        self.sink.received.append(received)
        if self.sink.maildir is not None:
            self.sink.save(received)
        self.sink.changed.set()
        return "250 2.0.0 OK: queued"


class _Session(SMTP):
    """aiosmtpd's SMTP, counting sessions (STARTTLS reuses the session: counted once)."""

    def __init__(self, sink: Sink, handler: _Handler) -> None:
        super().__init__(
            handler,
            hostname="sink.epoxi.test",
            ident="epoxi sink",
            tls_context=sink.tls_context,
            enable_SMTPUTF8=sink.smtputf8,
        )
        self._sink = sink
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:
            self._counted = True
            self._sink.sessions += 1
            self._sink.open_sessions += 1
            self._sink.peak_sessions = max(self._sink.peak_sessions, self._sink.open_sessions)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._sink.open_sessions -= 1
        super().connection_lost(error)


def mail_file_name() -> str:
    """``20250102T030405.678901Z-<12 hex digits>.eml``: sorted by arrival, unique by the random part."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{uuid.uuid4().hex[:12]}.eml"


@dataclass
class Sink(Receiving[Received]):
    host: str = "127.0.0.1"
    port: int = 0
    maildir: Path | None = None
    replies: dict[str, str] = field(default_factory=dict)
    reply_rule: Callable[[str], str | None] | None = None
    drop_rule: Callable[[str], bool] | None = None
    # Awaited before the sink answers RCPT TO:<address>, e.g. to stall one recipient.
    rcpt_hook: Callable[[str], Awaitable[None]] | None = None
    tls_context: ssl.SSLContext | None = None
    # Offered like Postfix and the big providers offer it, so UTF-8 mail reaches the sink.
    smtputf8: bool = True
    received: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: int = 0
    open_sessions: int = 0
    peak_sessions: int = 0
    _server: asyncio.AbstractServer | None = None

    def reply_for(self, rcpt: str) -> str | None:
        if rcpt in self.replies:
            return self.replies[rcpt]
        return self.reply_rule(rcpt) if self.reply_rule else None

    def save(self, r: Received) -> Path:
        """Write ``r`` to a new file of ``maildir``, named by when it arrived: it never replaces
        one, whichever sink (this run's, an earlier run's, another at once) wrote it."""
        assert self.maildir is not None
        self.maildir.mkdir(parents=True, exist_ok=True)
        header = f"X-Epoxi-Peer: {r.peer}\r\nX-Epoxi-Envelope-To: {', '.join(r.rcpt_tos)}\r\n".encode()
        while True:
            path = self.maildir / mail_file_name()
            try:
                with path.open("xb") as f:
                    f.write(header + r.data)
                return path
            except FileExistsError:
                continue

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(
            lambda: _Session(self, handler),
            host=self.host,
            port=self.port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self


def main(argv: list[str] | None = None) -> int:
    import argparse

    from epoxi.runtime.lifecycle import run_until_signalled
    from epoxi.tasks import cancel_and_wait

    parser = argparse.ArgumentParser(
        prog="epoxi sink", description="Accept and keep mail, like a test inbox."
    )
    parser.add_argument("--listen", default="127.0.0.1:2525", help="host:port (port 0 picks one)")
    parser.add_argument(
        "--maildir", type=Path, help="write each message here, as <arrival time>-<random>.eml"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")

    async def serve(stop: asyncio.Event) -> None:
        sink = await Sink(host=host, port=int(port), maildir=args.maildir).start()
        print(f"sink listening on {sink.address}", flush=True)
        seen = 0
        while not stop.is_set():
            changed = asyncio.create_task(sink.changed.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([changed, stopped], return_when=asyncio.FIRST_COMPLETED)
            await cancel_and_wait(changed, stopped)
            sink.changed.clear()
            for r in sink.received[seen:]:
                print(f"received from {r.peer} for {', '.join(r.rcpt_tos)} ({len(r.data)} bytes)", flush=True)
            seen = len(sink.received)
        await sink.stop()

    asyncio.run(run_until_signalled(serve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
