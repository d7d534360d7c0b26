"""gRPC message limits: sized from the email limit, and what servers and channels enforce."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epoxi import validation
from epoxi.runtime import limits
from epoxi.runtime.channels import channel
from epoxi.runtime.server import start_grpc_server
from epoxi.v1 import email_pb2, node_pb2
from tests.support import valid_email


def test_a_hop_carries_several_emails_at_the_limit_and_the_requests_own_fields() -> None:
    assert limits.message_limit() == 4 * validation.MAX_EMAIL_BYTES + 64 * 1024
    assert limits.message_limit(1024) == 4 * 1024 + limits.ENVELOPE_BYTES
    assert limits.batch_bytes(1024) == 4 * 1024


@pytest.mark.parametrize("body", [0, 100, 127, 128, 20_000, 3_000_000])
def test_an_emails_encoded_size_is_what_it_adds_to_a_request(body: int) -> None:
    e = valid_email(attachments=[email_pb2.Attachment(filename="a", content=b"x" * body)])
    empty = node_pb2.EnqueueBatchRequest(routing_key="example.org@127.0.0.2")
    full = node_pb2.EnqueueBatchRequest(routing_key="example.org@127.0.0.2", emails=[e, e])
    assert full.ByteSize() == empty.ByteSize() + 2 * limits.encoded_size(e)


async def health_check(address: str, service: str, max_message_bytes: int | None = None) -> grpc.StatusCode:
    async with channel(address, max_message_bytes) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


async def test_a_server_takes_messages_up_to_its_limit_and_refuses_larger_ones() -> None:
    server = await start_grpc_server("127.0.0.1:0", [], max_message_bytes=200)
    address = f"127.0.0.1:{server.port}"
    try:
        assert await health_check(address, "x" * 150) == grpc.StatusCode.NOT_FOUND  # reached the handler
        assert await health_check(address, "x" * 300) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


async def test_a_channel_sends_messages_up_to_its_limit() -> None:
    server = await start_grpc_server("127.0.0.1:0", [])
    address = f"127.0.0.1:{server.port}"
    try:
        assert (
            await health_check(address, "x" * 300, max_message_bytes=200)
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        # The default server takes far more than grpc's own 4 MiB.
        assert await health_check(address, "x" * (5 * 1024 * 1024)) == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)
