"""``epoxi pipelines|rebalance|queue|message|health|stats`` against one running mesh: the
tables, the ``--json`` output and the exit codes, the real command as a subprocess
(``epoxi shaping`` needs a sink that refuses: tests/cli/test_shaping.py)."""

from __future__ import annotations

import json
import re
import signal
from typing import Any

import pytest

from devmesh.supervisor import Mesh
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from tests.cli.support import Run, delivered, epoxi
from tests.support import eventually, unused_address

pytestmark = pytest.mark.asyncio(loop_scope="module")


def at(mesh: Mesh) -> list[str]:
    return ["--monitor", mesh.address("monitor")]


def lines(run: Run) -> list[list[str]]:
    """Each line of the output split at its column gaps (two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in run.out.splitlines() if line.strip()]


async def pipelines_json(mesh: Mesh) -> dict[str, str]:
    """Routing key to node, from ``pipelines ls --json``."""
    run = await epoxi("pipelines", "ls", "--json", *at(mesh))
    assert run.code == 0, run
    found = json.loads(run.out)["nodes"]
    return {p["routingKey"]: node for node, group in found.items() for p in group["pipelines"]}


async def test_epoxi_help_lists_the_admin_commands() -> None:
    run = await epoxi("--help")
    assert run.code == 0
    for command in ("pipelines", "rebalance", "queue", "message", "health", "stats", "shaping", "send"):
        assert f"    {command}" in run.out
    run = await epoxi("health", "--help")
    assert "3  not found" in run.out and "4  cannot reach the service" in run.out


async def test_pipelines_start_ls_show_and_stop(mesh: Mesh) -> None:
    run = await epoxi("pipelines", "start", "start.test", "127.0.0.3", *at(mesh))
    assert run.code == 0, run
    assert run.out.splitlines()[0].startswith("start.test_127_0_0_3 started on node1 (127.0.0.1:")
    # Started again, by routing key: the one that runs answers.
    run = await epoxi("pipelines", "start", "start.test_127_0_0_3", "--json", *at(mesh))
    assert run.code == 0, run
    started = json.loads(run.out)
    assert (started["started"], started["node"]["id"]) == (False, "node1")
    assert started["pipeline"]["routingKey"] == "start.test_127_0_0_3"

    async def listed() -> dict[str, str] | None:
        found = await pipelines_json(mesh)
        return found if "start.test_127_0_0_3" in found else None

    assert (await eventually(listed))["start.test_127_0_0_3"] == "node1"
    run = await epoxi("pipelines", "ls", *at(mesh))
    assert run.code == 0, run
    table = lines(run)
    assert table[0] == [
        "NODE",
        "ROUTING KEY",
        "STATUS",
        "HEALTHY",
        "QUEUED",
        "IN FLIGHT",
        "DEFERRED",
        "DELIVERED",
        "BOUNCED",
    ]
    assert ["node1", "start.test_127_0_0_3", "running"] in [row[:3] for row in table[1:]]
    # Every row's columns start where the header's do.
    header = run.out.splitlines()[0]
    for line in run.out.splitlines()[1:]:
        assert line.index("start.test") == header.index("ROUTING KEY") or "start.test" not in line

    async def passing() -> Run | None:
        run = await epoxi("pipelines", "show", "start.test_127_0_0_3", *at(mesh))
        return run if run.code == 0 else None

    run = await eventually(passing)
    assert "epoxi-pipeline-node1-start.test_127_0_0_3 at 127.0.0.1:" in run.out
    assert "1 healthy, 0 unhealthy" in run.out
    run = await epoxi("pipelines", "show", "start.test_127_0_0_3", "--json", *at(mesh))
    shown = json.loads(run.out)
    assert [p["node"] for p in shown["pipelines"]] == ["node1"]
    assert shown["health"]["summary"] == {"healthy": 1, "unhealthy": 0}

    run = await epoxi("pipelines", "stop", "start.test_127_0_0_3", *at(mesh))
    assert run.code == 0, run
    assert lines(run)[0][:4] == ["KEY", "NODE", "STOPPED", "HANDED OFF"]
    assert lines(run)[1][:3] == ["start.test_127_0_0_3", "node1", "yes"]
    assert "stopped on 1 node(s)" in run.out

    async def gone() -> Run | None:
        run = await epoxi("pipelines", "show", "start.test_127_0_0_3", *at(mesh))
        return run if run.code == 3 else None

    run = await eventually(gone)
    assert run.err == "epoxi pipelines show: NOT_FOUND: no pipeline has routing key start.test_127_0_0_3\n"
    run = await epoxi("pipelines", "stop", "start.test_127_0_0_3", *at(mesh))
    assert (run.code, run.err.split(":")[1].strip()) == (3, "NOT_FOUND"), run


async def test_send_then_queue_ls_and_message_show(mesh: Mesh) -> None:
    run = await epoxi(
        "send",
        "--router",
        mesh.address("router"),
        "--to",
        "kim@queue.test",
        "--ip",
        "127.0.0.4",
        "--subject",
        "queued one",
    )
    assert run.code == 0, run
    [batch] = json.loads(run.out)["batches"]
    [message_id] = batch["messageIds"]
    maildir = mesh.data_dir / "sink"

    async def arrived() -> bool:
        return "kim@queue.test" in delivered(maildir)

    await eventually(arrived)

    async def recorded() -> Run | None:
        run = await epoxi("message", "show", message_id, *at(mesh))
        return run if run.code == 0 and "delivered" in run.out and "attempts:" in run.out else None

    run = await eventually(recorded)
    assert ["id", message_id] in lines(run)
    assert ["node", "node2"] in lines(run)
    assert ["subject", "queued one"] in lines(run)
    recipient = next(row for row in lines(run) if row[0] == "kim@queue.test")
    assert recipient[1:4] == ["delivered", "1", "250"]
    run = await epoxi("message", "show", message_id, "--json", *at(mesh))
    shown = json.loads(run.out)
    assert shown["node"] == "node2" and shown["message"]["id"] == message_id
    assert [a["result"] for a in shown["attempts"]] == ["DELIVERY_STATE_DELIVERED"]

    run = await epoxi("queue", "ls", "queue.test_127_0_0_4", *at(mesh))
    assert run.code == 0, run
    table = lines(run)
    assert table[0] == ["ID", "NODE", "STATE", "ACCEPTED", "RECIPIENTS", "SENDER", "SUBJECT"]
    assert [table[1][0], table[1][1], table[1][2], table[1][-1]] == [
        message_id,
        "node2",
        "delivered",
        "queued one",
    ]
    run = await epoxi(
        "queue", "ls", "queue.test_127_0_0_4", "--state", "delivered", "--page-size", "1", "--json", *at(mesh)
    )
    page = json.loads(run.out)
    assert [m["message"]["id"] for m in page["messages"]] == [message_id]
    assert page["nextPageToken"] == ""
    run = await epoxi("queue", "ls", "queue.test_127_0_0_4", "--state", "deferred", *at(mesh))
    assert (run.code, run.out) == (0, "no messages for queue.test_127_0_0_4\n")

    absent = "0" * 32
    run = await epoxi("message", "show", absent, *at(mesh))
    assert run.code == 3, run
    assert run.err.startswith(f"epoxi message show: NOT_FOUND: no reachable node has message {absent}")
    run = await epoxi("message", "show", "no-such-message", *at(mesh))
    assert run.code == 2 and "INVALID_ARGUMENT: message_id 'no-such-message' is not a spool ID" in run.err
    # A key nobody has mail for has an empty queue; a malformed one is a usage error.
    run = await epoxi("queue", "ls", "nobody.test_127_0_0_4", *at(mesh))
    assert (run.code, run.out) == (0, "no messages for nobody.test_127_0_0_4\n"), run
    run = await epoxi("queue", "ls", "nobody", *at(mesh))
    assert run.code == 2 and run.err.startswith("epoxi queue ls: INVALID_ARGUMENT: "), run


async def test_stats_and_health(mesh: Mesh) -> None:
    run = await epoxi("stats", *at(mesh))
    assert run.code == 0, run
    table = lines(run)
    assert ["nodes", "2"] in table
    nodes = {row[0]: row for row in table if row[0] in ("node1", "node2") and len(row) == 6}
    assert nodes["node1"][3] == "127.0.0.2, 127.0.0.3"
    assert nodes["node2"][3] == "127.0.0.2, 127.0.0.4"
    assert "queues:" in run.out
    run = await epoxi("stats", "--json", *at(mesh))
    stats = json.loads(run.out)
    assert sorted(n["id"] for n in stats["cluster"]["nodes"]) == ["node1", "node2"]
    assert sorted(stats["queues"]["nodes"]) == ["node1", "node2"]
    run = await epoxi("stats", "--no-queues", "--json", *at(mesh))
    assert list(json.loads(run.out)) == ["cluster"]

    run = await epoxi("health", *at(mesh))
    assert run.code == 0, run
    assert lines(run)[0] == ["ROUTING KEY", "NODE", "STATUS", "HEALTHY", "OUTPUT"]
    assert run.out.splitlines()[-1].endswith(" healthy, 0 unhealthy")
    run = await epoxi("health", "--json", *at(mesh))
    health = json.loads(run.out)
    assert health["summary"]["unhealthy"] == 0
    assert all(r["healthy"] and r["status"] == "passing" for r in health["results"])


async def start_on(mesh: Mesh, node: str, domain: str, ip: str) -> None:
    async with channel(mesh.address(node)) as ch:
        await node_pb2_grpc.NodeServiceStub(ch).StartPipeline(
            node_pb2.StartPipelineRequest(domain=domain, source_ip=ip), timeout=10
        )


async def test_rebalance_plans_then_moves(mesh: Mesh) -> None:
    # Three pipelines on the shared IP, all on node1: one should move to node2.
    for domain in ("a.rebalance.test", "b.rebalance.test", "c.rebalance.test"):
        await start_on(mesh, "node1", domain, "127.0.0.2")
    keys = {f"{d}.rebalance.test_127_0_0_2" for d in "abc"}

    async def registered() -> bool:
        return keys <= set(await pipelines_json(mesh))

    await eventually(registered)
    run = await epoxi("rebalance", "--dry-run", *at(mesh))
    assert run.code == 0, run
    table = lines(run)
    assert table[0] == ["ROUTING KEY", "FROM", "TO", "STATE", "MESSAGES", "ERROR"]
    [move] = [row for row in table if row[0] in keys]
    assert move[1:4] == ["node1", "node2", "planned"]
    assert "pipelines per node after the planned moves:" in run.out
    # A dry run moves nothing.
    assert {k: v for k, v in (await pipelines_json(mesh)).items() if k in keys} == dict.fromkeys(
        keys, "node1"
    )

    run = await epoxi("rebalance", "--json", *at(mesh))
    assert run.code == 0, run
    result: dict[str, Any] = json.loads(run.out)
    [moved] = [m for m in result["moves"] if m["routingKey"] in keys]
    assert (moved["fromNode"], moved["toNode"], moved["state"]) == (
        "node1",
        "node2",
        "PIPELINE_MOVE_STATE_MOVED",
    )

    async def on_node2() -> bool:
        return (await pipelines_json(mesh)).get(moved["routingKey"]) == "node2"

    await eventually(on_node2)


async def test_errors_are_one_line_with_a_meaningful_exit_code(mesh: Mesh) -> None:
    run = await epoxi("health", "--monitor", unused_address())
    assert run.code == 4, run
    assert run.err.startswith("epoxi health: UNAVAILABLE: ") and run.err.count("\n") == 1
    assert run.out == ""
    # A routing key the monitor refuses: INVALID_ARGUMENT, a usage error.
    run = await epoxi("pipelines", "show", "not-a-key", *at(mesh))
    assert run.code == 2, run
    assert run.err.startswith("epoxi pipelines show: INVALID_ARGUMENT: routing key 'not-a-key' is not")
    # One we refuse before asking.
    run = await epoxi("pipelines", "start", "not-a-key", *at(mesh))
    assert run.code == 2 and "routing key 'not-a-key' is not <domain>_<source ip>" in run.err, run
    run = await epoxi("pipelines", "start", "x.test", "127.0.0.99", *at(mesh))
    assert run.code == 3 and run.err.startswith("epoxi pipelines start: NOT_FOUND: "), run
    run = await epoxi("pipelines", "frobnicate", *at(mesh))
    assert run.code == 2 and "invalid choice: 'frobnicate'" in run.err
    run = await epoxi("queue", "ls", "a.test_127_0_0_2", "--state", "lost", *at(mesh))
    assert run.code == 2 and "invalid choice: 'lost'" in run.err
    run = await epoxi("pipelines", "ls", "--tls-cert", "/nonexistent.pem", *at(mesh))
    assert run.code == 2 and run.err.startswith("epoxi pipelines ls: ") and "Traceback" not in run.err, run


async def test_health_exits_1_when_a_pipeline_is_unhealthy(mesh: Mesh) -> None:
    # Last in the module: it kills node2.
    run = await epoxi("pipelines", "start", "dying.test", "127.0.0.4", *at(mesh))
    assert run.code == 0, run
    await mesh.stop_process("node2", signal.SIGKILL)

    async def unhealthy() -> Run | None:
        run = await epoxi("health", *at(mesh))
        dying = [row[1:4] for row in lines(run) if row[0] == "dying.test_127_0_0_4"]
        return run if dying == [["node2", "critical", "no"]] else None

    run = await eventually(unhealthy)
    assert run.code == 1, run
    # Problems first.
    assert lines(run)[1][3] == "no"
    assert " 0 unhealthy" not in run.out.splitlines()[-1]
    run = await epoxi("pipelines", "ls", "--passing-only", "--json", *at(mesh))
    found = json.loads(run.out)["nodes"]
    assert "dying.test_127_0_0_4" not in {p["routingKey"] for g in found.values() for p in g["pipelines"]}
