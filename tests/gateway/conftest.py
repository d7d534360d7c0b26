"""A real grpc.aio server for echo.proto, and the gateway in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from gateway.app import Backend, Gateway, start_gateway
from gateway.upstream import StaticUpstream
from tests.gateway.support import ECHO_MEDIA_TYPES, EchoServer, EchoServicer, echo_service


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    servicer = EchoServicer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([servicer.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield EchoServer(server, servicer, f"127.0.0.1:{port}")
    await server.stop(None)


@pytest.fixture
async def echo_gateway(echo_server: EchoServer) -> AsyncIterator[Gateway]:
    backend = Backend(echo_service(), StaticUpstream(echo_server.address))
    gateway = await start_gateway("127.0.0.1:0", [backend], media_types=ECHO_MEDIA_TYPES)
    yield gateway
    await gateway.close()


@pytest.fixture
async def http(echo_gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=f"http://{echo_gateway.address}") as session:
        yield session
