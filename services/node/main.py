"""Wiring for the node: flags, the gRPC server, the spool, SMTP delivery and the registry.

In-process use (tests, tools)::

    node = await start_node(NodeConfig(id="n1", egress_ips=["127.0.0.2"], spool=tmp / "spool.db",
                                       routes={"*": "127.0.0.1:2525"}, consul=registry_addr))
    ...  # dial node.address
    await node.close()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.asyncresolver

from epoxi import runtime
from epoxi.registry import client
from epoxi.registry.services import split_address
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node import outbound
from services.node.engine.delivery import Host
from services.node.engine.pipeline import Retry
from services.node.engine.spool import Spool
from services.node.idle import IdleReaper
from services.node.policy_feed import PolicyWatch
from services.node.registration import Registrar, go_duration
from services.node.retention import Retention
from services.node.servicer import NodeService
from services.node.supervisor import Node

log = logging.getLogger(__name__)

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


@dataclass
class NodeConfig:
    id: str
    egress_ips: Sequence[str] = ()
    spool: str | Path = "spool.db"
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    ip_pool: str = "default"
    # Domain (or "*") -> "host:port"; other domains go to their MX hosts on port 25.
    routes: Mapping[str, str] = field(default_factory=dict)
    ehlo_name: str = field(default_factory=socket.getfqdn)
    # Registry address; None runs the node without a registry.
    consul: str | None = None
    check_interval: float = 5.0
    deregister_after: str = "1m"
    retry_base: float = 60.0
    retry_cap: float = 3600.0
    # Seconds an SMTP connection stays open once its pipeline has nothing due.
    connection_idle_timeout: float = 0.0
    # Seconds a pipeline with no unfinished mail keeps running before it stops (0: never).
    pipeline_idle_timeout: float = 300.0
    # Seconds finished mail stays in the spool after its last outcome (0: forever), and how
    # often the node purges what is older.
    retention: float = 7 * 86400.0
    purge_interval: float = 600.0
    # Follow the stored policies in the registry's KV store (with a registry only).
    watch_policies: bool = True
    # Longest wait of one blocking query on them (a change arrives at once either way);
    # None: check_interval, so the watch costs about what the TTL checks cost.
    policy_watch_wait: float | None = None
    restart_delay: float = 1.0
    stop_grace: float = 5.0
    smtp_timeout: float = 60.0
    resolver: dns.asyncresolver.Resolver | None = None
    # DNS server, EHLO names, TLS, connection reuse, host backoff and DSNs (services.node.outbound).
    delivery: outbound.DeliveryConfig = field(default_factory=outbound.DeliveryConfig)


class RunningNode:
    """A started node: ``address`` is what others dial; ``close()`` shuts it down gracefully."""

    def __init__(
        self,
        node: Node,
        server: runtime.Server,
        spool: Spool,
        consul: client.Consul | None,
        registrar_task: asyncio.Task[None] | None,
        stop_grace: float,
    ) -> None:
        self.node = node
        self.server = server
        self.spool = spool
        self.consul = consul
        self._registrar_task = registrar_task
        self._stop_grace = stop_grace
        self._closed = False
        self.policy_watch: PolicyWatch | None = None
        self.retention: Retention | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def address(self) -> str:
        return self.node.address

    async def close(self) -> None:
        """Health NOT_SERVING and stop serving, stop pipelines, leave the registry, close the spool."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.server.stop(self._stop_grace)
        finally:
            tasks, self._tasks = self._tasks, []
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if self.policy_watch is not None:
                await self.policy_watch.close()
            if self._registrar_task is not None:
                self._registrar_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._registrar_task
            try:
                await self.node.close()
            finally:
                if self.consul is not None:
                    await self.consul.close()
                await self.spool.close()

    async def __aenter__(self) -> RunningNode:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_node(config: NodeConfig) -> RunningNode:
    """Open the spool, serve NodeService, register in the registry, load the stored policies and
    resume unfinished pipelines; then watch the policies, stop idle pipelines and purge old
    finished mail."""
    Path(config.spool).parent.mkdir(parents=True, exist_ok=True)
    spool = await Spool.open(config.spool)
    try:
        sender = outbound.build_sender(
            config.delivery,
            parse_routes(config.routes),
            config.ehlo_name,
            config.smtp_timeout,
            config.resolver,
        )
        node = Node(
            id=config.id,
            address="",
            egress_ips=config.egress_ips,
            ip_pool=config.ip_pool,
            spool=spool,
            sender=sender,
            retry=Retry(config.retry_base, config.retry_cap),
            connection_idle_timeout=config.connection_idle_timeout,
            restart_delay=config.restart_delay,
            stop_grace=config.stop_grace,
        )
        node.bouncer = outbound.build_bouncer(config.delivery, node, config.ehlo_name)
        servicer = NodeService(node)
        server = await runtime.start_server(
            config.listen,
            [(lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, s), SERVICE_NAME)],
        )
    except BaseException:
        await spool.close()
        raise
    node.address = config.advertise or advertised_address(config.listen, server.port)
    consul = client.connect(config.consul) if config.consul else None
    running = RunningNode(node, server, spool, consul, None, config.stop_grace)
    try:
        if consul is not None:
            node.registrar = Registrar(
                consul,
                node.snapshot,
                interval=config.check_interval,
                deregister_after=config.deregister_after,
            )
            await node.registrar.sync()
            if config.watch_policies:
                wait = go_duration(config.policy_watch_wait or config.check_interval)
                running.policy_watch = PolicyWatch(consul, node.apply_policies, wait)
                if await running.policy_watch.load():
                    node.policies = running.policy_watch.table
        resumed = await node.resume()
        if resumed:
            log.info("resumed %d pipelines: %s", len(resumed), ", ".join(p.routing_key for p in resumed))
        if node.registrar is not None:
            running._registrar_task = asyncio.create_task(node.registrar.run(), name=f"registrar {node.id}")
        if running.policy_watch is not None:
            running.policy_watch.start()
        if config.pipeline_idle_timeout > 0:
            reaper = IdleReaper(node, config.pipeline_idle_timeout)
            running._tasks.append(asyncio.create_task(reaper.run(), name=f"idle reaper {node.id}"))
        if config.retention > 0:
            running.retention = Retention(spool, config.retention, config.purge_interval)
            running._tasks.append(asyncio.create_task(running.retention.run(), name=f"retention {node.id}"))
    except BaseException:
        await running.close()
        raise
    return running


