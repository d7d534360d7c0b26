"""Crash safety: a real node process, SIGKILLed mid-delivery and restarted on the same spool.

Every message the node acknowledged ends delivered or bounced; a message is sent twice only if
it was in flight at the kill: claimed and sent, its outcome not yet committed. A pipeline commits
its outcomes in groups, at the latest before it claims the next batch; the next claim can overlap
the last sends of the previous one, so that is at most one batch plus one message per other
connection, per pipeline.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from devmesh.supervisor import Process, spawn
from epoxi.registry.client import Consul
from epoxi.registry.services import passing
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc, pipeline_pb2, queue_pb2
from tests.services.node.support import SOURCE_IP, email
from tests.support import eventually

DOMAINS = ["a.test", "b.test", "c.test"]
PER_DOMAIN = 100
BATCH = 25
MAX_CONNECTIONS = 2
# Paced (40 at once, then 40 a second per pipeline) so the kill lands mid-delivery.
POLICY = pipeline_pb2.PipelinePolicy(
    name="paced",
    max_connections=MAX_CONNECTIONS,
    batch_size=10,
    batch_timeout=duration_pb2.Duration(nanos=20_000_000),
    allowed_messages=40,
    message_interval=duration_pb2.Duration(seconds=1),
)


def bounces(rcpt: str) -> str | None:
    return "550 5.1.1 no such user" if rcpt.startswith("gone") else None


async def start_node_process(spool: Path, registry: str, sink: str) -> Process:
    return await spawn(
        "crash1",
        [
            *["services.node", "--id", "crash1", "--listen", "127.0.0.1:0"],
            *["--egress-ip", SOURCE_IP, "--spool", str(spool), "--route", f"*={sink}"],
            *["--consul", registry, "--check-interval", "200ms", "--retry-base", "0.05"],
            *["--pipeline-idle-timeout", "0"],
        ],
    )


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        await p.stop(signal.SIGKILL)


async def pipelines_in_registry(consul: Consul) -> dict[str, dict[str, Any]]:
    _, entries = await consul.health.service("epoxi-pipeline")
    return {e["Service"]["Meta"]["routing_key"]: e for e in entries}


def spool_counts(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())


async def list_ids(stub: node_pb2_grpc.NodeServiceStub, state: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        reply = await stub.ListMessages(
            node_pb2.ListMessagesRequest(state=state, page_size=100, page_token=token),  # type: ignore[arg-type]
            timeout=10,
        )
        ids += [m.id for m in reply.messages]
        token = reply.next_page_token
        if not token:
            return ids


async def test_a_killed_node_resumes_every_accepted_message(
    tmp_path: Path, registry: RunningRegistry, consul: Consul, sink: Sink, processes: list[Process]
) -> None:
    sink.reply_rule = bounces
    spool = tmp_path / "spool.db"
    keys = [f"{d}_127_0_0_2" for d in DOMAINS]
    first = await start_node_process(spool, registry.address, sink.address)
    processes.append(first)

    accepted: dict[str, str] = {}  # spool ID -> recipient
    async with channel(first.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        for domain in DOMAINS:
            await stub.StartPipeline(
                node_pb2.StartPipelineRequest(domain=domain, source_ip=SOURCE_IP, policy=POLICY), timeout=10
            )
        for start in range(0, PER_DOMAIN, BATCH):
            for domain, key in zip(DOMAINS, keys, strict=True):
                rcpts = [
                    f"{'gone' if i % 20 == 7 else 'rcpt'}{i}@{domain}" for i in range(start, start + BATCH)
                ]
                reply = await stub.EnqueueBatch(
                    node_pb2.EnqueueBatchRequest(routing_key=key, emails=[email(r) for r in rcpts]),
                    timeout=10,
                )
                accepted |= dict(zip(reply.message_ids, rcpts, strict=True))
    assert len(accepted) == len(DOMAINS) * PER_DOMAIN

    await sink.wait_for(60)
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    at_kill = spool_counts(spool)
    in_flight = at_kill.get("inflight", 0)
    unfinished = in_flight + at_kill.get("queued", 0) + at_kill.get("deferred", 0)
    assert unfinished > 0, at_kill  # killed mid-delivery
    received_at_kill = len(sink.recipients())

    # Dead, the node stops passing its pipelines' TTL checks.
    async def all_critical() -> bool:
        found = await pipelines_in_registry(consul)
        return set(found) == set(keys) and not any(passing(e) for e in found.values())

    await eventually(all_critical)

    second = await start_node_process(spool, registry.address, sink.address)
    processes.append(second)

    async def all_passing_again() -> bool:
        found = await pipelines_in_registry(consul)
        return set(found) == set(keys) and all(passing(e) for e in found.values())

    await eventually(all_passing_again, 30)

    async with channel(second.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)

        async def finished() -> node_pb2.GetQueueStatsResponse | None:
            s: node_pb2.GetQueueStatsResponse = await stub.GetQueueStats(
                node_pb2.GetQueueStatsRequest(), timeout=10
            )
            t = s.totals
            return s if t.queued + t.in_flight + t.deferred == 0 else None

        stats = await eventually(finished, 30)
        assert stats is not None
        state = await stub.GetNodeState(node_pb2.GetNodeStateRequest(), timeout=10)
        assert {p.routing_key: p.policy.name for p in state.pipelines} == dict.fromkeys(keys, "paced")
        delivered = await list_ids(stub, queue_pb2.DELIVERY_STATE_DELIVERED)
        bounced = await list_ids(stub, queue_pb2.DELIVERY_STATE_BOUNCED)

    assert len(sink.recipients()) > received_at_kill  # the second process did deliver
    assert sorted(delivered + bounced) == sorted(accepted)  # each exactly once, none missing
    assert {accepted[i] for i in bounced} == {r for r in accepted.values() if r.startswith("gone")}
    assert (stats.totals.delivered, stats.totals.bounced) == (len(delivered), len(bounced))

    received = sink.recipients()
    assert set(received) == {accepted[i] for i in delivered}
    duplicates = len(received) - len(set(received))
    assert duplicates <= in_flight, (duplicates, at_kill)
    # One recipient per message here; per pipeline, one uncommitted batch and the other lanes' sends.
    assert duplicates <= len(DOMAINS) * (POLICY.batch_size + MAX_CONNECTIONS - 1)

    assert await second.stop(signal.SIGTERM) == 0, "".join(second.lines[-20:])
