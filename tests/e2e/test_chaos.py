"""Chaos: 3 nodes and 2 routers, each its own process, take 20,000 emails over 50 routing keys
while one node is SIGKILLed and restarted and one router is SIGKILLed.

The client behaves as the contract tells it to: it sends each email with its own Message-ID, and
sends the emails of every FAILED or UNKNOWN batch again (to the other router when one is gone)
until they are ACCEPTED. Afterwards every accepted message has reached the sink: 0 lost. A
message can reach the sink twice only if it was in flight on the killed node (sent, its outcome
not yet recorded): the test reports how many did, and they stay within that window
(docs/operations.md, "Delivery guarantees").

``EPOXI_CHAOS_EMAILS`` sets the size (default 20,000).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi.envelope import new_email
from epoxi.policy import DEFAULT_BATCH_SIZE, DEFAULT_MAX_CONNECTIONS
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from tests.support import eventually

EMAILS = int(os.environ.get("EPOXI_CHAOS_EMAILS", "20000"))
KEYS = 50
IP = "127.0.0.2"
REQUEST = 250  # emails per RouteEmails call
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)
NODES = ["node1", "node2", "node3"]


@pytest.fixture
async def mesh(tmp_path: Path, sink: Sink) -> AsyncIterator[Mesh]:
    nodes = [NodeSpec(id, [IP]) for id in NODES]
    m = await Mesh(data_dir=tmp_path, nodes=nodes, route=f"*={sink.address}", extra_routers=1).start()
    yield m
    await m.stop()


def emails() -> list[email_pb2.Email]:
    out = []
    for i in range(EMAILS):
        e = new_email("Chaos <chaos@epoxi.dev>", to=[f"user{i}@d{i % KEYS}.test"], subject="chaos", text="x")
        e.message_id = f"<chaos-{i}@epoxi.dev>"
        e.delivery.ip = IP
        out.append(e)
    return out


class Client:
    """Sends through whichever routers are up, and resends what was not accepted."""

    def __init__(self, mesh: Mesh) -> None:
        self.routers = {name: mesh.address(name) for name in ("router", "router2")}
        self.channels = {name: channel(addr) for name, addr in self.routers.items()}
        self.down: set[str] = set()
        self.accepted: set[str] = set()
        self.unknown_seen = 0
        self.failed_seen = 0
        self.turn = 0
        # Routing keys each node accepted batches for.
        self.keys_of: dict[str, set[str]] = {}

    async def send(self, batch: list[email_pb2.Email]) -> None:
        pending = batch
        for _ in range(200):
            if not pending:
                return
            up = [name for name in self.channels if name not in self.down]
            name = up[self.turn % len(up)]
            self.turn += 1
            stub = router_pb2_grpc.RouterServiceStub(self.channels[name])
            try:
                reply = await stub.RouteEmails(router_pb2.RouteEmailsRequest(emails=pending), timeout=30)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)  # the router is gone, or the reply was: all of it again
                continue
            again = []
            for b in reply.batches:
                if b.status == router_pb2.BATCH_STATUS_ACCEPTED:
                    self.accepted.update(b.email_message_ids)
                    self.keys_of.setdefault(b.node, set()).add(b.routing_key)
                else:
                    self.unknown_seen += b.status == router_pb2.BATCH_STATUS_UNKNOWN
                    self.failed_seen += b.status == router_pb2.BATCH_STATUS_FAILED
                    again += [pending[i] for i in b.email_indexes]
            pending = again
            if pending:
                await asyncio.sleep(0.5)
        raise AssertionError(f"{len(pending)} emails never accepted")

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels.values()))


def received_ids(sink: Sink) -> Counter[str]:
    found: Counter[str] = Counter()
    for r in sink.received:
        m = MESSAGE_ID.search(r.data)
        if m:
            found[m.group(1).decode()] += 1
    return found


async def test_nothing_is_lost_when_a_node_and_a_router_die_under_load(mesh: Mesh, sink: Sink) -> None:
    all_emails = emails()
    requests = [all_emails[i : i + REQUEST] for i in range(0, len(all_emails), REQUEST)]
    client = Client(mesh)
    killed_node = ""
    killed_keys: set[str] = set()

    def accepted_at_least(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(client.accepted) >= n

        return check

    async def chaos() -> None:
        nonlocal killed_node
        await eventually(accepted_at_least(EMAILS // 4), seconds=300)
        # The node with the most keys: they fail over, and it comes back and hands its mail over.
        killed_node = max(NODES, key=lambda n: len(client.keys_of.get(n, ())))
        killed_keys.update(client.keys_of.get(killed_node, ()))
        await mesh.stop_process(killed_node, signal.SIGKILL)
        await asyncio.sleep(3)
        await mesh.start_node(next(n for n in mesh.nodes if n.id == killed_node))
        await eventually(accepted_at_least(EMAILS // 2), seconds=300)
        client.down.add("router2")
        await mesh.stop_process("router2", signal.SIGKILL)

    try:
        chaos_task = asyncio.create_task(chaos())
        limit = asyncio.Semaphore(4)

        async def send(batch: list[email_pb2.Email]) -> None:
            async with limit:
                await client.send(batch)

        await asyncio.gather(*(send(r) for r in requests))
        await chaos_task
    finally:
        await client.close()

    wanted = {e.message_id for e in all_emails}
    assert client.accepted == wanted  # every email was accepted in the end

    async def all_delivered() -> bool:
        return set(received_ids(sink)) >= wanted

    await eventually(all_delivered, seconds=240)
    await asyncio.sleep(2)  # room for late duplicates to show
    got = received_ids(sink)
    lost = wanted - set(got)
    duplicates = sum(n - 1 for n in got.values())
    doubled = {mid for mid, n in got.items() if n > 1}
    # A message reaches the sink twice only if it was in flight on the killed node: a key it ran.
    domains = {key.split("_")[0] for key in killed_keys}
    by_id = {e.message_id: e.to[0].split("@")[1] for e in all_emails}
    window = len(killed_keys) * DEFAULT_MAX_CONNECTIONS * DEFAULT_BATCH_SIZE
    print(
        f"\nchaos: {EMAILS} emails, accepted {len(client.accepted)}, delivered {len(got)},"
        f" lost {len(lost)}, duplicates {duplicates} (killed {killed_node} running {len(killed_keys)} keys,"
        f" then router2; batches seen FAILED {client.failed_seen}, UNKNOWN {client.unknown_seen})"
    )
    assert not lost
    assert {by_id[mid] for mid in doubled} <= domains
    assert duplicates <= window
