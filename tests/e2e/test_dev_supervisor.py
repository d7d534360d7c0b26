"""`epoxi dev` tells you when a service dies: which one, how, the end of its log; and it restarts it.

Each test runs `epoxi dev` as a real process, every port picked free, its data in tmp_path, and
kills one of its services with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from epoxi.envelope import new_email
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from tests.support import eventually

WAIT = 120.0
SERVICES = ("registry", "sink", "node1", "node2", "router", "monitor", "gateway", "ingress")
UP_LINE = re.compile(r"^  (\w+)\s+(\S+)\s+pid (\d+)$")
NODE1_IP = "127.0.0.2"


class Dev:
    """A running `epoxi dev`, its console read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, data: Path) -> None:
        self.proc = proc
        self.data = data
        self.lines: list[str] = []
        self._added = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.pids: dict[str, int] = {}
        self.addresses: dict[str, str] = {}

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._added.set()
        self._added.set()

    @property
    def console(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, pattern: str, after: int = 0) -> int:
        """The index of the first console line from ``after`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        async with asyncio.timeout(WAIT):
            while True:
                self._added.clear()
                for i in range(after, len(self.lines)):
                    if regex.search(self.lines[i]):
                        return i
                if self._reader.done():
                    raise AssertionError(f"epoxi dev ended without {pattern!r}:\n{self.console}")
                await self._added.wait()

    async def up(self) -> None:
        """Wait until the mesh is up and learn each service's pid and address."""
        end = await self.wait_for(r"^Ctrl-C stops the mesh\.$")
        for line in self.lines[:end]:
            if m := UP_LINE.match(line):
                self.addresses[m[1]] = m[2]
                self.pids[m[1]] = int(m[3])
        assert set(self.pids) == set(SERVICES), self.console

    def report_tail(self, start: int) -> list[str]:
        """The log lines a death report starting at console line ``start`` shows."""
        tail = []
        for line in self.lines[start + 2 :]:
            if not line.startswith("   | "):
                break
            tail.append(line.removeprefix("   | "))
        return tail

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            code = await self.proc.wait()
            await self._reader
        return code


async def start_dev(data: Path, *args: str) -> Dev:
    ports = [
        f"--{name}=127.0.0.1:0" for name in ("registry", "router", "monitor", "gateway", "sink", "ingress")
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *["-m", "cli", "dev", "--data-dir", str(data), *ports, *args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return Dev(proc, data)


@pytest.fixture
async def dev(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Dev]:
    args: tuple[str, ...] = getattr(request, "param", ())
    d = await start_dev(tmp_path, *args)
    try:
        await d.up()
        yield d
    finally:
        # Not once its output has ended: kill() would reap it before asyncio's child watcher does.
        if d.proc.returncode is None and not d._reader.done():
            d.proc.kill()
        await d.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def log_before(log: Path, marker: str) -> list[str]:
    """The lines of ``log`` before the first line that holds ``marker``, markers left out."""
    lines = log.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if marker in line)
    return [line for line in lines[:end] if not line.startswith("--- ")]


async def route_until_accepted(router: str, rcpt: str, ip: str) -> None:
    """Route one email until its batch is accepted (the router may not see a restarted node yet)."""
    email = new_email("Test <t@epoxi.dev>", to=[rcpt], subject="after the restart", text="hello")
    email.delivery.CopyFrom(email_pb2.Delivery(ip=ip))

    async def accepted() -> bool:
        async with channel(router) as ch:
            reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
                router_pb2.RouteEmailsRequest(emails=[email]), timeout=30
            )
        return bool(reply.successful_batches == 1)

    await eventually(accepted, seconds=WAIT, step=0.2)


def mail_for(sink: Path, rcpt: str) -> list[Path]:
    return [p for p in sink.glob("*.eml") if f"X-Epoxi-Envelope-To: {rcpt}".encode() in p.read_bytes()]


