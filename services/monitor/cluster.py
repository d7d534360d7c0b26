"""Cluster answers computed from registry entries and the nodes' live state; no I/O here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from epoxi.placement import best_node
from epoxi.registry import services
from epoxi.v1 import monitor_pb2, node_pb2, pipeline_pb2

Entry = services.Entry


def pipelines_in_order(entries: Iterable[Entry]) -> list[pipeline_pb2.PipelineInfo]:
    return sorted(map(services.pipeline_from_entry, entries), key=lambda p: (p.routing_key, p.node))


def health_of(entry: Entry) -> monitor_pb2.PipelineHealth:
    return monitor_pb2.PipelineHealth(
        pipeline=services.pipeline_from_entry(entry),
        healthy=services.passing(entry),
        status=services.worst_status(entry),
        outputs=services.check_outputs(entry),
    )


def health_results(
    entries: Iterable[Entry],
) -> tuple[list[monitor_pb2.PipelineHealth], monitor_pb2.HealthSummary]:
    results = sorted(map(health_of, entries), key=lambda h: (h.pipeline.routing_key, h.pipeline.node))
    healthy = sum(h.healthy for h in results)
    return results, monitor_pb2.HealthSummary(healthy=healthy, unhealthy=len(results) - healthy)


def pipeline_stats(
    nodes: Iterable[node_pb2.NodeInfo],
    pipelines: Iterable[pipeline_pb2.PipelineInfo],
    states: Iterable[node_pb2.GetNodeStateResponse],
) -> monitor_pb2.PipelineStats:
    """Counts from the registry; message counters summed from the nodes that answered."""
    pipelines = list(pipelines)
    per_node: Counter[str] = Counter({n.id: 0 for n in nodes})
    node_count = len(per_node)
    per_node.update(p.node for p in pipelines)
    stats = monitor_pb2.PipelineStats(
        total_pipelines=len(pipelines),
        total_nodes=node_count,
        pipelines_per_node=dict(per_node),
        pipelines_per_routing_key=dict(Counter(p.routing_key for p in pipelines)),
        totals=pipeline_pb2.PipelineCounters(),
    )
    for state in states:
        for p in state.pipelines:
            add_counters(stats.totals, p.counters)
    return stats


def add_counters(total: pipeline_pb2.PipelineCounters, more: pipeline_pb2.PipelineCounters) -> None:
    total.queued += more.queued
    total.in_flight += more.in_flight
    total.deferred += more.deferred
    total.delivered += more.delivered
    total.bounced += more.bounced


def cluster_nodes(
    nodes: Iterable[node_pb2.NodeInfo], live: Mapping[str, node_pb2.GetNodeStateResponse]
) -> list[node_pb2.NodeInfo]:
    """Every registered node, with its live pipeline count and load when it answered."""
    out = []
    for n in sorted(nodes, key=lambda n: n.id):
        state = live.get(n.id)
        if state is not None and state.node.id == n.id:
            n = node_pb2.NodeInfo(
                id=n.id,
                address=n.address,
                egress_ips=state.node.egress_ips or n.egress_ips,
                ip_pool=state.node.ip_pool or n.ip_pool,
                pipeline_count=state.node.pipeline_count,
                load=state.node.load,
            )
        out.append(n)
    return out


def node_for_key(
    nodes: Iterable[node_pb2.NodeInfo], pipelines: Iterable[pipeline_pb2.PipelineInfo], source_ip: str
) -> tuple[node_pb2.NodeInfo, bool] | None:
    """A passing node running one of ``pipelines`` (least loaded first), else the best owner of the IP.

    ``nodes`` and ``pipelines`` are the passing ones; returns (node, has_pipeline) or None.
    """
    by_id = {n.id: n for n in nodes}
    running = [by_id[p.node] for p in pipelines if p.node in by_id]
    if running:
        return min(running, key=lambda n: (n.load, n.pipeline_count, n.id)), True
    owner = best_node(by_id.values(), source_ip)
    return (owner, False) if owner is not None else None
