"""``--log-format json``: a node process writes one JSON object per line on stderr, and its records
about mail carry the trace they belong to, the routing key and the message's spool ID.

A node process, tracing to a real OTLP receiver in this test, delivers to a real SMTP sink that
defers the one recipient: the deferral is logged, inside the attempt's ``smtp send`` span.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from devmesh.otlp import OtlpReceiver
from devmesh.sink import Sink
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from tests.services.node.support import FAST, KEY, SOURCE_IP, email, enqueue_batch, start
from tests.support import eventually

READY = re.compile(r"listening on (\S+)\s*$")


async def test_a_deferral_is_logged_as_json_with_its_trace_key_and_message(
    tmp_path: Path, sink: Sink
) -> None:
    sink.replies["later@example.com"] = "451 4.3.0 try later"
    receiver = OtlpReceiver()
    await receiver.start()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "PYTHONUNBUFFERED": "1",
    }
    args = ["--id", "n1", "--egress-ip", SOURCE_IP, "--listen", "127.0.0.1:0", "--route", f"*={sink.address}"]
    args += ["--spool", str(tmp_path / "spool.db"), "--retry-base", "1h", "--log-format", "json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.node",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read())
    try:
        async with asyncio.timeout(30):
            while not (m := READY.search(line := (await proc.stdout.readline()).decode())):
                assert line, "the node exited before it was ready"
        async with channel(m.group(1)) as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            await start(stub, policy=FAST)
            [message_id] = (await enqueue_batch(stub, KEY, email("later@example.com"))).message_ids

            async def deferred() -> bool:
                request = node_pb2.GetQueueStatsRequest(routing_key=KEY)
                stats: node_pb2.GetQueueStatsResponse = await stub.GetQueueStats(request, timeout=5)
                return stats.totals.deferred == 1

            await eventually(deferred)
        async with asyncio.timeout(30):
            spans = await receiver.wait_for(
                lambda spans: any(s.attributes.get("epoxi.message_id") == message_id for s in spans)
            )
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await receiver.close()
    lines = (await errors).decode().splitlines()

    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is one object
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    [sent] = [s for s in spans if s.name == "smtp send" and s.attributes["epoxi.message_id"] == message_id]
    [record] = [r for r in records if r.get("message_id") == message_id and "deferred" in r["message"]]
    assert record["level"] == "INFO"
    assert record["routing_key"] == KEY
    assert record["node"] == "n1"
    assert record["trace_id"] == sent.trace_id  # the attempt's trace: the one that spooled the mail
    assert record["span_id"] == sent.span_id
    assert "451" in record["message"] and "later@example.com" in record["message"]