def advertised_address(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0]
    if host in _WILDCARDS:
        host = socket.getfqdn()
    return f"{host}:{port}"


def parse_routes(routes: Mapping[str, str]) -> dict[str, Host]:
    out = {}
    for domain, target in routes.items():
        host, port = split_address(target)
        out[domain.lower()] = Host(host, port)
    return out


def parse_route(text: str) -> tuple[str, str]:
    domain, sep, target = text.partition("=")
    if not sep or not domain or ":" not in target:
        raise argparse.ArgumentTypeError(f"route {text!r} is not DOMAIN=HOST:PORT")
    try:
        split_address(target)
    except ValueError:
        raise argparse.ArgumentTypeError(f"route {text!r}: {target!r} has no valid port") from None
    return domain, target


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"1.5"``, ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h30m"`` or ``"7d"``."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 500ms, 5s or 2m")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def non_negative_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return seconds


def positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--id", default=env("EPOXI_NODE_ID", f"node-{socket.gethostname()}"))
    parser.add_argument(
        "--listen", default=env("EPOXI_NODE_LISTEN", "127.0.0.1:0"), help="host:port (port 0: any)"
    )
    parser.add_argument("--advertise", default=env("EPOXI_NODE_ADVERTISE"), help="address others dial")
    parser.add_argument(
        "--egress-ip",
        action="append",
        dest="egress_ips",
        help="a source IP this node sends from (repeatable)",
    )
    parser.add_argument("--ip-pool", default=env("EPOXI_NODE_IP_POOL", "default"))
    parser.add_argument(
        "--spool", default=env("EPOXI_NODE_SPOOL"), help="SQLite file (default var/<id>/spool.db)"
    )
    parser.add_argument(
        "--route", action="append", dest="routes", type=parse_route, help="DOMAIN=HOST:PORT ('*': all)"
    )
    parser.add_argument("--ehlo-name", default=env("EPOXI_NODE_EHLO_NAME", socket.getfqdn()))
    parser.add_argument(
        "--consul", default=env("EPOXI_NODE_CONSUL", env("CONSUL_HTTP_ADDR")), help="registry HTTP address"
    )
    parser.add_argument(
        "--check-interval", type=parse_duration, default=env("EPOXI_NODE_CHECK_INTERVAL", "5s")
    )
    parser.add_argument(
        "--retry-base", type=parse_duration, default=env("EPOXI_NODE_RETRY_BASE", "60"), help="seconds"
    )
    parser.add_argument(
        "--connection-idle-timeout",
        type=parse_duration,
        default=env("EPOXI_NODE_CONNECTION_IDLE_TIMEOUT", "0"),
        help="keep idle SMTP connections open this long",
    )
    parser.add_argument(
        "--pipeline-idle-timeout",
        type=parse_duration,
        default=env("EPOXI_NODE_PIPELINE_IDLE_TIMEOUT", "5m"),
        help="stop a pipeline (and leave the registry) after this long without unfinished mail; 0: never",
    )
    parser.add_argument(
        "--retention",
        type=non_negative_duration,
        default=env("EPOXI_NODE_RETENTION", "7d"),
        help="delete finished mail (and its attempt history) this long after its last outcome; 0: never",
    )
    parser.add_argument(
        "--purge-interval",
        type=positive_duration,
        default=env("EPOXI_NODE_PURGE_INTERVAL", "10m"),
        help="how often to delete finished mail older than --retention",
    )
    outbound.add_arguments(parser, parse_duration)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    env = os.environ.get
    egress = args.egress_ips or [ip for ip in env("EPOXI_NODE_EGRESS_IP", "").split(",") if ip]
    routes = args.routes or [parse_route(r) for r in env("EPOXI_NODE_ROUTE", "").split(",") if r]
    return NodeConfig(
        id=args.id,
        egress_ips=egress,
        spool=args.spool or Path("var") / args.id / "spool.db",
        listen=args.listen,
        advertise=args.advertise,
        ip_pool=args.ip_pool,
        routes=dict(routes),
        ehlo_name=args.ehlo_name,
        consul=args.consul or None,
        check_interval=args.check_interval,
        retry_base=args.retry_base,
        connection_idle_timeout=args.connection_idle_timeout,
        pipeline_idle_timeout=args.pipeline_idle_timeout,
        retention=args.retention,
        purge_interval=args.purge_interval,
        delivery=outbound.config_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epoxi node", description="Spool mail and deliver it over SMTP.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.egress_ips or os.environ.get("EPOXI_NODE_EGRESS_IP")):
        parser.error("give at least one --egress-ip (or EPOXI_NODE_EGRESS_IP)")
    return runtime.serve_main(f"node {args.id}", parser, lambda a: start_node(config_from_args(a)), argv)
