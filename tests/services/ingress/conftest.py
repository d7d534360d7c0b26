"""An ingress in front of a real mesh, in process: the dev registry, a real node sending to the
sink, a router, and the ingress with a users file and a certificate made with ``cryptography``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devmesh.registry.app import RunningRegistry
from epoxi import policy_store
from epoxi.registry.client import Consul
from services.ingress.main import IngressConfig, RunningIngress, start_ingress
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.epoxi.runtime.certs import Pki, make_pki
from tests.services.ingress.support import ALICE_IP, write_users
from tests.services.router.support import sees
from tests.support import Nodes, eventually, stored_policy

DEFAULT_IP = "127.0.0.2"  # the node's other IP, in the default pool

StartIngress = Callable[..., Awaitable[RunningIngress]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def router(registry: RunningRegistry) -> AsyncIterator[RunningRouter]:
    r = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address, check_interval=1.0))
    yield r
    await r.close()


@pytest.fixture
async def mesh_node(nodes: Nodes, router: RunningRouter, consul: Consul) -> Nodes:
    """n1 sends from the default pool (DEFAULT_IP only), n2 from alice's IP; 20 ms batches."""
    await policy_store.put_policy(consul, "default", stored_policy())
    await nodes.start("n1", DEFAULT_IP, retry_base=0.05)
    await nodes.start("n2", ALICE_IP, ip_pool="alice", retry_base=0.05)
    await sees(router, "n1", "n2")
    return nodes


@pytest.fixture
def ingress_config(tmp_path: Path, pki: Pki, registry: RunningRegistry) -> IngressConfig:
    return IngressConfig(
        id="ingress-test",
        listen="127.0.0.1:0",
        smtp_listen="127.0.0.1:0",
        smtps_listen="127.0.0.1:0",
        hostname="ingress.epoxi.test",
        smtp_tls_cert=str(pki.cert),
        smtp_tls_key=str(pki.key),
        users_file=str(write_users(tmp_path / "users.toml")),
        max_recipients=3,
        consul=registry.address,
        router_timeout=10.0,
        check_interval=1.0,
        stop_grace=1.0,
    )


@pytest.fixture
async def start(ingress_config: IngressConfig) -> AsyncIterator[StartIngress]:
    """Start an ingress from ``ingress_config`` with these fields changed; closed at the end."""
    started: list[RunningIngress] = []

    async def start(**changes: Any) -> RunningIngress:
        ingress = await start_ingress(replace(ingress_config, **changes))
        started.append(ingress)
        return ingress

    yield start
    for ingress in started:
        await ingress.close()


async def passing_routers(consul: Consul) -> list[Any]:
    _, entries = await consul.health.service("epoxi-router", passing=True)
    return list(entries)


@pytest.fixture
async def ingress(start: StartIngress, mesh_node: Nodes, consul: Consul) -> RunningIngress:
    await eventually(lambda: passing_routers(consul))  # the ingress finds it in the registry
    return await start()
