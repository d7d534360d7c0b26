"""Wiring for the SMTP ingress: its settings, the SMTP listeners (plain with STARTTLS, and
implicit TLS), the router link, the gRPC server (health and reflection only), its metrics
(``services.ingress.metrics``), and self-registration as ``epoxi-ingress``.

In-process use (tests, tools)::

    ingress = await start_ingress(IngressConfig(smtp_listen="127.0.0.1:0", router=router_addr))
    ...  # SMTP to ingress.smtp_address
    await ingress.close()
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epoxi import durations, settings, validation
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.grpc_metrics import GrpcServerMetrics
from epoxi.observability.metrics import new_registry
from epoxi.registry import client, services
from epoxi.registry.metrics import RegistryMetrics
from epoxi.runtime.channels import Channels
from epoxi.runtime.lifecycle import Service, advertised_address, serve_main
from epoxi.runtime.limits import message_limit
from epoxi.runtime.security import SecurityConfig, load_security, parse_switch
from epoxi.settings import group, program, setting
from services.ingress import users as user_file
from services.ingress.metrics import IngressMetrics
from services.ingress.routers import RouterLink
from services.ingress.smtp import IngressHandler, IngressSMTP, SmtpPolicy, data_size_limit, session_factory
from services.ingress.submission import Source

SERVICE = "epoxi-ingress"


class ConfigError(ValueError):
    """Settings that cannot work together: the ingress does not start."""


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{text} is not a positive number")
    return n


@program("epoxi ingress", "Accept mail over SMTP and route it through the mesh.", env_prefix="EPOXI_INGRESS_")
@dataclass(frozen=True)
class IngressConfig:
    id: str = setting(
        default_factory=lambda: f"ingress-{socket.gethostname()}",
        shown="ingress-<hostname>",
        help="registry service ID",
    )
    listen: str = setting("127.0.0.1:50054", help="host:port to serve gRPC health on (port 0: any)")
    advertise: str | None = setting(None, shown="from --listen", help="the address others dial")
    smtp_listen: str = setting("127.0.0.1:2587", help="host:port for SMTP with STARTTLS (port 0: any)")
    smtps_listen: str | None = setting(
        None, shown="off", help="host:port for SMTP over implicit TLS, port 465 style (needs --smtp-tls-cert)"
    )
    hostname: str = setting(default_factory=socket.getfqdn, shown="the FQDN", help="the name in the greeting")
    smtp_tls_cert: str | None = setting(
        None, shown="none: no STARTTLS", metavar="PEM", help="certificate chain for STARTTLS and implicit TLS"
    )
    smtp_tls_key: str | None = setting(
        None, shown="none", metavar="PEM", help="private key of --smtp-tls-cert"
    )
    require_tls: bool = setting(
        False, parse=parse_switch, metavar="0|1", shown="0", help="1: refuse mail before STARTTLS (530)"
    )
    users_file: str | None = setting(
        None, shown="none", help="TOML file of users, password hashes and source IPs (services.ingress.users)"
    )
    allow_anonymous: bool = setting(
        False, parse=parse_switch, metavar="0|1", shown="0", help="1: accept mail without AUTH"
    )
    anonymous_ip_pool: str = setting("", shown="the router's default", help="pool of anonymous mail")
    source_ip_header: str = setting(
        "", shown="off", help="header field that chooses the source IP, e.g. X-Epoxi-Source-IP"
    )
    max_recipients: int = setting(100, parse=_positive_int, help="most RCPT TO per message (then 452)")
    max_email_bytes: int = validation.max_email_bytes_setting("EPOXI_INGRESS_")
    router: str | None = setting(None, shown="from the registry", help="router gRPC address")
    router_timeout: float = setting(
        30.0, parse=durations.seconds, shown="30s", help="how long the router may take for a message"
    )
    consul: str | None = setting(
        None,
        env=("EPOXI_INGRESS_CONSUL", "CONSUL_HTTP_ADDR"),
        shown="127.0.0.1:8500",
        help="registry HTTP address",
    )
    check_interval: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how often the registry probes the ingress's health"
    )
    stop_grace: float = setting(
        5.0, parse=durations.seconds, shown="5s", help="how long calls under way may take at shutdown"
    )
    # TLS for its gRPC server and its calls to the router, and its token (epoxi.runtime.security).
    security: SecurityConfig = group(SecurityConfig)
    # Log format and the /metrics address (epoxi.observability.config).
    telemetry: TelemetryConfig = group(TelemetryConfig)


class RunningIngress(Service):
    channels: Channels
    handler: IngressHandler
    # Where SMTP clients connect: STARTTLS, and implicit TLS ("" when off).
    smtp_address: str = ""
    smtps_address: str = ""


def _tls_context(config: IngressConfig) -> ssl.SSLContext | None:
    if not config.smtp_tls_cert and not config.smtp_tls_key:
        return None
    if not (config.smtp_tls_cert and config.smtp_tls_key):
        raise ConfigError("give --smtp-tls-cert and --smtp-tls-key together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.smtp_tls_cert, config.smtp_tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--smtp-tls-cert/--smtp-tls-key cannot be used: {e}") from None
    return context


def _checked(config: IngressConfig, tls: ssl.SSLContext | None) -> user_file.Users | None:
    users = user_file.load(config.users_file) if config.users_file else None
    if users is None and not config.allow_anonymous:
        raise ConfigError("give --users-file, or --allow-anonymous 1: nobody could submit mail")
    if users is not None and tls is None:
        raise ConfigError("AUTH is offered only over TLS: give --smtp-tls-cert and --smtp-tls-key")
    if config.smtps_listen and tls is None:
        raise ConfigError("--smtps-listen needs --smtp-tls-cert and --smtp-tls-key")
    if config.require_tls and tls is None:
        raise ConfigError("--require-tls needs --smtp-tls-cert and --smtp-tls-key")
    return users


async def _listen_smtp(
    ingress: RunningIngress, address: str, factory: Callable[[], IngressSMTP], tls: ssl.SSLContext | None
) -> str:
    host, port = services.split_address(address)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host or None, port, ssl=tls)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    ingress.on_close(close)
    return advertised_address(address, server.sockets[0].getsockname()[1])


async def start_ingress(config: IngressConfig) -> RunningIngress:
    """Listen for SMTP, serve gRPC health, register as ``epoxi-ingress``."""
    security = load_security(config.security)
    tls = _tls_context(config)
    users = _checked(config, tls)
    ingress = RunningIngress("ingress", config.stop_grace)
    registry = new_registry("ingress") if config.telemetry.metrics_on else None
    async with ingress.starting():
        consul = ingress.closing(client.connect(config.consul, metrics=RegistryMetrics(registry)))
        ingress.channels = ingress.closing(Channels(message_limit(config.max_email_bytes), security))
        link = RouterLink(ingress.channels, config.router, consul, config.router_timeout)
        policy = SmtpPolicy(
            hostname=config.hostname,
            max_email_bytes=config.max_email_bytes,
            max_recipients=config.max_recipients,
            allow_anonymous=config.allow_anonymous,
            anonymous=Source(ip_pool=config.anonymous_ip_pool),
            ip_header=config.source_ip_header,
        )
        handler = ingress.handler = IngressHandler(policy, users, link, IngressMetrics(registry))
        size = data_size_limit(config.max_email_bytes, config.max_recipients)
        interceptors = [GrpcServerMetrics(registry)] if registry is not None else []
        ingress.listen(config.listen, config.advertise, interceptors, security=security)
        await ingress.expose_metrics(config.telemetry, registry)
        await ingress.serve([])
        plain = session_factory(handler, size, tls, implicit_tls=False, require_tls=config.require_tls)
        ingress.smtp_address = await _listen_smtp(ingress, config.smtp_listen, plain, None)
        if config.smtps_listen:
            implicit = session_factory(handler, size, tls, implicit_tls=True, require_tls=False)
            ingress.smtps_address = await _listen_smtp(ingress, config.smtps_listen, implicit, tls)
        await ingress.register_service(
            consul,
            security.with_tls_check(
                services.with_metrics(
                    services.grpc_service_registration(
                        SERVICE, config.id, ingress.address, durations.go(config.check_interval)
                    ),
                    ingress.metrics_address,
                )
            ),
        )
    return ingress


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse(IngressConfig, argv)
    try:
        _checked(config, _tls_context(config))
    except (ConfigError, user_file.UsersError) as e:
        print(f"epoxi ingress: {e}", file=sys.stderr)
        return 2

    async def start() -> RunningIngress:
        ingress = await start_ingress(config)
        # Read by devmesh.supervisor; the gRPC address follows in the ready line.
        smtps = f", implicit TLS on {ingress.smtps_address}" if ingress.smtps_address else ""
        print(f"ingress SMTP on {ingress.smtp_address}{smtps}", flush=True)
        return ingress

    return serve_main("ingress", start, config.telemetry, config.id)
