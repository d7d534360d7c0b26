"""The router spreads new keys over the nodes that own their IP, but the keys of one MX site and
IP land on one node, however many routers place them at once: the node that does not hold the
site refuses, naming the one that does, and the router follows. Real nodes (two that send from
the same IPs), the dev registry, real routers, and a sink that receives the mail.

The SITE domains are routed to the sink by name, so they share the site "host:port"; the OWN
domains go by the catch-all route, each a site of its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.registry.ownership import site_record_key
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.services.router.support import email, route, sees
from tests.support import Nodes, eventually, passing_nodes

IPS = ["127.0.0.2", "127.0.0.3"]
SITE = [f"s{i}.example" for i in range(4)]
OWN = [f"own{i}.example" for i in range(4)]


def key_of(domain: str, ip: str) -> str:
    return f"{domain}_{ip.replace('.', '_')}"


async def site_holder(consul: Any, site: str, ip: str) -> str | None:
    _, entry = await consul.kv.get(site_record_key(site, ip))
    if not entry or not entry.get("Session"):
        return None
    return str(json.loads(entry["Value"])["node"])


async def start_two(nodes: Nodes, consul: Any) -> None:
    routes = {"*": nodes.sink, **{d: nodes.sink for d in SITE}}
    for node in ("n1", "n2"):
        await nodes.start(node, *IPS, routes=routes)

    async def both() -> bool:
        return await passing_nodes(consul) == {"n1", "n2"}

    await eventually(both)


async def test_one_request_puts_a_sites_keys_on_one_node_and_spreads_the_rest(
    router: RunningRouter, nodes: Nodes, consul: Any, sink: Sink
) -> None:
    await start_two(nodes, consul)
    await sees(router, "n1", "n2")
    ip = IPS[0]
    reply = await route(router, *(email(f"u@{d}", ip=ip) for d in SITE + OWN))
    assert (reply.successful_batches, reply.failed_batches, reply.new_pipelines_started) == (8, 0, 8), reply
    where = {b.routing_key: b.node for b in reply.batches}
    (site_node,) = {where[key_of(d, ip)] for d in SITE}
    assert await site_holder(consul, sink.address, ip) == site_node
    # Spreading sent some of them to the other node first, which named the site's node.
    assert reply.fallbacks_used >= 1
    # The keys of their own sites are spread as ever: not all pinned beside the site's.
    assert {where[key_of(d, ip)] for d in OWN} != {site_node}
    await sink.wait_for(8)


async def test_routers_placing_one_sites_keys_at_once_agree_on_one_node(
    router: RunningRouter, registry: RunningRegistry, nodes: Nodes, consul: Any, sink: Sink
) -> None:
    await start_two(nodes, consul)
    others = [
        await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0))
        for _ in range(2)
    ]
    routers = [router, *others]
    try:
        for r in routers:
            await sees(r, "n1", "n2")
        ip = IPS[1]
        # Each router gets the site's keys in another order, all at once.
        replies = await asyncio.gather(
            *(
                route(r, *(email(f"r{n}@{d}", ip=ip) for d in SITE[n:] + SITE[:n]))
                for n, r in enumerate(routers)
            )
        )
        for reply in replies:
            assert (reply.successful_batches, reply.failed_batches) == (len(SITE), 0), reply
        placed = {b.node for reply in replies for b in reply.batches}
        assert len(placed) == 1, [(b.routing_key, b.node) for reply in replies for b in reply.batches]
        assert await site_holder(consul, sink.address, ip) == placed.pop()
        await sink.wait_for(len(SITE) * len(routers))
        assert len(sink.received) == len(SITE) * len(routers)
    finally:
        for r in others:
            await r.close()
