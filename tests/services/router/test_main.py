"""The router's wiring on the one service lifecycle: what it advertises, what a failed start
closes, and that it leaves the registry before its server stops."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devmesh.registry.app import RunningRegistry
from epoxi import settings
from epoxi.envelope import new_email
from epoxi.registry import services
from epoxi.registry.client import Consul, RegistryError
from epoxi.runtime.channels import channel
from epoxi.runtime.server import GrpcServer, start_grpc_server
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, router_pb2, router_pb2_grpc
from services.router.main import SERVICE, SERVICE_NAME, RouterConfig, start_router
from tests.support import eventually, passing_nodes, unused_address

NODE_SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


async def router_entries(consul: Consul, passing: bool = False) -> list[services.Entry]:
    _, entries = await consul.health.service(SERVICE, passing=passing)
    return list(entries)


async def test_a_wildcard_listen_address_advertises_a_dialable_name(
    registry: RunningRegistry, consul: Consul
) -> None:
    config = settings.parse(
        RouterConfig, ["--listen", "0.0.0.0:0", "--consul", registry.address, "--check-interval", "200ms"]
    )
    async with await start_router(config) as router:
        host, _, port = router.address.rpartition(":")
        assert host == socket.getfqdn()
        assert host not in ("0.0.0.0", "")
        [entry] = await router_entries(consul)
        assert (entry["Service"]["Address"], entry["Service"]["Port"]) == (host, int(port))
        # Dialable: the registry's gRPC check of that address passes, and so does our own call.
        await eventually(lambda: router_entries(consul, passing=True))
        async with channel(router.address) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_failed_registration_closes_the_routers_clients(caplog: pytest.LogCaptureFixture) -> None:
    # Log records of registry errors would keep the client alive past the test (through the
    # exceptions' tracebacks); without them the client is collected right here.
    caplog.set_level(logging.ERROR)
    with pytest.raises(RegistryError):
        await start_router(RouterConfig(listen="127.0.0.1:0", consul=unused_address()))
    # An unclosed registry client is an unclosed aiohttp session: when it is collected, its
    # ResourceWarning fails the test (filterwarnings = error).
    gc.collect()


class SlowNode(node_pb2_grpc.NodeServiceServicer):
    """A node that holds each EnqueueBatch until released (then starts the key's pipeline)."""

    def __init__(self) -> None:
        self.enqueuing = asyncio.Event()
        self.release = asyncio.Event()

    async def EnqueueBatch(
        self, request: node_pb2.EnqueueBatchRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.EnqueueBatchResponse:
        self.enqueuing.set()
        await self.release.wait()
        return node_pb2.EnqueueBatchResponse(
            message_ids=[f"m{i}" for i in range(len(request.emails))], pipeline_started=True
        )


@pytest.fixture
async def slow_node(consul: Consul) -> AsyncIterator[SlowNode]:
    """A SlowNode registered as node ``slow`` sending from 127.0.0.2, passing its gRPC check."""
    node = SlowNode()  # type: ignore[abstract]  # only what the router calls
    server: GrpcServer = await start_grpc_server(
        "127.0.0.1:0",
        [(lambda s: node_pb2_grpc.add_NodeServiceServicer_to_server(node, s), NODE_SERVICE_NAME)],
    )
    await server.serving()
    info = node_pb2.NodeInfo(id="slow", address=f"127.0.0.1:{server.port}", egress_ips=["127.0.0.2"])
    await consul.agent.service.register(**services.node_registration(info, "200ms", "1m"))

    async def passes() -> bool:
        return "slow" in await passing_nodes(consul)

    await eventually(passes)
    try:
        yield node
    finally:
        node.release.set()
        await server.stop(0)


async def test_the_router_leaves_the_registry_before_its_server_stops(
    registry: RunningRegistry, consul: Consul, slow_node: SlowNode
) -> None:
    router = await start_router(
        RouterConfig(
            id="router-test", listen="127.0.0.1:0", consul=registry.address, check_interval=0.2, stop_grace=30
        )
    )
    closing: asyncio.Task[None] | None = None
    try:
        assert [e["Service"]["ID"] for e in await router_entries(consul)] == ["router-test"]

        async def sees_node() -> bool:
            return "slow" in router.view.snapshot().nodes

        await eventually(sees_node)
        email = new_email(
            "a@sender.test",
            to=["x@example.com"],
            subject="s",
            text="t",
            delivery=email_pb2.Delivery(ip="127.0.0.2"),
        )
        async with channel(router.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            async def route() -> router_pb2.RouteEmailsResponse:
                reply: router_pb2.RouteEmailsResponse = await stub.RouteEmails(
                    router_pb2.RouteEmailsRequest(emails=[email]), timeout=60
                )
                return reply

            call = asyncio.create_task(route())
            await asyncio.wait_for(slow_node.enqueuing.wait(), 20)

            closing = asyncio.create_task(router.close())
            # The call is under way and the grace is long: a router that stopped its server
            # before deregistering would still be listed here.
            await eventually(lambda: no_router(consul), seconds=10)
            assert not call.done()
            assert not closing.done()

            slow_node.release.set()
            reply = await call
        await closing
        assert (reply.successful_batches, reply.batches[0].node) == (1, "slow")
    finally:
        slow_node.release.set()
        if closing is None:
            await router.close()
        else:
            await closing


async def no_router(consul: Consul) -> bool:
    return not await router_entries(consul)


def test_the_owner_cache_bound_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.parse(RouterConfig, []).owner_cache_size == 100_000
    assert settings.parse(RouterConfig, ["--owner-cache-size", "10"]).owner_cache_size == 10
    monkeypatch.setenv("EPOXI_ROUTER_OWNER_CACHE_SIZE", "20")
    assert settings.parse(RouterConfig, []).owner_cache_size == 20
    with pytest.raises(SystemExit):
        settings.parse(RouterConfig, ["--owner-cache-size", "0"])
