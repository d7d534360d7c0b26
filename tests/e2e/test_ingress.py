"""The SMTP ingress as its own process in front of a real mesh of processes (dev registry,
router, nodes, ingress; devmesh.supervisor.Mesh) and a real sink, with two independent clients:
swaks (Debian's) and Python's smtplib. Mail answered 250 survives a SIGKILL of its node."""

from __future__ import annotations

import asyncio
import shutil
import signal
import smtplib
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from tests.epoxi.runtime.certs import Pki, make_pki
from tests.services.ingress.support import ALICE_IP, MESSAGE, PASSWORDS, connect, in_thread, write_users
from tests.support import batch_without_waiting

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
DEFAULT_IP = "127.0.0.2"
MAX_BYTES = 128 * 1024

pytestmark = pytest.mark.skipif(
    not Path(SWAKS).exists(), reason="swaks is not installed (apt-get install swaks)"
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def mesh(tmp_path: Path, sink: Sink, pki: Pki) -> AsyncIterator[Mesh]:
    users = write_users(tmp_path / "users.toml")
    nodes = [NodeSpec("node1", [DEFAULT_IP]), NodeSpec("node2", [ALICE_IP], ip_pool="alice")]
    m = Mesh(
        data_dir=tmp_path,
        nodes=nodes,
        route=f"*={sink.address}",
        ingress=True,
        ingress_args=[
            *("--id", "ingress-e2e"),
            *("--users-file", str(users)),
            *("--smtp-tls-cert", str(pki.cert), "--smtp-tls-key", str(pki.key)),
            *("--max-recipients", "3", "--max-email-bytes", str(MAX_BYTES)),
        ],
    )
    await m.start()
    try:
        assert m.consul is not None
        await batch_without_waiting(m.consul)
        yield m
    finally:
        await m.stop()


async def swaks(mesh: Mesh, *args: str, tls: bool = True, user: str | None = "alice") -> tuple[int, str]:
    host, _, port = mesh.smtp_address.rpartition(":")
    argv = [SWAKS, "--server", host, "--port", port, "--helo", "client.test", "--timeout", "60"]
    if tls:
        argv.append("--tls")
    if user is not None:
        argv += ["--auth", "PLAIN", "--auth-user", user, "--auth-password", PASSWORDS[user]]
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def data_file(tmp_path: Path, data: bytes) -> str:
    """``--data`` for ``data``: swaks ends DATA with CRLF "." CRLF itself, so the file does not
    end in the message's last CRLF (swaks converts line ends and dot-stuffs on its own)."""
    path = tmp_path / "message.eml"
    path.write_bytes(data.removesuffix(b"\r\n"))
    return f"@{path}"


async def test_swaks_sends_a_normal_message(mesh: Mesh, sink: Sink, tmp_path: Path) -> None:
    code, out = await swaks(
        mesh,
        "--from",
        "alice@shop.test",
        "--to",
        "ann@a.test",
        "--data",
        data_file(tmp_path, MESSAGE),
    )
    assert code == 0, out
    assert "<~  250 2.0.0 Ok: queued as " in out, out
    [m] = await sink.wait_for(1)
    assert (m.data, m.peer, m.mail_from) == (MESSAGE, ALICE_IP, "alice@shop.test")


async def test_swaks_attachment_and_non_ascii_headers_arrive_byte_for_byte(
    mesh: Mesh, sink: Sink, tmp_path: Path
) -> None:
    message = EmailMessage()
    message["From"] = "=?utf-8?q?J=C3=B6rg?= <jorg@shop.test>"
    message["To"] = "ann@a.test"
    message["Subject"] = "Rechnung für März"  # RFC 2047 encoded by the email package
    message["Message-ID"] = "<swaks-attach@shop.test>"
    message.set_content("Grüße\n", cte="8bit")
    message.add_attachment(bytes(range(256)) * 20, maintype="application", subtype="pdf", filename="März.pdf")
    data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    assert b"=?utf-8?" in data and not data.isascii()  # encoded words, and an 8-bit body
    code, out = await swaks(
        mesh,
        "--from",
        "jorg@shop.test",
        "--to",
        "ann@a.test",
        "--data",
        data_file(tmp_path, data),
        "--pipeline",
    )
    assert code == 0, out
    [m] = await sink.wait_for(1)
    assert m.data == data


async def test_swaks_auth_before_starttls_is_refused(mesh: Mesh, sink: Sink) -> None:
    code, out = await swaks(mesh, "--from", "alice@shop.test", "--to", "ann@a.test", tls=False)
    assert code != 0, out
    assert "Host did not advertise authentication" in out, out
    # Without AUTH, no mail: 530.
    code, out = await swaks(mesh, "--from", "alice@shop.test", "--to", "ann@a.test", tls=False, user=None)
    assert "530 5.7.0 Authentication required" in out, out
    assert sink.received == []


async def test_swaks_oversized_message_is_552(mesh: Mesh, tmp_path: Path) -> None:
    big = MESSAGE + (b"x" * 900 + b"\r\n") * (MAX_BYTES // 900 + 10)
    code, out = await swaks(
        mesh,
        "--from",
        "alice@shop.test",
        "--to",
        "ann@a.test",
        "--data",
        data_file(tmp_path, big),
    )
    assert code != 0, out
    assert "552 5.3.4 " in out, out


async def test_swaks_recipient_limit_and_bad_address(mesh: Mesh) -> None:
    _, out = await swaks(mesh, "--from", "alice@shop.test", "--to", "a@a.test,b@a.test,c@a.test,d@a.test")
    assert "452 4.5.3 Too many recipients" in out, out
    _, out = await swaks(mesh, "--from", "alice@shop.test", "--to", "ann@-bad-.test")
    assert "550 5.1.2 " in out, out


async def test_smtplib_pipelines_many_messages_on_one_connection(mesh: Mesh, sink: Sink, pki: Pki) -> None:
    def run() -> list[dict[str, tuple[int, bytes]]]:
        with connect(mesh.smtp_address, pki.ca) as smtp:
            assert smtp.has_extn("pipelining")
            return [
                smtp.sendmail(
                    "alice@shop.test", [f"r{i}@a.test"], MESSAGE.replace(b"order-1", f"m{i}".encode())
                )
                for i in range(20)
            ]

    assert await in_thread(run) == [{}] * 20
    got = await sink.wait_for(20)
    assert {m.peer for m in got} == {ALICE_IP}


async def test_no_mail_is_lost_when_the_node_that_took_it_is_killed(mesh: Mesh, sink: Sink, pki: Pki) -> None:
    # The sink holds the node's first delivery at RCPT, so the mail is in the node's spool only.
    delivering = asyncio.Event()
    release = asyncio.Event()

    async def hold(address: str) -> None:
        if not release.is_set():
            delivering.set()
            await release.wait()

    sink.rcpt_hook = hold

    def run() -> tuple[int, bytes]:
        with connect(mesh.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("keep@a.test")
            return smtp.data(MESSAGE)

    code, text = await in_thread(run)
    assert code == 250, text
    await asyncio.wait_for(delivering.wait(), 60)
    assert await mesh.stop_process("node2", signal.SIGKILL) == -signal.SIGKILL
    release.set()
    await mesh.restart("node2")  # from the same spool
    [m] = await sink.wait_for(1, seconds=60)
    assert (m.rcpt_tos, m.data, m.peer) == (["keep@a.test"], MESSAGE, ALICE_IP)


async def test_451_while_no_node_runs_then_250(mesh: Mesh, sink: Sink, pki: Pki) -> None:
    await mesh.stop_process("node2")  # alice's IP has no node now

    def attempt() -> tuple[int, bytes]:
        with connect(mesh.smtp_address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    async def refused() -> tuple[int, bytes] | None:
        reply = await in_thread(attempt)
        return reply if reply[0] == 451 else None  # once the router sees node2 gone

    from tests.support import eventually

    code, text = await eventually(refused, seconds=60, step=0.5)
    assert text.startswith(b"4.3.0 Try again later"), text
    await mesh.restart("node2")
    code, text = await in_thread(attempt)  # the client's retry
    assert code == 250, text
    [m] = await sink.wait_for(1)
    assert m.data == MESSAGE


_ = smtplib


async def test_the_ingress_registers_with_a_passing_grpc_health_check(mesh: Mesh) -> None:
    await mesh.wait_passing("epoxi-ingress", {"ingress-e2e"})
