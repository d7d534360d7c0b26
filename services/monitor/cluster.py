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

    Pipelines move in groups: the keys of one MX site and source IP on a node (``site``, as the
    node reports it) share a shaping budget and move only together; a pipeline with no site is
    a group of its own. Repeatedly takes the most-loaded node (most pipelines, then ID) that has
    a group whose least-loaded other owner of its source IP (fewest pipelines, then least mail,
    then ID; running none of the group's keys) would still have fewer pipelines than the node
    once the group moved, and moves the group with the least-loaded such target there (ties: the
    first routing key). Queued mail does not hold a pipeline back: the stop hands that mail to
    the target. A group on a node with two or more pipelines above the least-loaded one that no
    other node can take (none sends from its IP, or each that does runs one of its keys, or it is
    too big to move without making things worse) is skipped, once, with the reason. Each move
    lowers the sum of squared counts, so the loop ends. Returns (moves in order, each group's
    keys one after the other; skipped; node ID -> pipeline count after the moves).
    """
    states = sorted(states, key=lambda s: s.node.id)
    nodes = {s.node.id: s.node for s in states}
    running: dict[str, dict[str, pipeline_pb2.PipelineInfo]] = {
        s.node.id: {p.routing_key: p for p in s.pipelines} for s in states
    }
    counts = {n: len(keys) for n, keys in running.items()}
    moves: list[monitor_pb2.PipelineMove] = []
    skipped: list[monitor_pb2.SkippedPipeline] = []
    settled: set[tuple[str, str]] = set()  # (node, first routing key of a group) skipped

    def groups(node: str) -> list[list[pipeline_pb2.PipelineInfo]]:
        """The node's pipelines by (site, source IP), each sorted by key, in order of first key."""
        found: dict[tuple[str, str], list[pipeline_pb2.PipelineInfo]] = {}
        for key in sorted(running[node]):
            p = running[node][key]
            found.setdefault((p.site or f"key {key}", p.source_ip), []).append(p)
        return list(found.values())

    def owners(source: str, ip: str) -> list[str]:
        return [n for n in nodes if n != source and ip in nodes[n].egress_ips]

    def why_not(source: str, group: list[pipeline_pb2.PipelineInfo], free: list[str]) -> str:
        p = group[0]
        if not owners(source, p.source_ip):
            return f"no other passing node sends from {p.source_ip}"
        if not free:
            keys = " or ".join(g.routing_key for g in group)
            return f"every other passing node that sends from {p.source_ip} runs {keys} already"
        return (
            f"shares MX site {p.site} from {p.source_ip} with {len(group) - 1} more pipelines here; "
            f"they move only together, and moving all {len(group)} would not even out the counts"
        )

    def next_move() -> tuple[str, str, list[pipeline_pb2.PipelineInfo]] | None:
        fewest = min(counts.values(), default=0)
        for source in sorted(counts, key=lambda n: (-counts[n], n)):
            options = []  # (target's rank, first routing key, target, group)
            for group in groups(source):
                first = group[0].routing_key
                if (source, first) in settled:
                    continue
                keys = {p.routing_key for p in group}
                free = [n for n in owners(source, group[0].source_ip) if not keys & running[n].keys()]
                target = min(free, key=lambda n: (counts[n], nodes[n].load, n)) if free else None
                if target is not None and counts[target] + len(group) < counts[source]:
                    options.append(((counts[target], nodes[target].load, target), first, target, group))
                elif counts[source] - fewest > 1 and (target is None or counts[target] + 1 < counts[source]):
                    # Nowhere to go, or only too big to go: one key alone would have moved.
                    settled.add((source, first))
                    reason = why_not(source, group, free)
                    skipped.extend(monitor_pb2.SkippedPipeline(pipeline=p, reason=reason) for p in group)
            if options:
                _, _, target, group = min(options, key=lambda o: (o[0], o[1]))
                return source, target, group
        return None

    while (move := next_move()) is not None:
        source, target, group = move
        for p in group:
            del running[source][p.routing_key]
            running[target][p.routing_key] = p
            moves.append(
                monitor_pb2.PipelineMove(
                    routing_key=p.routing_key,
                    from_node=source,
                    to_node=target,
                    state=monitor_pb2.PIPELINE_MOVE_STATE_PLANNED,
                    pipeline=p,
                )
            )
        counts[source] -= len(group)
        counts[target] += len(group)
    return moves, skipped, counts


def move_groups(moves: Iterable[monitor_pb2.PipelineMove]) -> list[list[monitor_pb2.PipelineMove]]:
    """Planned moves as the groups that go together: consecutive moves between the same nodes
    of pipelines with one (site, source IP); a pipeline with no site goes alone."""
    groups: list[list[monitor_pb2.PipelineMove]] = []
    for move in moves:
        last = groups[-1][0] if groups else None
        p = move.pipeline
        if (
            last is not None
            and p.site
            and (last.from_node, last.to_node, last.pipeline.site, last.pipeline.source_ip)
            == (move.from_node, move.to_node, p.site, p.source_ip)
        ):
            groups[-1].append(move)
        else:
            groups.append([move])
    return groups


def stop_outcome(
    node: str, address: str, response: node_pb2.StopPipelineResponse
) -> monitor_pb2.NodeStopOutcome:
    """A node's StopPipeline answer as the monitor reports it, with the keys that moved with it."""
    return monitor_pb2.NodeStopOutcome(
        node=node,
        address=address,
        stopped=True,
        pipeline=response.pipeline,
        messages_handed_off=response.messages_handed_off,
        handed_to_node=response.handed_to_node,
        messages_kept=response.messages_kept,
        kept_reason=response.kept_reason,
        moved_with=[stop_outcome(node, address, also) for also in response.moved_with],
    )
