"""STARTTLS against a TLS-capable sink with a certificate made for the test."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devmesh.sink import Sink
from services.node.engine.mx import Destinations, Host
from services.node.engine.reply import Reply
from services.node.engine.smtp import SmtpSender
from services.node.engine.tls import TlsMode, TlsPolicy
from tests.services.node.support import SOURCE_IP

DATA = b"From: ann@sender.test\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def make_certificate(directory: Path, dns_names: tuple[str, ...], ips: tuple[str, ...]) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``dns_names`` and ``ips``: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / f"{dns_names[0]}.pem", directory / f"{dns_names[0]}.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certfile, keyfile


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path, ("sink.epoxi.test",), ("127.0.0.1",))


@pytest.fixture
async def tls_sink(certificate: tuple[Path, Path]) -> AsyncIterator[Sink]:
    s = await Sink(host="127.0.0.1", tls_context=server_context(*certificate)).start()
    yield s
    await s.stop()


async def send(sink: Sink, tls: TlsPolicy) -> tuple[Reply, bool]:
    sender = SmtpSender(
        Destinations({"*": Host(sink.host, sink.port)}), "node.epoxi.test", timeout=5, tls=tls
    )
    conn = sender.connection("example.com", SOURCE_IP)
    try:
        result = (await conn.send("ann@sender.test", ["bob@example.com"], DATA))["bob@example.com"]
        return result, conn.tls
    finally:
        await conn.close()


async def test_starttls_is_used_when_offered(tls_sink: Sink) -> None:
    reply, tls = await send(tls_sink, TlsPolicy())
    assert (reply.accepted, tls) == (True, True)
    [received] = tls_sink.received
    assert received.tls  # the sink saw the message inside TLS
    assert received.helo == "node.epoxi.test"  # greeted again after the handshake
    assert tls_sink.sessions == 1


async def test_a_server_without_starttls_gets_plaintext(sink: Sink) -> None:
    reply, tls = await send(sink, TlsPolicy())
    assert (reply.accepted, tls) == (True, False)
    assert [r.tls for r in sink.received] == [False]


async def test_tls_off_stays_plaintext(tls_sink: Sink) -> None:
    reply, tls = await send(tls_sink, TlsPolicy(TlsMode.OFF))
    assert (reply.accepted, tls) == (True, False)
    assert [r.tls for r in tls_sink.received] == [False]


async def test_a_failed_handshake_is_retried_once_without_tls() -> None:
    # A server context without a certificate: STARTTLS is offered, every handshake fails.
    broken = await Sink(host="127.0.0.1", tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)).start()
    try:
        reply, tls = await send(broken, TlsPolicy())
    finally:
        await broken.stop()
    assert (reply.accepted, tls) == (True, False)
    assert [r.tls for r in broken.received] == [False]
    assert broken.sessions == 2  # the failed TLS session, then the plaintext one


async def test_required_tls_never_falls_back_to_plaintext(sink: Sink) -> None:
    reply, _ = await send(sink, TlsPolicy(TlsMode.REQUIRED))
    assert reply.temporary
    assert "does not offer STARTTLS" in reply.text
    assert sink.received == []


async def test_verified_tls_checks_the_certificate(
    tls_sink: Sink, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    certfile, _ = certificate
    reply, tls = await send(tls_sink, TlsPolicy(TlsMode.VERIFY, str(certfile)))
    assert (reply.accepted, tls) == (True, True)

    other, _ = make_certificate(tmp_path, ("other.epoxi.test",), ())
    reply, _ = await send(tls_sink, TlsPolicy(TlsMode.VERIFY, str(other)))
    assert reply.temporary
    assert "CERTIFICATE_VERIFY_FAILED" in reply.text
    assert len(tls_sink.received) == 1  # nothing went in plaintext
