"""One size limit on every hop (max_email_bytes), over real gRPC: router, real nodes, the registry
and the SMTP sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import settings
from epoxi.envelope import new_email
from epoxi.registry.client import Consul
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2, router_pb2, router_pb2_grpc
from services.router.main import RouterConfig, RunningRouter, start_router
from services.router.servicer import DISAGREEMENT
from tests.support import Nodes, eventually, passing_nodes

MiB = 1024 * 1024
IP = "127.0.0.2"


def email(to: str, attachment_bytes: int, message_id: str = "") -> email_pb2.Email:
    return new_email(
        "a@sender.test",
        to=[to],
        subject="big",
        text="see attached",
        message_id=message_id,
        attachments=[email_pb2.Attachment(filename="big.bin", content=b"x" * attachment_bytes)],
        delivery=email_pb2.Delivery(ip=IP),
    )


async def start_router_with(registry: RunningRegistry, **config: Any) -> RunningRouter:
    return await start_router(
        RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0, **config)
    )


@pytest.fixture
async def router(registry: RunningRegistry) -> AsyncIterator[RunningRouter]:
    r = await start_router_with(registry)
    yield r
    await r.close()


async def start_nodes(nodes: Nodes, consul: Consul, *ids: str, **config: Any) -> None:
    for node_id in ids:
        await nodes.start(node_id, IP, retry_base=0.05, **config)
    await eventually(lambda: has_all(consul, set(ids)), seconds=20)


async def has_all(consul: Consul, ids: set[str]) -> bool:
    return await passing_nodes(consul) >= ids


async def route(router: RunningRouter, *emails: email_pb2.Email) -> router_pb2.RouteEmailsResponse:
    async with channel(router.address) as ch:
        reply: router_pb2.RouteEmailsResponse = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=emails), timeout=30
        )
        return reply


async def refused(router: RunningRouter, *emails: email_pb2.Email) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await route(router, *emails)
    return err.value


async def untouched(nodes: Nodes, *ids: str) -> None:
    """No pipeline was started on these nodes, and nothing was spooled."""
    for node_id in ids:
        state = await nodes.stub(node_id).GetNodeState(node_pb2.GetNodeStateRequest(), timeout=5)
        stats = await nodes.stub(node_id).GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
        assert list(state.pipelines) == [] and list(stats.pipelines) == [], node_id


async def test_a_5_mib_email_is_routed_and_delivered(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    await start_nodes(nodes, consul, "a", "b")
    reply = await route(router, email("x@example.com", 5 * MiB))
    [batch] = reply.batches
    assert batch.ok and not batch.error, reply
    [received] = await sink.wait_for(1)
    [part] = [p for p in received.message().iter_attachments()]
    assert len(part.get_content()) == 5 * MiB


async def test_an_email_above_the_limit_is_invalid_names_the_limit_and_reaches_no_node(
    registry: RunningRegistry, sink: Sink, nodes: Nodes, consul: Consul
) -> None:
    await start_nodes(nodes, consul, "a", "b")
    router = await start_router_with(registry, max_email_bytes=2 * MiB)
    try:
        err = await refused(router, email("ok@example.com", 1000), email("x@example.com", 2 * MiB))
    finally:
        await router.close()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith("nothing was routed: emails[1] is ")
    assert "the limit is 2097152 bytes (2 MiB, the max_email_bytes setting)" in details
    await untouched(nodes, "a", "b")
    assert sink.received == []


async def test_a_node_with_a_smaller_limit_refuses_once_and_no_other_node_is_tried(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    # Misconfigured: the nodes take 1 MiB, the router 25 MiB. The node's INVALID_ARGUMENT is final.
    await start_nodes(nodes, consul, "a", "b", max_email_bytes=MiB)
    reply = await route(router, email("x@example.com", 2 * MiB))
    [batch] = reply.batches
    assert not batch.ok
    assert batch.error.startswith("node a: INVALID_ARGUMENT: emails[0] is ")
    assert "the limit is 1048576 bytes (1 MiB" in batch.error and "node b" not in batch.error
    await untouched(nodes, "b")
    stats = await nodes.stub("a").GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
    assert stats.totals == pipeline_pb2.PipelineCounters()  # nothing spooled on a either


async def test_a_node_refusing_one_key_as_invalid_leaves_the_others_and_says_why(
    registry: RunningRegistry, sink: Sink, router: RunningRouter, nodes: Nodes, consul: Consul
) -> None:
    # The router validated the request whole; only a disagreement with the node (here its
    # smaller limit) refuses a batch, and the request's other keys were routed on their own.
    await start_nodes(nodes, consul, "a", max_email_bytes=MiB)
    reply = await route(router, email("small@example.org", 10), email("x@example.com", 2 * MiB))
    by_key = {b.routing_key: b for b in reply.batches}
    refused_batch, taken = by_key["example.com_127_0_0_2"], by_key["example.org_127_0_0_2"]
    assert (taken.ok, list(taken.email_indexes)) == (True, [0])
    assert (refused_batch.ok, list(refused_batch.email_indexes)) == (False, [1])
    assert refused_batch.error.startswith("node a: INVALID_ARGUMENT: emails[0] is ")
    assert refused_batch.error.endswith(f"({DISAGREEMENT})")
    await sink.wait_for(1)
    assert sink.recipients() == ["small@example.org"]


async def test_the_setting_moves_the_limit_and_the_transport_with_it(
    registry: RunningRegistry, sink: Sink, nodes: Nodes, consul: Consul
) -> None:
    await start_nodes(nodes, consul, "a")
    # From the command line, as an operator sets it; the router's own limit, not grpc's 4 MiB.
    config = settings.parse(
        RouterConfig,
        ["--listen", "127.0.0.1:0", "--consul", registry.address, "--max-email-bytes", "256KiB"],
    )
    assert config.max_email_bytes == 256 * 1024
    router = await start_router(config)
    try:
        err = await refused(router, email("x@example.com", 300 * 1024))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 262144 bytes (256 KiB" in (err.details() or "")
        # Each email fits, the request does not: 4 emails at the limit is what a request may carry.
        many = [email(f"u{i}@example.com", 200 * 1024, f"<m{i}@sender.test>") for i in range(6)]
        err = await refused(router, *many)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max (" in (err.details() or "")
        reply = await route(router, *many[:4])
        assert (reply.successful_batches, reply.accepted_recipients) == (1, 4), reply
    finally:
        await router.close()
    await sink.wait_for(4)


def test_one_environment_variable_sets_the_limit_of_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node.main import NodeConfig

    monkeypatch.setenv("EPOXI_MAX_EMAIL_BYTES", "10MiB")
    assert settings.parse(RouterConfig, []).max_email_bytes == 10 * MiB
    assert settings.parse(NodeConfig, []).max_email_bytes == 10 * MiB
    monkeypatch.setenv("EPOXI_ROUTER_MAX_EMAIL_BYTES", "1MiB")  # the service's own beats it
    assert settings.parse(RouterConfig, []).max_email_bytes == MiB
    monkeypatch.delenv("EPOXI_MAX_EMAIL_BYTES")
    monkeypatch.delenv("EPOXI_ROUTER_MAX_EMAIL_BYTES")
    assert settings.parse(NodeConfig, []).max_email_bytes == 25 * MiB
