"""The walking skeleton, end to end: every service its own process, real gRPC, real grpcurl,
the development registry, and a real SMTP sink that records each message's source address."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devmesh.sink import Sink
from devmesh.supervisor import Mesh, NodeSpec
from tests.support import eventually

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
SENDER = "Epoxi Test <sender@epoxi.dev>"


def email(to: list[str], ip: str, **extra: Any) -> dict[str, Any]:
    return {"from": SENDER, "to": to, "subject": "e2e", "text": "hello", "delivery": {"ip": ip}, **extra}


async def grpcurl(address: str, method: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    """Call ``method`` with the real grpcurl binary, through server reflection (no proto files)."""
    # grpcurl prints proto field names (snake_case), and with -emit-defaults the zero values too.
    args = [GRPCURL, "-plaintext", "-emit-defaults", "-max-time", "30"]
    if body is not None:
        args += ["-d", json.dumps(body)]
    proc = await asyncio.create_subprocess_exec(
        *args, address, method, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def route(mesh: Mesh, emails: list[dict[str, Any]]) -> dict[str, Any]:
    code, out = await grpcurl(
        mesh.address("router"), "epoxi.v1.RouterService/RouteEmails", {"emails": emails}
    )
    assert code == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


async def registry_get(mesh: Mesh, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"http://{mesh.consul}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.fixture
async def mesh(tmp_path: Path, sink: Sink) -> AsyncIterator[Mesh]:
    # node1 and node2 share 127.0.0.2, so a key on that IP can fail over between them.
    nodes = [NodeSpec("node1", ["127.0.0.2", "127.0.0.3"]), NodeSpec("node2", ["127.0.0.2", "127.0.0.4"])]
    m = await Mesh(data_dir=tmp_path, nodes=nodes, route=f"*={sink.address}").start()
    yield m
    await m.stop()


async def test_grpcurl_to_router_to_node_to_smtp(mesh: Mesh, sink: Sink) -> None:
    summary = await route(
        mesh,
        [
            email(["ann@gmail.com", "bob@yahoo.com"], "127.0.0.3"),
            email(["cat@gmail.com"], "127.0.0.3"),
            email(["dan@example.org"], "127.0.0.4"),
        ],
    )
    assert summary["total_emails"] == 3
    assert summary["total_batches"] == 3
    assert summary["successful_batches"] == 3, summary
    assert summary["new_pipelines_started"] == 3
    assert summary["failed_batches"] == 0

    await sink.wait_for(4)
    by_rcpt = {r: m.peer for m in sink.received for r in m.rcpt_tos}
    assert by_rcpt == {
        "ann@gmail.com": "127.0.0.3",
        "bob@yahoo.com": "127.0.0.3",
        "cat@gmail.com": "127.0.0.3",
        "dan@example.org": "127.0.0.4",
    }
    assert all(m.mail_from == "sender@epoxi.dev" for m in sink.received)

    code, out = await grpcurl(mesh.address("monitor"), "epoxi.v1.MonitorService/FindAllPipelines", {})
    assert code == 0, out
    found = json.loads(out)["nodes"]
    keys = {p["routing_key"]: node for node, group in found.items() for p in group["pipelines"]}
    assert keys == {
        "gmail.com_127_0_0_3": "node1",
        "yahoo.com_127_0_0_3": "node1",
        "example.org_127_0_0_4": "node2",
    }

    entries = await registry_get(mesh, "/v1/health/service/epoxi-pipeline?passing=1")
    assert {e["Service"]["Meta"]["routing_key"] for e in entries} == set(keys)
    outputs = [c["Output"] for e in entries for c in e["Checks"] if c["ServiceID"]]
    assert all(o.startswith("running") for o in outputs), outputs

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{mesh.address('gateway')}/admin/pipelines") as resp:
            assert resp.status == 200
            stats = await resp.json()
        assert stats["pipelineStats"]["totalPipelines"] == 3
        assert stats["healthSummary"]["healthy"] == 3
        async with http.get(f"http://{mesh.address('gateway')}/admin/pipelines/gmail.com_127_0_0_3") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert [r["pipeline"]["routingKey"] for r in health["results"]] == ["gmail.com_127_0_0_3"]


async def test_every_service_serves_health_and_reflection(mesh: Mesh) -> None:
    for name in ("router", "monitor", "node1", "node2"):
        code, out = await grpcurl(mesh.address(name), "list")
        assert code == 0, out
        assert "grpc.health.v1.Health" in out and "grpc.reflection.v1alpha.ServerReflection" in out
        code, out = await grpcurl(mesh.address(name), "grpc.health.v1.Health/Check", {})
        assert code == 0 and '"SERVING"' in out, out


@pytest.mark.parametrize(
    ("emails", "expected"),
    [
        ([], "emails is empty"),
        (
            [email(["not-an-address"], "127.0.0.3")],
            "emails[0].to[0] 'not-an-address' is not an email address",
        ),
        (
            [
                email(["ok@gmail.com"], "127.0.0.3"),
                email(["x@gmail.com"], "127.0.0.3", subject="a\r\nBcc: y@z.org"),
            ],
            "emails[1].subject contains CR or LF",
        ),
        (
            [email(["ok@gmail.com"], "127.0.0.3", headers=[{"name": "X-Id", "value": "1\nBcc: y@z.org"}])],
            "emails[0].headers[0] (X-Id) value contains CR or LF",
        ),
    ],
)
async def test_invalid_input_is_rejected_and_nothing_is_enqueued(
    mesh: Mesh, sink: Sink, emails: list[dict[str, Any]], expected: str
) -> None:
    code, out = await grpcurl(
        mesh.address("router"), "epoxi.v1.RouterService/RouteEmails", {"emails": emails}
    )
    assert code != 0
    assert "Code: InvalidArgument" in out and expected in out, out
    assert await registry_get(mesh, "/v1/health/service/epoxi-pipeline") == []
    code, out = await grpcurl(mesh.address("node1"), "epoxi.v1.NodeService/GetNodeState", {})
    assert code == 0 and json.loads(out)["pipelines"] == [], out
    assert sink.received == []


async def test_a_batch_for_an_unowned_ip_fails_while_the_others_go_through(mesh: Mesh, sink: Sink) -> None:
    summary = await route(mesh, [email(["a@gmail.com"], "127.0.0.3"), email(["b@gmail.com"], "127.0.0.99")])
    assert (summary["successful_batches"], summary["failed_batches"]) == (1, 1)
    [failed] = [b for b in summary["batches"] if not b["ok"]]
    assert failed["routing_key"] == "gmail.com_127_0_0_99"
    assert failed["error"] == "no passing node owns source IP 127.0.0.99"
    await sink.wait_for(1)
    assert sink.recipients() == ["a@gmail.com"]


async def test_stopping_a_pipeline_removes_it_from_the_registry(mesh: Mesh, sink: Sink) -> None:
    summary = await route(mesh, [email(["a@gmail.com"], "127.0.0.3")])
    assert summary["successful_batches"] == 1
    await sink.wait_for(1)  # nothing queued: the stop has no mail to keep the pipeline for
    assert len(await registry_get(mesh, "/v1/health/service/epoxi-pipeline")) == 1
    code, out = await grpcurl(
        mesh.address("node1"), "epoxi.v1.NodeService/StopPipeline", {"routing_key": "gmail.com_127_0_0_3"}
    )
    assert code == 0, out

    async def gone() -> bool:
        return not await registry_get(mesh, "/v1/health/service/epoxi-pipeline")

    await eventually(gone, seconds=30)


async def test_a_dead_node_is_not_chosen_and_its_key_fails_over(mesh: Mesh, sink: Sink) -> None:
    first = await route(mesh, [email(["a@gmail.com"], "127.0.0.2")])
    [batch] = first["batches"]
    assert batch["ok"] and batch["new_pipeline"]
    dead, alive = batch["node"], ({"node1", "node2"} - {batch["node"]}).pop()
    await sink.wait_for(1)

    await mesh.stop_process(dead, signal.SIGKILL)

    async def pipelines_not_passing() -> bool:
        entries = await registry_get(mesh, "/v1/health/service/epoxi-pipeline")
        mine = [e for e in entries if e["Service"]["Meta"]["node"] == dead]
        return bool(mine) and all(any(c["Status"] != "passing" for c in e["Checks"]) for e in mine)

    async def node_not_passing() -> bool:
        entries = await registry_get(mesh, "/v1/health/service/epoxi-node?passing=1")
        return dead not in {e["Service"]["ID"] for e in entries}

    await eventually(node_not_passing, seconds=30)
    await eventually(pipelines_not_passing, seconds=30)

    second = await route(mesh, [email(["b@gmail.com"], "127.0.0.2")])
    [batch] = second["batches"]
    assert batch["ok"] and batch["node"] == alive, second
    await sink.wait_for(2)
    assert sink.received[-1].peer == "127.0.0.2" and sink.received[-1].rcpt_tos == ["b@gmail.com"]
