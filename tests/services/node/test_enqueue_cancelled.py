"""An enqueue cancelled while its commit runs (a client's deadline or cancel): the commit still
completes, the pipeline is woken, and the mail is delivered once, with no other event."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from devmesh.sink import Sink
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.engine.spool import Counts, Due, Spool, Spooled
from services.node.servicer import NodeService
from services.node.supervisor import PipelineSupervisor
from tests.services.node.support import (
    KEY,
    SOURCE_IP,
    MakeSupervisor,
    email,
    fast_policy,
    messages,
    settled,
    true_when,
)
from tests.support import eventually


class SlowCommitSpool(Spool):
    """The real spool, except that a commit, once under way on the spool's thread, waits for
    ``finish`` before it writes; ``nothing_due`` counts the pipeline's checks that found no mail."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.committing = threading.Event()
        self.finish = threading.Event()
        self.nothing_due = 0

    def _enqueue(self, *args: Any) -> Spooled:
        self.committing.set()
        self.finish.wait(10)
        return super()._enqueue(*args)

    async def due(self, routing_key: str, now: float, up_to: int = 1) -> Due:
        due = await super().due(routing_key, now, up_to)
        if due.count == 0 and due.next_at is None:
            self.nothing_due += 1
        return due


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SlowCommitSpool]:
    s = await SlowCommitSpool.open(tmp_path / "slow.db")
    yield s
    s.finish.set()
    await s.close()


async def waiting_for_mail(supervisor: PipelineSupervisor, spool: SlowCommitSpool) -> None:
    """Start KEY's pipeline and wait until it found nothing due: only a wake-up moves it now."""
    await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await eventually(true_when(lambda: spool.nothing_due > 0))


async def test_an_enqueue_cancelled_mid_commit_still_wakes_its_pipeline(
    make_supervisor: MakeSupervisor, spool: SlowCommitSpool, sink: Sink
) -> None:
    supervisor = make_supervisor()
    await waiting_for_mail(supervisor, spool)
    p = supervisor.pipelines[KEY]
    enqueue = asyncio.create_task(supervisor.enqueue_rendered(p, messages("a@example.com")))
    await eventually(true_when(spool.committing.is_set))
    enqueue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await enqueue
    spool.finish.set()
    await sink.wait_for(1)
    assert sink.recipients() == ["a@example.com"]
    assert await settled(p) == Counts(delivered=1)
    assert len(await spool.list_messages(KEY, None, None, 10)) == 1  # spooled once
    # The enqueue's bookkeeping ran too: an idle stop is not held off by it forever.
    assert supervisor._enqueuing[KEY] == 0
    assert await supervisor.stop_if_idle(KEY, 0.0)


async def test_enqueue_batch_past_its_deadline_mid_commit_is_still_delivered(
    make_supervisor: MakeSupervisor, spool: SlowCommitSpool, sink: Sink
) -> None:
    supervisor = make_supervisor()
    await waiting_for_mail(supervisor, spool)
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(NodeService(supervisor), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            request = node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EnqueueBatch(request, timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert spool.committing.is_set()  # the deadline passed while the commit ran
        spool.finish.set()
        await sink.wait_for(1)
        assert sink.recipients() == ["a@example.com"]
        assert await settled(supervisor.pipelines[KEY]) == Counts(delivered=1)
        assert len(await spool.list_messages(KEY, None, None, 10)) == 1
    finally:
        await server.stop(None)
