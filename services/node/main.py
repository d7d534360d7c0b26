"""Wiring for the node: its settings, the gRPC server, the spool, SMTP delivery and the registry.

``start_node`` builds each part whole, in dependency order: its metrics (``NodeMetrics``, on a
registry of its own unless ``--metrics-listen off``), the spool, the registry client, the
sender, the bouncer and the registrar (the supervisor's hooks), the policy feed (read once), the
bound server (so the node's address is known), the ``PipelineSupervisor`` with all of them,
``/metrics`` (its address goes in the node's registry Meta as ``metrics``), then its servicer,
and the server starts.

In-process use (tests, tools)::

    node = await start_node(NodeConfig(id="n1", egress_ips=["127.0.0.2"], spool=tmp / "spool.db",
                                       routes={"*": "127.0.0.1:2525"}, consul=registry_addr))
    ...  # dial node.address
    await node.close()
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncresolver

from epoxi import durations, settings, validation
from epoxi.observability.config import TelemetryConfig
from epoxi.observability.grpc_metrics import GrpcServerMetrics
from epoxi.observability.logs import log_fields
from epoxi.observability.metrics import new_registry
from epoxi.policy_store import PolicyTable
from epoxi.registry import client
from epoxi.registry.ownership import ConsulOwnership
from epoxi.registry.services import split_address
from epoxi.runtime.channels import Channels
from epoxi.runtime.lifecycle import Service, serve_main
from epoxi.runtime.limits import message_limit
from epoxi.runtime.security import SecurityConfig, load_security
from epoxi.settings import group, program, setting
from epoxi.tasks import every
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node import outbound
from services.node.engine.dsn import Bouncer
from services.node.engine.hooks import PipelineHooks
from services.node.engine.mx import Host
from services.node.engine.retry import Retry
from services.node.engine.shaping import Shaper
from services.node.engine.spool import Spool
from services.node.handoff import ClusterPeers
from services.node.idle import IdleReaper
from services.node.metrics import NodeMetrics
from services.node.policy_feed import PolicyFeed
from services.node.registration import Registrar
from services.node.retention import Retention
from services.node.servicer import NodeService
from services.node.supervisor import PipelineSupervisor

log = logging.getLogger(__name__)

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


def parse_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def parse_route(text: str) -> tuple[str, str]:
    domain, sep, target = text.partition("=")
    if not sep or not domain or ":" not in target:
        raise argparse.ArgumentTypeError(f"route {text!r} is not DOMAIN=HOST:PORT")
    try:
        split_address(target)
    except ValueError:
        raise argparse.ArgumentTypeError(f"route {text!r}: {target!r} has no valid port") from None
    return domain, target


def non_negative_duration(text: str) -> float:
    seconds = durations.seconds(text)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return seconds


def positive_duration(text: str) -> float:
    seconds = durations.seconds(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


@program("epoxi node", "Spool mail and deliver it over SMTP.", env_prefix="EPOXI_NODE_")
@dataclass(frozen=True)
class NodeConfig:
    id: str = setting(
        default_factory=lambda: f"node-{socket.gethostname()}", shown="node-<hostname>", help="the node's ID"
    )
    egress_ips: Sequence[str] = setting(
        flag="--egress-ip",
        env="EPOXI_NODE_EGRESS_IP",
        parse=parse_ip,
        repeated=True,
        metavar="IP",
        help="a source IP this node sends from",
    )
    spool: str | Path | None = setting(None, shown="var/<id>/spool.db", help="the spool's SQLite file")
    listen: str = setting("127.0.0.1:0", help="host:port to serve gRPC on (port 0: any)")
    advertise: str | None = setting(None, shown="from --listen", help="the address others dial")
    ip_pool: str = setting("default", help="the IP pool the egress IPs belong to")
    # Domain (or "*") -> "host:port"; other domains go to their MX hosts on port 25.
    routes: Mapping[str, str] = setting(
        flag="--route",
        env="EPOXI_NODE_ROUTE",
        parse=parse_route,
        repeated=True,
        collect=dict,
        metavar="DOMAIN=HOST:PORT",
        help="send mail for DOMAIN ('*': every domain) to HOST:PORT instead of its MX hosts",
    )
    ehlo_name: str = setting(default_factory=socket.getfqdn, shown="the host's FQDN", help="the EHLO name")
    # Registry address; None runs the node without a registry.
    consul: str | None = setting(
        None,
        env=("EPOXI_NODE_CONSUL", "CONSUL_HTTP_ADDR"),
        shown="none: the node runs without a registry",
        help="registry HTTP address",
    )
    check_interval: float = setting(
        5.0,
        parse=positive_duration,
        shown="5s",
        help="how often the registry checks the node and its pipelines",
    )
    deregister_after: str = field(default="1m")
    retry_base: float = setting(
        60.0, parse=positive_duration, shown="60s", help="the first retry's delay, doubling per attempt"
    )
    retry_cap: float = field(default=3600.0)
    # Postfix's smtp_connection_cache_time_limit: mail arriving in bursts reuses the connection
    # instead of opening one per burst (on the benchmark a tenth of the node's CPU).
    connection_idle_timeout: float = setting(
        2.0,
        parse=non_negative_duration,
        shown="2s",
        help="keep an SMTP connection open this long once its pipeline has nothing due",
    )
    pipeline_idle_timeout: float = setting(
        300.0,
        parse=non_negative_duration,
        shown="5m",
        help="stop a pipeline (and leave the registry) after this long without unfinished mail; 0: never",
    )
    idempotency_window: float = setting(
        86400.0,
        parse=non_negative_duration,
        shown="24h",
        help="how long a batch's idempotency key is remembered, so a retried batch is not spooled twice; 0: forever",
    )
    retention: float = setting(
        7 * 86400.0,
        parse=non_negative_duration,
        shown="7d",
        help="delete finished mail (and its attempt history) this long after its last outcome; 0: never",
    )
    purge_interval: float = setting(
        600.0,
        parse=positive_duration,
        shown="10m",
        help="how often to delete finished mail older than --retention",
    )
    # Follow the stored policies in the registry's KV store (with a registry only).
    watch_policies: bool = field(default=True)
    # Longest wait of one blocking query on them (a change arrives at once either way);
    # None: check_interval, so the watch costs about what the TTL checks cost.
    policy_watch_wait: float | None = field(default=None)
    restart_delay: float = field(default=1.0)
    stop_grace: float = setting(
        5.0,
        parse=non_negative_duration,
        shown="5s",
        help="how long deliveries under way may take at shutdown",
    )
    smtp_timeout: float = setting(60.0, parse=positive_duration, shown="60s", help="SMTP command timeout")
    # The one size limit (epoxi.validation); it also sizes the gRPC messages (epoxi.runtime.limits).
    max_email_bytes: int = validation.max_email_bytes_setting("EPOXI_NODE_")
    resolver: dns.asyncresolver.Resolver | None = field(default=None)
    # DNS server, EHLO names, TLS, connection reuse, host backoff and DSNs (services.node.outbound).
    delivery: outbound.DeliveryConfig = group(outbound.DeliveryConfig)
    # TLS for its server and its calls to other nodes, and bearer tokens (epoxi.runtime.security).
    security: SecurityConfig = group(SecurityConfig)
    # Log format and the /metrics address (epoxi.observability.config).
    telemetry: TelemetryConfig = group(TelemetryConfig)

    @property
    def spool_path(self) -> Path:
        return Path(self.spool) if self.spool else Path("var") / self.id / "spool.db"


class RunningNode(Service):
    """A started node: ``address`` is what others dial; ``close()`` shuts it down gracefully."""

    supervisor: PipelineSupervisor
    spool: Spool
    consul: client.Consul | None = None
    registrar: Registrar | None = None
    bouncer: Bouncer | None = None
    policy_feed: PolicyFeed | None = None
    retention: Retention | None = None
    metrics: NodeMetrics

    @property
    def id(self) -> str:
        return self.supervisor.id


async def start_node(config: NodeConfig) -> RunningNode:
    """Open the spool, load the stored policies, serve NodeService, register in the registry and
    resume unfinished pipelines; then follow the policies, stop idle pipelines and purge old
    finished mail."""
    security = load_security(config.security)
    running = RunningNode(f"node {config.id}", config.stop_grace)
    async with running.starting():
        registry = new_registry("node") if config.telemetry.metrics_on else None
        metrics = running.metrics = NodeMetrics(registry)
        config.spool_path.parent.mkdir(parents=True, exist_ok=True)
        spool = running.spool = running.closing(await Spool.open(config.spool_path, metrics))
        consul = running.consul = running.closing(client.connect(config.consul)) if config.consul else None
        sender = outbound.build_sender(
            config.delivery,
            parse_routes(config.routes),
            config.ehlo_name,
            config.smtp_timeout,
            config.resolver,
            metrics,
        )
        # The routing keys the bouncer spools DSNs for; the supervisor starts or wakes their pipelines.
        spooled: asyncio.Queue[str] = asyncio.Queue()
        hooks: list[PipelineHooks] = []
        bouncer = running.bouncer = outbound.build_bouncer(
            config.delivery, spool, spooled, config.ehlo_name, metrics
        )
        if bouncer is not None:
            hooks.append(bouncer)
        registrar = None
        policies = PolicyTable()
        if consul is not None:
            registrar = running.registrar = Registrar(
                consul,
                interval=config.check_interval,
                deregister_after=config.deregister_after,
                check_fields=security.check_fields(),
            )
            hooks.append(registrar)
            if config.watch_policies:
                wait = durations.go(config.policy_watch_wait or config.check_interval)
                feed = running.policy_feed = PolicyFeed(consul, wait)
                if await feed.load():
                    policies = feed.table
        running.listen(
            config.listen,
            config.advertise,
            interceptors=[GrpcServerMetrics(registry)] if registry is not None else [],
            max_message_bytes=message_limit(config.max_email_bytes),
            security=security,
        )
        ownership = peers = None
        if consul is not None:
            ownership = ConsulOwnership(consul, config.id, running.address, f"service:{config.id}")
            channels = Channels(message_limit(config.max_email_bytes), security)
            running.on_close(channels.close)
            peers = ClusterPeers(consul, channels, config.id)
        supervisor = running.supervisor = PipelineSupervisor(
            id=config.id,
            address=running.address,
            egress_ips=config.egress_ips,
            ip_pool=config.ip_pool,
            spool=spool,
            sender=sender,
            hooks=hooks,
            spooled=spooled,
            policies=policies,
            retry=Retry(config.retry_base, config.retry_cap),
            connection_idle_timeout=config.connection_idle_timeout,
            restart_delay=config.restart_delay,
            stop_grace=config.stop_grace,
            ownership=ownership,
            peers=peers,
            instruments=metrics,
            shaper=Shaper(sender.destinations, policies.shaping, node=config.id),
        )
        running.on_close(supervisor.close)

        async def scraped() -> None:
            await metrics.refresh(
                spool, [p.status for p in supervisor.pipelines.values()], supervisor.shaper.adjustments()
            )

        await running.expose_metrics(config.telemetry, registry, before_scrape=[scraped])
        if registrar is not None:
            registrar.metrics_address = running.metrics_address
        servicer = NodeService(supervisor, max_email_bytes=config.max_email_bytes)
        await running.serve(
            [(lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, s), SERVICE_NAME)]
        )
        if registrar is not None:

            async def leave() -> None:
                # Pipelines first, then the placement records, then the registry entries: no
                # other node takes a key while this one still sends for it.
                await supervisor.close()
                await supervisor.ownership.close()
                await registrar.deregister_all(supervisor.id)

            await running.register(
                f"node {supervisor.id} and its pipelines",
                lambda: registrar.sync(supervisor.snapshot),
                leave,
            )
            # Running before the resume: each resumed pipeline is in the registry once it started.
            running.run(registrar.run(supervisor.snapshot), "registrar")
            running.run(
                every(config.check_interval, supervisor.reconcile, "reconciling routing keys"), "reconcile"
            )
        resumed = await supervisor.resume()
        if resumed:
            log.info("resumed %d pipelines: %s", len(resumed), ", ".join(p.routing_key for p in resumed))
        if running.policy_feed is not None:
            running.run(running.policy_feed.run(supervisor.apply_policies), "policy feed")
        if config.pipeline_idle_timeout > 0:
            running.run(IdleReaper(supervisor, config.pipeline_idle_timeout).run(), "idle reaper")
        if config.retention > 0 or config.idempotency_window > 0:
            running.retention = Retention(
                spool, config.retention, config.purge_interval, batch_window=config.idempotency_window
            )
            running.run(running.retention.run(), "retention")
    return running


def parse_routes(routes: Mapping[str, str]) -> dict[str, Host]:
    out = {}
    for domain, target in routes.items():
        host, port = split_address(target)
        out[domain.lower()] = Host(host, port)
    return out


def parse_config(argv: Sequence[str] | None = None) -> NodeConfig:
    """The node's settings from ``argv`` and the environment."""
    return settings.parse(NodeConfig, argv)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    if not config.egress_ips:
        raise SystemExit("epoxi node: give at least one --egress-ip (or EPOXI_NODE_EGRESS_IP)")
    # Every record the node logs names it (JSON logs: "node").
    with log_fields(node=config.id):
        return serve_main(f"node {config.id}", lambda: start_node(config), config.telemetry, config.id)