async def test_a_killed_node_is_reported_restarted_and_delivers_again(dev: Dev) -> None:
    sink = dev.data / "sink"
    demo_mail = set(sink.iterdir())
    assert demo_mail
    killed = dev.pids["node1"]
    os.kill(killed, signal.SIGKILL)

    died = await dev.wait_for(rf"^!! node1 \(pid {killed}\) died: killed by SIGKILL \(exit code -9\)$")
    log = dev.data / "logs" / "node1.log"
    output = log_before(log, f"(pid {killed}) died")[-20:]
    assert dev.lines[died + 1] == f"   last {len(output)} lines of {log}:", dev.console
    assert dev.report_tail(died) == output
    assert f"node node1 listening on {dev.addresses['node1']}" in output
    await dev.wait_for(r"^!! node1: restarting it in 0\.5 s$", died)
    back = await dev.wait_for(
        r"^>> node1 restarted and ready: pid \d+ at 127\.0\.0\.1:\d+ \(restart 1\)$", died
    )
    new_pid = int(dev.lines[back].split("pid ")[1].split()[0])
    assert new_pid != killed
    assert alive(new_pid)

    await route_until_accepted(dev.addresses["router"], "zed@restart.test", NODE1_IP)
    await eventually(lambda: asyncio.to_thread(mail_for, sink, "zed@restart.test"), seconds=WAIT)
    assert demo_mail < set(sink.iterdir()), "the mail delivered before the restart is kept"

    assert await dev.stop() == 0, dev.console
    for pid in [*dev.pids.values(), new_pid]:
        assert not alive(pid), f"pid {pid} outlived epoxi dev"


async def test_a_killed_router_comes_back_at_its_address(dev: Dev) -> None:
    killed = dev.pids["router"]
    os.kill(killed, signal.SIGKILL)

    died = await dev.wait_for(rf"^!! router \(pid {killed}\) died: killed by SIGKILL \(exit code -9\)$")
    address = re.escape(dev.addresses["router"])
    await dev.wait_for(rf"^>> router restarted and ready: pid \d+ at {address} \(restart 1\)$", died)
    await route_until_accepted(dev.addresses["router"], "amy@router-restart.test", NODE1_IP)
    assert await dev.stop() == 0, dev.console


async def test_the_killed_registry_is_reported_and_not_restarted(dev: Dev) -> None:
    killed = dev.pids["registry"]
    os.kill(killed, signal.SIGKILL)

    died = await dev.wait_for(rf"^!! registry \(pid {killed}\) died: killed by SIGKILL \(exit code -9\)$")
    said = await dev.wait_for(r"^!! registry: not restarted: .*in memory.*restart epoxi dev$", died)
    assert await dev.stop() == 0, dev.console
    assert "registry restarted" not in "\n".join(dev.lines[said:])


@pytest.mark.parametrize("dev", [("--no-demo", "--give-up-after", "2")], indirect=True)
async def test_a_node_that_crashes_at_each_start_is_given_up_its_traceback_kept(dev: Dev) -> None:
    spool = dev.data / "node1" / "spool.db"
    # A directory where the spool's file should be: the node's next start fails in SQLite.
    for path in (spool, spool.with_name("spool.db-wal"), spool.with_name("spool.db-shm")):
        path.unlink(missing_ok=True)
    spool.mkdir()
    killed = dev.pids["node1"]
    os.kill(killed, signal.SIGKILL)

    died = await dev.wait_for(rf"^!! node1 \(pid {killed}\) died: killed by SIGKILL \(exit code -9\)$")
    await dev.wait_for(r"^!! node1: restarting it in 0\.5 s$", died)
    failed = await dev.wait_for(r"^!! node1 \(pid (\d+)\) exited before it was ready: exit code 1$", died)
    assert "sqlite3.OperationalError: unable to open database file" in dev.report_tail(failed)
    await dev.wait_for(r"^!! node1: given up: it failed 2 times in a row", failed)

    log = (dev.data / "logs" / "node1.log").read_text()
    assert "Traceback (most recent call last):" in log
    assert "sqlite3.OperationalError: unable to open database file" in log
    assert f"node1 (pid {killed}) died: killed by SIGKILL (exit code -9) ---" in log
    assert re.search(r"node1 \(pid \d+\) died: exit code 1 ---", log)
    # Without -v, service output reaches the console only inside a death report.
    assert not [line for line in dev.lines if " INFO " in line and not line.startswith("   | ")]
    assert await dev.stop() == 0, dev.console


async def test_mail_sent_to_the_ingress_is_delivered(dev: Dev) -> None:
    host, _, port = dev.addresses["ingress"].rpartition(":")
    message = b"From: app@epoxi.dev\r\nTo: ivy@ingress.test\r\nSubject: via SMTP\r\n\r\nhello\r\n"

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, int(port), local_hostname="client.test", timeout=60) as smtp:
            return smtp.sendmail("app@epoxi.dev", ["ivy@ingress.test"], message)

    assert await asyncio.to_thread(send) == {}
    [path] = await eventually(
        lambda: asyncio.to_thread(mail_for, dev.data / "sink", "ivy@ingress.test"), seconds=WAIT
    )
    assert path.read_bytes().endswith(message)
    assert await dev.stop() == 0, dev.console
