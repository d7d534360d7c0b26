"""Mail submitted over HTTP (POST /v1/emails as JSON, POST /v1/emails:raw as message/rfc822)
reaches the sink through the real router and node; an Idempotency-Key makes a retry safe."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from devmesh.registry.app import RunningRegistry
from devmesh.sink import Sink
from epoxi import policy_store
from gateway.main import GatewayConfig, start
from services.router.main import RouterConfig, start_router
from tests.support import Nodes, eventually, passing_nodes, stored_policy, unused_address

RAW = (
    b"From: Ann <ann@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <raw-1@example.com>\r\n"
    b"X-Odd:   kept   as   written\r\n"
    b"\r\n"
    b"hello\r\n"
)


@pytest.fixture
async def http(registry: RunningRegistry, nodes: Nodes, consul: Any) -> AsyncIterator[aiohttp.ClientSession]:
    # Pipelines the node starts for new mail batch without waiting.
    await policy_store.put_policy(consul, policy_store.DEFAULT_POLICY, stored_policy())
    await nodes.start("node1", "127.0.0.2")
    await eventually(lambda: _has(passing_nodes(consul), "node1"))
    router = await start_router(RouterConfig(listen="127.0.0.1:0", consul=registry.address))
    gateway = await start(
        GatewayConfig(listen="127.0.0.1:0", router=router.address, monitor=unused_address())
    )
    try:
        async with aiohttp.ClientSession(base_url=f"http://{gateway.address}") as session:
            yield session
    finally:
        await gateway.close()
        await router.close()


async def _has(items: Any, item: str) -> bool:
    return item in await items


async def test_post_v1_emails_routes_the_json_emails(http: aiohttp.ClientSession, sink: Sink) -> None:
    email = {
        "from": "Ann <ann@example.com>",
        "to": ["bob@example.org"],
        "subject": "Hi",
        "text": "hello",
        "attachments": [{"filename": "a.bin", "content": base64.b64encode(b"\x00\x01").decode()}],
        "delivery": {"ip": "127.0.0.2"},
    }
    async with http.post("/v1/emails", json={"emails": [email]}) as resp:
        assert resp.status == 200, await resp.text()
        summary = await resp.json()
    assert (summary["totalEmails"], summary["successfulBatches"]) == (1, 1)
    assert summary["batches"][0]["status"] == "BATCH_STATUS_ACCEPTED"
    await sink.wait_for(1)


async def test_post_v1_emails_raw_relays_the_message_unchanged(
    http: aiohttp.ClientSession, sink: Sink
) -> None:
    params = {"rcptTo": "bob@example.org", "delivery.ip": "127.0.0.2"}
    headers = {"Content-Type": "message/rfc822", "Idempotency-Key": "order-1"}
    answers = []
    for _ in range(2):  # a retry with the same key
        async with http.post("/v1/emails:raw", data=RAW, params=params, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            answers.append(await resp.json())  # the summary itself (response_body)
    assert answers[0]["totalEmails"] == 1
    assert answers[0]["batches"][0]["status"] == "BATCH_STATUS_ACCEPTED"
    assert answers[1]["batches"][0]["messageIds"] == answers[0]["batches"][0]["messageIds"]
    await sink.wait_for(1)
    assert len(sink.received) == 1
    assert RAW.split(b"\r\n\r\n")[0] in sink.received[0].data


async def test_post_v1_emails_raw_refuses_another_media_type(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/emails:raw", data=RAW, headers={"Content-Type": "text/plain"}) as resp:
        assert (resp.status, resp.headers["Accept"]) == (415, "message/rfc822")
        body = await resp.json()
    assert body["message"] == (
        "POST /v1/emails:raw takes a body of type message/rfc822; the request has Content-Type text/plain"
    )
