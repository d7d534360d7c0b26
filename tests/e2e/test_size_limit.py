"""One size limit on every hop, end to end: every service its own process, set by one
environment variable (EPOXI_MAX_EMAIL_BYTES), real gRPC, the development registry and a real sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi.envelope import new_email
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc

MiB = 1024 * 1024


def email(to: str, attachment_bytes: int) -> email_pb2.Email:
    return new_email(
        "a@sender.test",
        to=[to],
        subject="big",
        text="see attached",
        attachments=[email_pb2.Attachment(filename="big.bin", content=b"x" * attachment_bytes)],
        delivery=email_pb2.Delivery(ip="127.0.0.2"),
    )


@pytest.fixture
async def mesh(tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mesh]:
    monkeypatch.setenv("EPOXI_MAX_EMAIL_BYTES", "8MiB")  # every process inherits it
    nodes = [NodeSpec("node1", ["127.0.0.2"]), NodeSpec("node2", ["127.0.0.2"])]
    m = await Mesh(data_dir=tmp_path, nodes=nodes, route=f"*={sink.address}").start()
    yield m
    await m.stop()


async def test_one_setting_limits_every_hop(mesh: Mesh, sink: Sink) -> None:
    async with channel(mesh.address("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        reply = await stub.RouteEmails(
            router_pb2.RouteEmailsRequest(emails=[email("x@example.com", 5 * MiB)]), timeout=60
        )
        [batch] = reply.batches
        assert batch.ok and not batch.error, reply  # above grpc's default 4 MiB, on both hops
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RouteEmails(
                router_pb2.RouteEmailsRequest(emails=[email("y@example.com", 9 * MiB)]), timeout=60
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 8388608 bytes (8 MiB, the max_email_bytes setting)" in (err.value.details() or "")
    [received] = await sink.wait_for(1)
    assert received.rcpt_tos == ["x@example.com"]
    assert len(received.data) > 5 * MiB
