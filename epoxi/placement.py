"""Where a new pipeline goes: the least-loaded healthy node that owns the source IP.

The metric, best first:

1. **fewest pipelines**: the pipelines the registry shows on the node, plus those this placer
   put there that the registry does not show yet (``Placements``). Counting what was just placed
   spreads the new keys of one request (or of requests close together) across the owners,
   instead of piling them all on whichever node one snapshot showed least busy;
2. then **least load**: the node's unfinished mail, as it last registered it;
3. then **node ID**, so that equal nodes are taken in one order everywhere.

``Placements`` is the tally behind (1): a routing key and the node it was placed on, kept only
until the registry's view shows the key's pipeline (on any node), the node leaves the view, or
``ttl`` passes. It never holds more than the keys placed and not yet visible, so its memory does
not grow with every key ever routed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass

from epoxi.v1 import node_pb2

# Long enough for a started pipeline to reach any registry view (its node registers it before
# StartPipeline answers); short enough that a placement nothing ever showed is soon forgotten.
PLACEMENT_TTL = 60.0


def candidates(
    nodes: Iterable[node_pb2.NodeInfo], source_ip: str, pipelines: Mapping[str, int] | None = None
) -> list[node_pb2.NodeInfo]:
    """Nodes that can send from ``source_ip``, best first by the metric above. ``pipelines``
    gives each node's pipeline count by ID (registered and just placed); without it, the count
    the node registered (``pipeline_count``)."""
    owners = [n for n in nodes if source_ip in n.egress_ips]
    if pipelines is None:
        return sorted(owners, key=lambda n: (n.pipeline_count, n.load, n.id))
    return sorted(owners, key=lambda n: (pipelines.get(n.id, 0), n.load, n.id))


def best_node(
    nodes: Iterable[node_pb2.NodeInfo], source_ip: str, pipelines: Mapping[str, int] | None = None
) -> node_pb2.NodeInfo | None:
    ranked = candidates(nodes, source_ip, pipelines)
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class _Placed:
    node: str
    at: float


class Placements:
    """Routing keys placed on a node that the registry's view does not show yet."""

    def __init__(self, ttl: float = PLACEMENT_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._placed: dict[str, _Placed] = {}
        self._per_node: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._placed)

    def place(self, key: str, node: str) -> None:
        """``key`` was just placed on ``node`` (again, or instead of where it was placed before)."""
        self.forget(key)
        self._placed[key] = _Placed(node, self._clock())
        self._per_node[node] += 1

    def node_for(self, key: str) -> str | None:
        placed = self._placed.get(key)
        return placed.node if placed is not None else None

    def forget(self, key: str, node: str | None = None) -> None:
        """Drop ``key``'s placement (only if it names ``node``, when given)."""
        placed = self._placed.get(key)
        if placed is None or (node is not None and placed.node != node):
            return
        del self._placed[key]
        self._per_node[placed.node] -= 1
        if not self._per_node[placed.node]:
            del self._per_node[placed.node]

    def pending(self, node: str) -> int:
        """How many keys were placed on ``node`` and are not in the view yet."""
        return self._per_node.get(node, 0)

    def pipelines(self, registered: Mapping[str, int], nodes: Iterable[str]) -> dict[str, int]:
        """The metric's pipeline count of each of ``nodes``: ``registered`` plus just placed."""
        return {n: registered.get(n, 0) + self._per_node.get(n, 0) for n in nodes}

    def prune(self, visible: Container[str], nodes: Container[str]) -> None:
        """Forget the keys the view shows (``visible``), those placed on a node no longer in
        ``nodes``, and those older than ``ttl``."""
        oldest = self._clock() - self.ttl
        stale = [
            key for key, p in self._placed.items() if key in visible or p.node not in nodes or p.at < oldest
        ]
        for key in stale:
            self.forget(key)
