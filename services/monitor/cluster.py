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


def cluster_pipelines(
    entries: Iterable[Entry], live: Mapping[str, node_pb2.GetNodeStateResponse]
) -> list[pipeline_pb2.PipelineInfo]:
    """Every registered pipeline, sorted by node and routing key, with its registry health; its
    status and counters as its node reports them when that node answered."""
    reported = {(node, p.routing_key): p for node, state in live.items() for p in state.pipelines}
    out = []
    for e in entries:
        p = services.pipeline_from_entry(e)
        now = reported.get((p.node, p.routing_key))
        if now is not None:
            p.status = now.status
            p.counters.CopyFrom(now.counters)
        out.append(p)
    return sorted(out, key=lambda p: (p.node, p.routing_key))


def node_health(
    entries: Iterable[Entry], live: Mapping[str, node_pb2.GetNodeStateResponse]
) -> list[monitor_pb2.NodeHealth]:
    """Each registered node's registry checks, and whether it answered GetNodeState."""
    out = []
    for e in entries:
        node = services.node_from_entry(e)
        out.append(
            monitor_pb2.NodeHealth(
                node=node.id,
                healthy=services.passing(e),
                status=services.worst_status(e),
                outputs=services.check_outputs(e),
                answered=node.id in live,
            )
        )
    return sorted(out, key=lambda h: h.node)


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


def plan_rebalance(
    states: Iterable[node_pb2.GetNodeStateResponse],
) -> tuple[list[monitor_pb2.PipelineMove], list[monitor_pb2.SkippedPipeline], dict[str, int]]:
    """Moves that even out pipeline counts, from the passing nodes' live states.

    Repeatedly takes the most-loaded node (most pipelines, then ID) that has a pipeline whose
    least-loaded other owner of its source IP (fewest pipelines, then least mail, then ID; not
    already running the key) has at least two pipelines fewer, and moves the pipeline with the
    least-loaded such target there (ties: the first routing key). Queued mail does not hold a
    pipeline back: the stop hands that mail to the target. A pipeline on a node with two or
    more pipelines above the least-loaded one that no other node can take (none sends from its
    IP, or each that does runs the key already) is skipped, once, with the reason. Each move
    lowers the sum of squared counts, so the loop ends. Returns (moves in order, skipped, node
    ID → pipeline count after the moves).
    """
    states = sorted(states, key=lambda s: s.node.id)
    nodes = {s.node.id: s.node for s in states}
    running: dict[str, dict[str, pipeline_pb2.PipelineInfo]] = {
        s.node.id: {p.routing_key: p for p in s.pipelines} for s in states
    }
    counts = {n: len(keys) for n, keys in running.items()}
    moves: list[monitor_pb2.PipelineMove] = []
    skipped: list[monitor_pb2.SkippedPipeline] = []
    settled: set[tuple[str, str]] = set()  # (node, routing key) skipped: not looked at again

    def owners(source: str, p: pipeline_pb2.PipelineInfo) -> list[str]:
        return [n for n in nodes if n != source and p.source_ip in nodes[n].egress_ips]

    def why_not(source: str, p: pipeline_pb2.PipelineInfo) -> str:
        if not owners(source, p):
            return f"no other passing node sends from {p.source_ip}"
        return f"every other passing node that sends from {p.source_ip} runs {p.routing_key} already"

    def next_move() -> tuple[str, str, pipeline_pb2.PipelineInfo] | None:
        fewest = min(counts.values(), default=0)
        for source in sorted(counts, key=lambda n: (-counts[n], n)):
            options = []  # (target's rank, routing key, target)
            for key in sorted(running[source]):
                if (source, key) in settled:
                    continue
                p = running[source][key]
                free = [n for n in owners(source, p) if key not in running[n]]
                if not free:
                    if counts[source] - fewest > 1:
                        settled.add((source, key))
                        skipped.append(monitor_pb2.SkippedPipeline(pipeline=p, reason=why_not(source, p)))
                    continue
                target = min(free, key=lambda n: (counts[n], nodes[n].load, n))
                if counts[target] + 1 < counts[source]:
                    options.append(((counts[target], nodes[target].load, target), key, target))
            if options:
                _, key, target = min(options)
                return source, target, running[source][key]
        return None

    while (move := next_move()) is not None:
        source, target, p = move
        del running[source][p.routing_key]
        running[target][p.routing_key] = p
        counts[source] -= 1
        counts[target] += 1
        moves.append(
            monitor_pb2.PipelineMove(
                routing_key=p.routing_key,
                from_node=source,
                to_node=target,
                state=monitor_pb2.PIPELINE_MOVE_STATE_PLANNED,
                pipeline=p,
            )
        )
    return moves, skipped, counts
