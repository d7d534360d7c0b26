"""The router's view of the cluster: the passing nodes, from a local copy of the ``epoxi-node``
health entries kept fresh by one blocking query (``epoxi.registry.watch.HealthWatch``).

The view holds nodes only. Which node runs a routing key is the key's placement record in KV
(``services.router.owners``), read once per key and cached, so a pipeline starting or stopping
anywhere costs the view nothing, and a change of a node (its meta: pipeline count, load) costs
a rebuild over the nodes alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from epoxi.registry import services
from epoxi.registry.watch import HealthWatch
from epoxi.v1 import node_pb2


@dataclass(frozen=True)
class ClusterSnapshot:
    """Passing nodes by ID, the source IPs of each IP pool, and each node's registered
    pipeline count (its ``pipeline_count`` meta: the registered half of epoxi.placement's metric)."""

    nodes: dict[str, node_pb2.NodeInfo] = field(default_factory=dict)
    pools: dict[str, list[str]] = field(default_factory=dict)
    pipeline_counts: dict[str, int] = field(default_factory=dict)


def build_snapshot(node_entries: list[services.Entry]) -> ClusterSnapshot:
    nodes = {n.id: n for n in map(services.node_from_entry, filter(services.passing, node_entries))}
    pools: dict[str, set[str]] = defaultdict(set)
    for n in nodes.values():
        pools[n.ip_pool].update(n.egress_ips)
    return ClusterSnapshot(
        nodes,
        {pool: sorted(ips) for pool, ips in pools.items()},
        {n.id: n.pipeline_count for n in nodes.values()},
    )


class ClusterView:
    def __init__(self, consul: Any, wait: str = "30s") -> None:
        self._nodes = HealthWatch(consul, services.NODE_SERVICE, wait)
        self._snapshot = ClusterSnapshot()
        self._built_from: list[services.Entry] | None = None

    def start(self) -> ClusterView:
        self._nodes.start()
        return self

    async def ready(self) -> None:
        await self._nodes.ready.wait()

    async def refresh(self) -> None:
        await self._nodes.refresh()

    def answered_at(self) -> float:
        """``time.monotonic()`` of the registry's last answer to the watch: the view is current as of then."""
        return self._nodes.answered_at

    def snapshot(self) -> ClusterSnapshot:
        """The view as of the watch's last answer; rebuilt (over the nodes) only when the watch
        stored a new answer."""
        entries = self._nodes.entries
        if entries is not self._built_from:
            self._snapshot = build_snapshot(entries)
            self._built_from = entries
        return self._snapshot

    async def close(self) -> None:
        await self._nodes.close()
