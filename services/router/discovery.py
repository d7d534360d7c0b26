"""The router's view of the cluster, read from a local cache kept fresh by blocking queries."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from epoxi.registry import services
from epoxi.registry.watch import HealthWatch
from epoxi.v1 import node_pb2, pipeline_pb2


@dataclass(frozen=True)
class ClusterSnapshot:
    """Passing nodes, and passing pipelines on passing nodes, indexed for the hot path."""

    nodes: dict[str, node_pb2.NodeInfo] = field(default_factory=dict)
    pipelines: dict[str, list[pipeline_pb2.PipelineInfo]] = field(default_factory=dict)
    pools: dict[str, list[str]] = field(default_factory=dict)
    # Passing pipelines per node ID: the registered half of epoxi.placement's metric.
    pipeline_counts: dict[str, int] = field(default_factory=dict)


def build_snapshot(
    node_entries: list[services.Entry], pipeline_entries: list[services.Entry]
) -> ClusterSnapshot:
    nodes = {n.id: n for n in map(services.node_from_entry, filter(services.passing, node_entries))}
    pipelines: dict[str, list[pipeline_pb2.PipelineInfo]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for entry in filter(services.passing, pipeline_entries):
        p = services.pipeline_from_entry(entry)
        if p.node in nodes:
            pipelines[p.routing_key].append(p)
            counts[p.node] += 1
    for candidates in pipelines.values():
        candidates.sort(key=lambda p: (nodes[p.node].load, p.node))
    pools: dict[str, set[str]] = defaultdict(set)
    for n in nodes.values():
        pools[n.ip_pool].update(n.egress_ips)
    return ClusterSnapshot(
        nodes, dict(pipelines), {pool: sorted(ips) for pool, ips in pools.items()}, dict(counts)
    )


class ClusterView:
    def __init__(self, consul: Any, wait: str = "30s") -> None:
        self._nodes = HealthWatch(consul, services.NODE_SERVICE, wait)
        self._pipelines = HealthWatch(consul, services.PIPELINE_SERVICE, wait)
        self._snapshot = ClusterSnapshot()
        self._built_at = (-1, -1)

    def start(self) -> ClusterView:
        self._nodes.start()
        self._pipelines.start()
        return self

    async def ready(self) -> None:
        await self._nodes.ready.wait()
        await self._pipelines.ready.wait()

    async def refresh(self) -> None:
        await asyncio.gather(self._nodes.refresh(), self._pipelines.refresh())

    def snapshot(self) -> ClusterSnapshot:
        at = (self._nodes.index, self._pipelines.index)
        if at != self._built_at:
            self._snapshot = build_snapshot(self._nodes.entries, self._pipelines.entries)
            self._built_at = at
        return self._snapshot

    async def close(self) -> None:
        await asyncio.gather(self._nodes.close(), self._pipelines.close())
