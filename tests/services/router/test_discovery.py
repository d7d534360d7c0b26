"""The router's view holds nodes only: passing nodes, their IP pools and the pipeline count each
registered, from the ``epoxi-node`` health entries alone (services/router/discovery.py)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from epoxi.registry import services
from epoxi.registry.client import Consul
from epoxi.v1 import node_pb2, pipeline_pb2
from services.router.discovery import build_snapshot
from services.router.main import RunningRouter
from tests.services.router.nodes import ContractNodes
from tests.support import eventually


def entry(id: str, pool: str, ips: str, pipelines: int, status: str = "passing") -> services.Entry:
    return {
        "Node": {"Address": "10.0.0.1"},
        "Service": {
            "ID": id,
            "Address": "10.0.0.1",
            "Port": 50051,
            "Meta": {"egress_ips": ips, "ip_pool": pool, "pipeline_count": str(pipelines), "load": "0"},
        },
        "Checks": [{"Status": "passing"}, {"Status": status}],
    }


def test_the_snapshot_has_passing_nodes_their_pools_and_registered_counts() -> None:
    snap = build_snapshot(
        [
            entry("a", "default", "10.1.0.2,10.1.0.1", 7),
            entry("b", "default", "10.1.0.3", 0),
            entry("c", "bulk", "10.2.0.1", 1),
            entry("down", "default", "10.9.0.1", 5, status="critical"),
        ]
    )
    assert sorted(snap.nodes) == ["a", "b", "c"]
    assert snap.pools == {"default": ["10.1.0.1", "10.1.0.2", "10.1.0.3"], "bulk": ["10.2.0.1"]}
    assert snap.pipeline_counts == {"a": 7, "b": 0, "c": 1}


async def test_the_view_follows_the_nodes_meta_and_not_the_pipeline_services(
    consul: Consul, router: RunningRouter, contract_nodes: ContractNodes
) -> None:
    a = await contract_nodes.start("a", "127.0.0.2")
    await contract_nodes.all_passing()
    # A pipeline service the node did not count (yet): the view goes by the node's own count.
    pipeline = pipeline_pb2.PipelineInfo(
        name=services.pipeline_service_id("a", "x.example_127_0_0_2"),
        routing_key="x.example_127_0_0_2",
        node="a",
        address=a.info.address,
        domain="x.example",
        source_ip="127.0.0.2",
        started_at=timestamp_pb2.Timestamp(seconds=1),
    )
    await consul.agent.service.register(**services.pipeline_registration(pipeline, "1h", "1m"))
    await consul.agent.check.ttl_pass(services.pipeline_check_id(pipeline.name))

    async def counts(wanted: int) -> bool:
        snap = router.view.snapshot()
        return "a" in snap.nodes and snap.pipeline_counts["a"] == wanted

    await eventually(lambda: counts(0))
    a.pipelines.add("x.example_127_0_0_2")
    await a.register()
    await eventually(lambda: counts(1))
    assert router.view.snapshot().nodes["a"] == node_pb2.NodeInfo(
        id="a", address=a.info.address, egress_ips=["127.0.0.2"], pipeline_count=1
    )
