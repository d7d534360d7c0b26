"""FindNodeForRoutingKey names the node holding the key's placement record, whatever the
pipeline services in the registry say."""

from __future__ import annotations

from typing import Any

import pytest

from epoxi.v1 import monitor_pb2 as m
from epoxi.v1 import monitor_pb2_grpc
from tests.services.monitor.support import enqueue, key_of, mail, register_pipeline
from tests.support import Nodes, unused_address

pytestmark = pytest.mark.usefixtures("default_policy")


async def test_the_record_holder_is_the_node_for_a_key(
    nodes: Nodes, consul: Any, monitor_stub: monitor_pb2_grpc.MonitorServiceStub
) -> None:
    await nodes.start("n1", "127.0.0.2")
    n2 = await nodes.start("n2", "127.0.0.2")
    key = key_of("example.org", "127.0.0.2")
    # The registry also shows a passing pipeline for the key on n1, which does not run it.
    check = await register_pipeline(consul, "n1", "example.org", "127.0.0.2", unused_address())
    await consul.agent.check.ttl_pass(check)
    await enqueue(nodes, n2.address, key, mail("example.org", "127.0.0.2", "owned"), "b1")
    found = await monitor_stub.FindNodeForRoutingKey(
        m.FindNodeForRoutingKeyRequest(routing_key=key), timeout=5
    )
    assert (found.node.id, found.node.address, found.has_pipeline) == ("n2", n2.address, True)
