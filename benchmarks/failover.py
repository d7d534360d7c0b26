"""Failover time and placement convergence, with every service its own process.

    .venv/bin/python -m benchmarks.failover              # 5 rounds each
    .venv/bin/python -m benchmarks.failover --rounds 10 --check-interval 2s

A mesh (``devmesh.supervisor.Mesh``) of the dev registry, two nodes sharing one egress IP, two
routers and an in-process SMTP sink.

* **Failover**: route a batch for a new key, SIGKILL the node that took it, and measure until a
  batch for that key is accepted by the other node (routing once every 50 ms). The baseline, in
  the same round, is until the registry shows the dead node's check critical: failover can be
  no faster than that, and the ratio shows what placement adds (the session's invalidation, its
  lock-delay, the router's retry). The killed node is started again before the next round.
* **Convergence**: router A places a new key; then router B routes the same key. Measured: B's
  first RouteEmails for it (it must reach the node A chose); baseline: A's next RouteEmails for
  the key, which it already knows. Convergence costs one KV read on B.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from epoxi import durations
from epoxi.envelope import new_email
from epoxi.registry import client
from epoxi.registry.services import NODE_SERVICE
from epoxi.runtime.channels import channel
from epoxi.v1 import router_pb2, router_pb2_grpc

IP = "127.0.0.2"


def request(domain: str, n: int = 1) -> router_pb2.RouteEmailsRequest:
    emails = []
    for i in range(n):
        e = new_email("Bench <bench@epoxi.dev>", to=[f"u{i}@{domain}"], subject="failover", text="x")
        e.delivery.ip = IP
        emails.append(e)
    return router_pb2.RouteEmailsRequest(emails=emails)


async def route(stub: router_pb2_grpc.RouterServiceStub, domain: str) -> router_pb2.BatchResult | None:
    try:
        reply = await stub.RouteEmails(request(domain), timeout=15)
    except grpc.aio.AioRpcError:
        return None
    [batch] = reply.batches
    return batch if batch.status == router_pb2.BATCH_STATUS_ACCEPTED else None


async def critical(consul: client.Consul, node: str) -> float:
    """When (``time.perf_counter()``) the registry first shows ``node``'s check critical."""
    index = None
    while True:
        index, entries = await consul.health.service(NODE_SERVICE, index=index, wait="5s")
        for e in entries:
            if e["Service"]["ID"] == node and any(c["Status"] == "critical" for c in e["Checks"]):
                return time.perf_counter()


async def failover_round(mesh: Mesh, stub: router_pb2_grpc.RouterServiceStub, n: int) -> tuple[float, float]:
    domain = f"failover{n}.test"
    first = await route(stub, domain)
    assert first is not None, "the first batch was not accepted"
    dead = first.node
    assert mesh.consul is not None
    consul = client.connect(mesh.consul)
    try:
        killed = time.perf_counter()
        await mesh.stop_process(dead, signal.SIGKILL)
        detect = asyncio.create_task(critical(consul, dead))
        while True:
            batch = await route(stub, domain)
            if batch is not None and batch.node != dead:
                failed_over = time.perf_counter() - killed
                break
            await asyncio.sleep(0.05)
        detected = await detect - killed
    finally:
        await consul.close()
    await mesh.start_node(next(s for s in mesh.nodes if s.id == dead))
    await mesh.wait_passing(NODE_SERVICE, {dead})
    return failed_over, detected


async def convergence_round(
    a: router_pb2_grpc.RouterServiceStub, b: router_pb2_grpc.RouterServiceStub, n: int
) -> tuple[float, float]:
    domain = f"converge{n}.test"
    placed = await route(a, domain)
    assert placed is not None
    start = time.perf_counter()
    known = await route(a, domain)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    other = await route(b, domain)
    converged = time.perf_counter() - start
    assert known is not None and other is not None and other.node == placed.node, "router B went elsewhere"
    return converged, baseline


async def run(rounds: int, check_interval: str) -> None:
    sink = await Sink().start()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(
            data_dir=Path(tmp),
            nodes=[NodeSpec("node1", [IP]), NodeSpec("node2", [IP])],
            route=f"*={sink.address}",
            check_interval=check_interval,
            extra_routers=1,
        )
        await mesh.start()
        a_ch, b_ch = channel(mesh.address("router")), channel(mesh.address("router2"))
        try:
            a, b = router_pb2_grpc.RouterServiceStub(a_ch), router_pb2_grpc.RouterServiceStub(b_ch)
            converge = [await convergence_round(a, b, n) for n in range(rounds)]
            failover = [await failover_round(mesh, a, n) for n in range(rounds)]
        finally:
            await a_ch.close()
            await b_ch.close()
            await mesh.stop()
            await sink.stop()
    interval = durations.seconds(check_interval)
    fo = statistics.median(f for f, _ in failover)
    de = statistics.median(d for _, d in failover)
    print(f"failover (check interval {interval:g}s, {rounds} rounds, median):")
    print(f"  SIGKILL -> registry shows the node critical (baseline): {de:7.2f} s")
    print(f"  SIGKILL -> a batch for its key accepted elsewhere:      {fo:7.2f} s  ({fo / de:.2f}x baseline)")
    print(f"  worst failover: {max(f for f, _ in failover):.2f} s")
    cv = statistics.median(c for c, _ in converge)
    bl = statistics.median(b for _, b in converge)
    print(f"placement convergence ({rounds} rounds, median):")
    print(f"  router A, key it placed (baseline):        {bl * 1000:7.2f} ms")
    print(f"  router B, first batch for A's key:         {cv * 1000:7.2f} ms  ({cv / bl:.2f}x baseline)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check-interval", default="1s", help="the nodes' registry check interval")
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.check_interval))


if __name__ == "__main__":
    main()
