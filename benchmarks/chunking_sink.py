"""An SMTP sink that offers PIPELINING and CHUNKING (RFC 3030), for measuring BDAT.

Postfix's ``smtp-sink`` does not offer CHUNKING, and Postfix's ``smtpd``, which does, writes every
message to its queue (disk-bound well below either client), so BDAT against DATA is measured
against this one, run in a process of its own (``ChunkingSink``) so that its CPU is not the
client's. It accepts every command, throws the mail away, and answers all the commands of one
read in one write, as a pipelining server may (RFC 2920 3.2).

``python -m benchmarks.chunking_sink HOST PORT`` serves until terminated.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from benchmarks._utils import free_port, terminate, wait_listening
from devmesh.started import Started

_EHLO = b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
_END_OF_DATA = b"\r\n.\r\n"


class _Session(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False
        self._bdat_left = 0
        self._quit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        start = 0
        while start < len(buffer) and not self._quit:
            if self._bdat_left:
                taken = min(self._bdat_left, len(buffer) - start)
                self._bdat_left -= taken
                start += taken
                if self._bdat_left:
                    break
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            if self._in_data:
                # The body follows the DATA line's CRLF, so its end may be ".\r\n" right away.
                end = buffer.find(_END_OF_DATA, max(start - 2, 0))
                if end < 0:
                    break
                self._in_data = False
                start = end + len(_END_OF_DATA)
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buffer.find(b"\r\n", start)
            if end < 0:
                break
            out.append(self._command(bytes(buffer[start:end])))
            start = end + 2
        del buffer[:start]
        if out and self._transport is not None:
            self._transport.write(b"".join(out))
            if self._quit:
                self._transport.close()

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return _EHLO
        if verb == b"DATA":
            self._in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"BDAT":
            self._bdat_left = int(line.split()[1])
            if self._bdat_left == 0:
                return b"250 2.0.0 Ok: queued\r\n"
            return b""
        if verb == b"QUIT":
            self._quit = True
            return b"221 2.0.0 Bye\r\n"
        return b"250 2.0.0 Ok\r\n"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Session, host, port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


class ChunkingSink(Started):
    """``async with ChunkingSink() as sink``: the sink in a child process; ``sink.address``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> ChunkingSink:
        self.port = free_port(self.host)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.chunking_sink", self.host, str(self.port)
        )
        await wait_listening(self._proc, self.host, self.port)
        return self

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        await terminate(proc)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.chunking_sink HOST PORT")
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
