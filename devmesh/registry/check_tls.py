"""TLS for gRPC health checks, as ``tlsutil.Configurator.OutgoingTLSConfigForCheck`` sets it up.

A check with ``GRPCUseTLS`` dials over TLS. With ``enable_agent_tls_for_checks`` it uses the
agent's own TLS settings (``tls.defaults.ca_file``, ``cert_file``, ``key_file``): the CA verifies
the server and the certificate is presented, so mTLS servers can be probed; without it, the
system's roots and no client certificate. ``TLSServerName`` replaces the check address's host
both for SNI and for verifying the server's certificate; ``TLSSkipVerify`` skips verification
(Go's ``InsecureSkipVerify``) while still presenting the client certificate.

grpc-python has no way to skip verification, so such a check dials a relay of its own: a port
on 127.0.0.1 whose one connection is carried over a TLS connection (ALPN ``h2``) that Python's
``ssl`` makes without verifying, for the life of the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from devmesh.registry.state import RegistryConfig
from epoxi.runtime.tls import TlsFiles
from epoxi.tasks import cancel_and_wait

_RELAY_CHUNK = 64 * 1024


@dataclass(frozen=True)
class CheckTLS:
    """What TLS gRPC checks verify servers with and present to them."""

    files: TlsFiles | None = None
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_config(cls, config: RegistryConfig) -> CheckTLS:
        """The agent's TLS when ``enable_agent_tls_for_checks``; ``TlsError`` naming a bad file."""
        if not config.enable_agent_tls_for_checks:
            return cls()
        files = TlsFiles.read(
            config.tls_cert_file or None,
            config.tls_key_file or None,
            config.tls_ca_file or None,
            names=("tls.defaults.cert_file", "tls.defaults.key_file", "tls.defaults.ca_file"),
        )
        return cls(files, config.tls_cert_file, config.tls_key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        if self.files is None:
            return grpc.ssl_channel_credentials()
        return self.files.channel_credentials()

    def unverified_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        if self.files is not None and self.files.has_identity:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def _sni(host: str, server_name: str) -> str | None:
    """The name a Go TLS client sends: ``ServerName``, else the host unless it is an IP."""
    if server_name:
        return server_name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _unverified_relay(server: str, server_name: str, tls: CheckTLS) -> AsyncIterator[str]:
    """A local plaintext address whose connections reach ``server`` over unverified TLS."""
    host, port = _host_port(server)
    relays: list[asyncio.Task[None]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, port, ssl=tls.unverified_context(), server_hostname=_sni(host, server_name)
            )
        except (OSError, ssl.SSLError):
            writer.close()  # the probe then fails with gRPC's own "unavailable"
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relays.append(asyncio.create_task(relay(reader, writer)))

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        await cancel_and_wait(*relays)
        await listener.wait_closed()


@contextlib.asynccontextmanager
async def check_channel(
    server: str, use_tls: bool, server_name: str, skip_verify: bool, tls: CheckTLS
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel for one probe of ``server`` (``host:port``), closed afterwards."""
    if not use_tls:
        async with grpc.aio.insecure_channel(server) as channel:
            yield channel
    elif skip_verify:
        async with (
            _unverified_relay(server, server_name, tls) as local,
            grpc.aio.insecure_channel(local) as channel,
        ):
            yield channel
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        async with grpc.aio.secure_channel(server, tls.credentials(), options=options) as channel:
            yield channel
