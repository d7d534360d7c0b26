"""The node: its spool, its running pipelines and its place in the registry.

The servicer validates requests and calls these methods; ``services.node.main.start_node``
wires a ``Node`` to a gRPC server and the registry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from epoxi import mail
from epoxi.policy import Policy
from epoxi.registry.services import pipeline_service_id
from epoxi.routing import recipients_in, routing_key
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2
from services.node.delivery import Sender
from services.node.pipeline import FAILED, RUNNING, Pipeline, Retry
from services.node.registration import PipelineState, Registrar, Snapshot
from services.node.spool import Counts, NewMessage, Spool

log = logging.getLogger(__name__)


class Node:
    def __init__(
        self,
        *,
        id: str,
        address: str,
        egress_ips: Sequence[str],
        ip_pool: str,
        spool: Spool,
        sender: Sender,
        retry: Retry | None = None,
        idle_timeout: float = 0.0,
        restart_delay: float = 1.0,
        stop_grace: float = 5.0,
    ) -> None:
        self.id = id
        self.address = address
        self.egress_ips = [str(ipaddress.ip_address(ip)) for ip in egress_ips]
        self.ip_pool = ip_pool
        self.spool = spool
        self.sender = sender
        self.retry = retry or Retry()
        self.idle_timeout = idle_timeout
        self.restart_delay = restart_delay
        self.stop_grace = stop_grace
        self.registrar: Registrar | None = None
        self.pipelines: dict[str, Pipeline] = {}
        self._lock = asyncio.Lock()

    def owns(self, ip: str) -> bool:
        try:
            return str(ipaddress.ip_address(ip)) in self.egress_ips
        except ValueError:
            return False

    async def start_pipeline(
        self, domain: str, source_ip: str, policy: Policy | None = None
    ) -> tuple[Pipeline, bool]:
        """The pipeline for (domain, source_ip), started now (True) or already running (False)."""
        domain = domain.lower()
        source_ip = str(ipaddress.ip_address(source_ip))
        key = routing_key(domain, source_ip)
        async with self._lock:
            running = self.pipelines.get(key)
            if running is not None:
                return running, False
            policy = policy or Policy(name=key)
            await self.spool.save_pipeline(key, domain, source_ip, policy)
            p = Pipeline(
                routing_key=key,
                domain=domain,
                source_ip=source_ip,
                policy=policy,
                spool=self.spool,
                sender=self.sender,
                retry=self.retry,
                idle_timeout=self.idle_timeout,
                restart_delay=self.restart_delay,
                on_failure=self._pipeline_failed,
            )
            self.pipelines[key] = p
            p.start()
        log.info("pipeline %s started", key)
        await self._sync()
        return p, True

    async def stop_pipeline(self, key: str) -> Pipeline | None:
        # Under the lock: a new pipeline for the key must not start before this one let go of its mail.
        async with self._lock:
            p = self.pipelines.pop(key, None)
            if p is None:
                return None
            await p.stop(self.stop_grace)
        if self.registrar is not None:
            await self.registrar.forget_pipeline(self.pipeline_name(key))
            await self.registrar.sync()
        log.info("pipeline %s stopped", key)
        return p

    async def resume(self) -> list[Pipeline]:
        """Start the pipelines that have unfinished mail in the spool, each with its saved policy."""
        resumed = []
        for rec in await self.spool.pipelines_to_resume():
            if not self.owns(rec.source_ip):
                log.warning("not resuming %s: this node no longer owns %s", rec.routing_key, rec.source_ip)
                continue
            p, _ = await self.start_pipeline(rec.domain, rec.source_ip, rec.policy)
            resumed.append(p)
        return resumed

    async def enqueue(self, p: Pipeline, emails: Sequence[email_pb2.Email]) -> list[str]:
        """Spool ``emails`` for ``p`` in one durable transaction; their spool IDs."""

        def render() -> list[NewMessage]:
            return [
                NewMessage(mail.sender_address(e), recipients_in(e, p.domain), mail.render(e)) for e in emails
            ]

        messages = await asyncio.to_thread(render)
        ids = await self.spool.enqueue(p.routing_key, messages)
        p.wake()
        return ids

    def pipeline_name(self, key: str) -> str:
        return pipeline_service_id(self.id, key)

    async def pipeline_info(self, p: Pipeline, counts: Counts | None = None) -> pipeline_pb2.PipelineInfo:
        counts = counts or await p.counts()
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(round(p.started_at * 1e9))
        return pipeline_pb2.PipelineInfo(
            name=self.pipeline_name(p.routing_key),
            routing_key=p.routing_key,
            node=self.id,
            address=self.address,
            policy=p.policy.to_proto(),
            started_at=started,
            status=p.status,
            counters=counts.to_proto(),
            domain=p.domain,
            source_ip=p.source_ip,
            healthy=p.status == RUNNING,
        )

    async def node_info(self) -> node_pb2.NodeInfo:
        counts = await self.spool.all_counts()
        return node_pb2.NodeInfo(
            id=self.id,
            address=self.address,
            egress_ips=self.egress_ips,
            pipeline_count=len(self.pipelines),
            load=sum(c.unfinished for c in counts.values()),
            ip_pool=self.ip_pool,
        )

    async def snapshot(self) -> Snapshot:
        states = []
        for p in list(self.pipelines.values()):
            counts = await p.counts()
            info = await self.pipeline_info(p, counts)
            states.append(PipelineState(info, p.state_line(counts), p.status == FAILED))
        return Snapshot(await self.node_info(), states)

    async def _pipeline_failed(self, p: Pipeline) -> None:
        await self._sync()

    async def _sync(self) -> None:
        if self.registrar is not None:
            await self.registrar.sync()

    async def close(self) -> None:
        """Stop every pipeline (their mail stays spooled) and leave the registry."""
        async with self._lock:
            pipelines, self.pipelines = list(self.pipelines.values()), {}
            await asyncio.gather(*(p.stop(self.stop_grace) for p in pipelines))
        if self.registrar is not None:
            await self.registrar.deregister_all(self.id)
