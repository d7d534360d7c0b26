"""Where a new pipeline goes: the least-loaded healthy node that owns the source IP."""

from __future__ import annotations

from collections.abc import Iterable

from epoxi.v1 import node_pb2


def candidates(nodes: Iterable[node_pb2.NodeInfo], source_ip: str) -> list[node_pb2.NodeInfo]:
    """Nodes that can send from ``source_ip``, best first (fewest pipelines, then least mail, then ID)."""
    owners = [n for n in nodes if source_ip in n.egress_ips]
    return sorted(owners, key=lambda n: (n.pipeline_count, n.load, n.id))


def best_node(nodes: Iterable[node_pb2.NodeInfo], source_ip: str) -> node_pb2.NodeInfo | None:
    ranked = candidates(nodes, source_ip)
    return ranked[0] if ranked else None
