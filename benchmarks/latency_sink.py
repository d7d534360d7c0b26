"""A lean SMTP sink that notes when it said 250 to each tracked message, for latency figures.

``smtp-sink`` only counts, so the latency phase of ``benchmarks.e2e_throughput`` delivers into
this one instead. It is an ``asyncio.Protocol`` with no parsing beyond what SMTP needs: it
offers PIPELINING (as ``smtp-sink`` does), 8BITMIME, SMTPUTF8 and ENHANCEDSTATUSCODES, accepts
every MAIL and RCPT, and throws the mail away. When a message's header section carries
``TRACK_HEADER``, ``sink.replied[value]`` is the ``time.time()`` just before the 250 to its
end-of-data was written: the same machine's clock as the client's, so the two subtract.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

from benchmarks._utils import Counted, free_port
from benchmarks.workload import TRACK_HEADER

_TRACKED = re.compile(rb"(?:^|\r\n)" + re.escape(TRACK_HEADER.encode()) + rb":[ \t]*([^\r\n]*)", re.I)
_END_OF_DATA = b"\r\n.\r\n"
# A line longer than this outside DATA is not SMTP (RFC 5321 4.5.3.1.4: 512 with its CRLF).
_MAX_COMMAND = 4096


class LatencySink(Counted):
    """``async with LatencySink() as sink``: ``sink.address``, ``sink.count``, ``sink.replied``,
    ``await sink.wait_for(n, seconds)``."""

    def __init__(self, host: str = "127.0.0.1", hostname: str = "latency-sink.bench.test") -> None:
        self.host = host
        self.port = 0
        self.hostname = hostname
        super().__init__()
        self.replied: dict[str, float] = {}
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> LatencySink:
        self.port = free_port(self.host)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, self.host, self.port, backlog=1024)
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()

    def _session(self) -> _Session:
        session = _Session(self)
        self._sessions.add(session)
        return session

    def closed(self, session: _Session) -> None:
        self._sessions.discard(session)

    def received(self, message: bytes) -> None:
        """Called just before the 250 to ``message`` (its data, dot-stuffed) is written."""
        end = message.find(b"\r\n\r\n")
        found = _TRACKED.search(message, 0, end if end >= 0 else len(message))
        if found:
            self.replied[found.group(1).decode("ascii", "replace")] = time.time()
        self.counted(self.count + 1)


class _Session(asyncio.Protocol):
    def __init__(self, sink: LatencySink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        # Where the search for the end of data resumes (it may straddle two reads).
        self.scanned = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._reply(f"220 {self.sink.hostname} ESMTP latency sink")

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.closed(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            if self.in_data:
                # The data began right after "DATA\r\n", so a leading "." line ends it as well.
                if self.buffer.startswith(b".\r\n"):
                    end = -2
                else:
                    end = self.buffer.find(_END_OF_DATA, max(0, self.scanned - len(_END_OF_DATA)))
                if end == -1:
                    self.scanned = len(self.buffer)
                    return
                message = bytes(self.buffer[: max(0, end)])
                del self.buffer[: end + len(_END_OF_DATA)]
                self.in_data, self.scanned = False, 0
                self.sink.received(message)
                self._reply("250 2.0.0 Ok: queued")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end == -1:
                if len(self.buffer) > _MAX_COMMAND:
                    self._reply("500 5.5.2 Line too long")
                    self.transport.close()
                return
            line = bytes(self.buffer[:line_end])
            del self.buffer[: line_end + 2]
            self._command(line)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self._reply(
                f"250-{self.sink.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                "250 ENHANCEDSTATUSCODES"
            )
        elif verb == b"HELO":
            self._reply(f"250 {self.sink.hostname}")
        elif verb == b"MAIL":
            self._reply("250 2.1.0 Ok")
        elif verb == b"RCPT":
            self._reply("250 2.1.5 Ok")
        elif verb == b"DATA":
            self.in_data = True
            self._reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb in (b"RSET", b"NOOP"):
            self._reply("250 2.0.0 Ok")
        elif verb == b"QUIT":
            self._reply("221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self._reply("502 5.5.1 Command not implemented")

    def _reply(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode() + b"\r\n")
