"""The ingress presents its bearer token (SCOPE_SUBMIT) to a router that requires one; without
one the router refuses it, and the client hears 451 (its mail stays with it)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi.runtime.security import Secret, SecurityConfig
from services.router.main import RouterConfig, RunningRouter, start_router
from tests.epoxi.runtime.certs import Pki
from tests.services.ingress.conftest import StartIngress
from tests.services.ingress.support import MESSAGE, connect, in_thread
from tests.services.router.support import sees
from tests.support import Nodes

TOKEN = secrets.token_hex(16)


@pytest.fixture
async def router(registry: RunningRegistry, tmp_path: Path) -> AsyncIterator[RunningRouter]:
    """A router that takes RouteEmails only with a submit token."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ingress submit {TOKEN}\n")
    tokens.chmod(0o600)
    config = RouterConfig(
        listen="127.0.0.1:0",
        consul=registry.address,
        check_interval=1.0,
        security=SecurityConfig(tokens_file=str(tokens)),
    )
    r = await start_router(config)
    yield r
    await r.close()


async def data(address: str, pki: Pki) -> tuple[int, bytes]:
    def run() -> tuple[int, bytes]:
        with connect(address, pki.ca) as smtp:
            smtp.mail("alice@shop.test")
            smtp.rcpt("ann@a.test")
            return smtp.data(MESSAGE)

    return await in_thread(run)


async def test_the_ingress_sends_its_token_to_the_router(
    start: StartIngress, router: RunningRouter, mesh_node: Nodes, pki: Pki, sink: Sink
) -> None:
    await sees(router, "n1", "n2")
    with_token = await start(router=router.address, security=SecurityConfig(token=Secret(TOKEN)))
    code, text = await data(with_token.smtp_address, pki)
    assert code == 250, text
    [m] = await sink.wait_for(1)
    assert m.data == MESSAGE

    without = await start(router=router.address)
    code, text = await data(without.smtp_address, pki)
    assert code == 451 and b"UNAUTHENTICATED" in text, text
