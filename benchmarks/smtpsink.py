"""Postfix's ``smtp-sink`` as a counting SMTP sink on a loopback port.

``smtp-sink -c`` writes ``sess=N quit=N mesg=N`` + CR whenever a message ends (``.``), a
session ends or QUIT arrives; the last ``mesg=`` is the number of messages received so far.
It throws the mail away, so it is never the bottleneck of a benchmark.

Tests use its other shapes: ``options`` passes smtp-sink's own flags (``-p``: no PIPELINING,
``-e``: no ESMTP, ``-r RCPT``/``-f RCPT``: refuse every RCPT with a 4xx/5xx, ``-b``/``-B``: that
reply), and ``dump`` keeps each transaction in a file there (``-d``; read back with ``dumps()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from benchmarks._utils import Counted, free_port, terminate, wait_listening

_MESG = re.compile(rb"mesg=(\d+)")


class SmtpSink(Counted):
    """Use ``async with SmtpSink() as sink``; ``sink.port``, ``sink.count``, ``await sink.wait_for(n)``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        max_connections: int = 2048,
        options: Sequence[str] = (),
        dump: Path | None = None,
        hostname: str = "sink.bench.test",
    ) -> None:
        self.host = host
        self.port = 0
        self.max_connections = max_connections
        self.options = list(options)
        self.dump = dump
        self.hostname = hostname
        super().__init__()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("smtp-sink") is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> SmtpSink:
        binary = shutil.which("smtp-sink")
        if binary is None:
            raise RuntimeError("smtp-sink not found: apt-get install postfix")
        self.port = free_port(self.host)
        args = [binary, "-c", "-m", str(self.max_connections), "-h", self.hostname, *self.options]
        if os.geteuid() == 0:
            args += ["-u", getpass.getuser()]  # required when run as the super-user
        if self.dump is not None:
            self.dump.mkdir(parents=True, exist_ok=True)
            args += ["-d", f"{self.dump}/%Y%m%d%H%M%S."]
        args += [f"{self.host}:{self.port}", "1024"]
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        self._reader = asyncio.create_task(self._read())
        await wait_listening(self._proc, self.host, self.port)
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout  # stop() lets go of the process while this still reads
        tail = b""
        while chunk := await stdout.read(65536):
            data = tail + chunk
            cut = data.rfind(b"\r")
            if cut < 0:
                tail = data
                continue
            found = _MESG.findall(data, 0, cut)
            tail = data[cut + 1 :]
            if found:
                self.counted(int(found[-1]))

    def dumps(self) -> list[bytes]:
        """Each transaction kept so far (``dump``), by file time (ties by name): smtp-sink's
        X-Client-Addr, X-Client-Proto, X-Helo-Args, X-Mail-Args, an X-Rcpt-Args per accepted
        RCPT and a Received, then the message as it arrived (dots unstuffed, LF line ends), then
        an empty line."""
        if self.dump is None:
            return []
        files = sorted(self.dump.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        await terminate(proc)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
