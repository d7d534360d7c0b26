"""MonitorService: cluster-wide discovery, stats and health, every answer read from the registry.

Pipeline counts and health come from ``/v1/health/service/<name>``; message counters come from
each passing node's live ``NodeService.GetNodeState``, asked concurrently with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import aiohttp
import grpc
from consul import ConsulException

from epoxi import runtime
from epoxi.registry import services
from epoxi.routing import routing_key, split_routing_key
from epoxi.v1 import monitor_pb2, monitor_pb2_grpc, node_pb2, node_pb2_grpc
from services.monitor import cluster

log = logging.getLogger(__name__)

RegistryError = (ConsulException, aiohttp.ClientError, OSError, TimeoutError)


class MonitorService(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, consul: Any, channels: runtime.Channels, node_timeout: float = 2.0) -> None:
        self.consul = consul
        self.channels = channels
        self.node_timeout = node_timeout

    async def FindAllPipelines(
        self, request: monitor_pb2.FindAllPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindAllPipelinesResponse:
        entries = await self._health(context, services.PIPELINE_SERVICE, passing=request.passing_only)
        response = monitor_pb2.FindAllPipelinesResponse()
        for p in cluster.pipelines_in_order(entries):
            response.nodes[p.node].pipelines.append(p)
        return response

    async def FindPipelinesByRoutingKey(
        self, request: monitor_pb2.FindPipelinesByRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindPipelinesByRoutingKeyResponse:
        key, _ = await self._key(context, request.routing_key)
        entries = await self._pipelines_for(context, key, passing=request.passing_only)
        return monitor_pb2.FindPipelinesByRoutingKeyResponse(pipelines=cluster.pipelines_in_order(entries))

    async def FindNodeForRoutingKey(
        self, request: monitor_pb2.FindNodeForRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindNodeForRoutingKeyResponse:
        key, source_ip = await self._key(context, request.routing_key)
        node_entries, pipeline_entries = await asyncio.gather(
            self._health(context, services.NODE_SERVICE, passing=True),
            self._pipelines_for(context, key, passing=True),
        )
        found = cluster.node_for_key(
            map(services.node_from_entry, node_entries),
            map(services.pipeline_from_entry, pipeline_entries),
            source_ip,
        )
        if found is None:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no passing node owns source IP {source_ip} (routing key {key})",
            )
        node, has_pipeline = found
        return monitor_pb2.FindNodeForRoutingKeyResponse(node=node, has_pipeline=has_pipeline)

    async def GetPipelineStats(
        self, request: monitor_pb2.GetPipelineStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetPipelineStatsResponse:
        stats, _, _ = await self._cluster(context)
        return monitor_pb2.GetPipelineStatsResponse(stats=stats)

    async def GetClusterStats(
        self, request: monitor_pb2.GetClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetClusterStatsResponse:
        stats, summary, nodes = await self._cluster(context)
        return monitor_pb2.GetClusterStatsResponse(pipeline_stats=stats, health_summary=summary, nodes=nodes)

    async def HealthCheckAll(
        self, request: monitor_pb2.HealthCheckAllRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.HealthCheckAllResponse:
        results, summary = cluster.health_results(await self._health(context, services.PIPELINE_SERVICE))
        return monitor_pb2.HealthCheckAllResponse(results=results, summary=summary)

    async def HealthCheckRoutingKey(
        self, request: monitor_pb2.HealthCheckRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.HealthCheckRoutingKeyResponse:
        key, _ = await self._key(context, request.routing_key)
        entries = await self._pipelines_for(context, key)
        if not entries:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no pipeline has routing key {key}")
        results, summary = cluster.health_results(entries)
        return monitor_pb2.HealthCheckRoutingKeyResponse(results=results, summary=summary)

    async def _cluster(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[monitor_pb2.PipelineStats, monitor_pb2.HealthSummary, list[node_pb2.NodeInfo]]:
        node_entries, pipeline_entries = await asyncio.gather(
            self._health(context, services.NODE_SERVICE), self._health(context, services.PIPELINE_SERVICE)
        )
        nodes = [services.node_from_entry(e) for e in node_entries]
        passing = [n for n, e in zip(nodes, node_entries, strict=True) if services.passing(e)]
        states = await asyncio.gather(*(self._node_state(n) for n in passing))
        live = {n.id: s for n, s in zip(passing, states, strict=True) if s is not None}
        pipelines = [services.pipeline_from_entry(e) for e in pipeline_entries]
        stats = cluster.pipeline_stats(nodes, pipelines, live.values())
        _, summary = cluster.health_results(pipeline_entries)
        return stats, summary, cluster.cluster_nodes(nodes, live)

    async def _node_state(self, node: node_pb2.NodeInfo) -> node_pb2.GetNodeStateResponse | None:
        """The node's live state; None (logged) when it does not answer in time."""
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(node.address))
        try:
            state: node_pb2.GetNodeStateResponse = await stub.GetNodeState(
                node_pb2.GetNodeStateRequest(), timeout=self.node_timeout
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "node %s at %s: GetNodeState failed: %s %s", node.id, node.address, e.code().name, e.details()
            )
            return None
        return state

    async def _key(self, context: grpc.aio.ServicerContext, key: str) -> tuple[str, str]:
        """The canonical routing key and its source IP; INVALID_ARGUMENT when malformed."""
        try:
            domain, ip = split_routing_key(key)
        except ValueError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return routing_key(domain, ip), ip

    async def _pipelines_for(
        self, context: grpc.aio.ServicerContext, key: str, passing: bool = False
    ) -> list[services.Entry]:
        entries = await self._health(context, services.PIPELINE_SERVICE, passing=passing, tag=key)
        return [e for e in entries if (e["Service"].get("Meta") or {}).get("routing_key") == key]

    async def _health(
        self, context: grpc.aio.ServicerContext, service: str, passing: bool = False, tag: str | None = None
    ) -> list[services.Entry]:
        try:
            _, entries = await self.consul.health.service(service, passing=passing, tag=tag)
        except RegistryError as e:
            log.warning("registry query for %s failed: %s", service, e)
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, f"cannot read {service} from the registry: {e}"
            )
        return list(entries or [])


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
