"""One pipeline alone, tracing off and on: what the attempt's own tracing work costs.

In one process each (a tracer provider is once per process), a pipeline delivers ``--messages``
spooled 2 KB messages to Postfix's ``smtp-sink`` over 8 connections, and the main thread's CPU
per message is measured (``time.thread_time``; the spool's thread and the sink are not in it):

- ``off``: no exporter configured, as Epoxi ships;
- ``unsampled``: an OTLP exporter configured with ``parentbased_traceidratio`` 0, each message
  spooled under a stored, unsampled ``traceparent``, so every attempt goes through
  ``tracing.child_of`` and builds nothing to export.

The variants take turns for ``--rounds``; the report is each one's median against ``off``.

``python -m benchmarks.pipeline_tracing [--messages N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._utils import machine, table
from benchmarks.smtpsink import SmtpSink

VARIANTS = ("off", "unsampled")
KEY = "example.com_127_0_0_1"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
UNSAMPLED_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # never called: nothing is sampled
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": "0",
}


async def one_run(variant: str, messages: int) -> dict[str, float]:
    from epoxi import rendering
    from epoxi.envelope import new_email
    from epoxi.observability import tracing
    from epoxi.policy import Policy
    from services.node.engine.mx import Destinations, Host
    from services.node.engine.pipeline import Pipeline
    from services.node.engine.smtp import SmtpSender
    from services.node.engine.spool import NewMessage, Spool

    if variant == "unsampled" and not tracing.configure("epoxi-bench"):
        raise RuntimeError("tracing did not configure")
    work = Path(tempfile.mkdtemp(prefix="epoxi-pipeline-tracing-"))
    spool = await Spool.open(work / "spool.db")
    try:
        rendered = [
            NewMessage(
                "a@b.test", [r], rendering.render(new_email("a@b.test", to=[r], subject="s", text="x" * 1900))
            )
            for r in (f"r{i}@example.com" for i in range(messages))
        ]
        traceparent = UNSAMPLED if variant == "unsampled" else ""
        for i in range(0, messages, 500):
            await spool.enqueue(KEY, rendered[i : i + 500], traceparent=traceparent)
        async with SmtpSink() as sink:
            sender = SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "bench.epoxi.test")
            policy = Policy(
                name=KEY, max_connections=8, batch_size=500, allowed_messages=10**6, message_interval=1.0
            )
            p = Pipeline(
                routing_key=KEY,
                domain="example.com",
                source_ip="127.0.0.1",
                policy=policy,
                spool=spool,
                sender=sender,
            )
            cpu, wall = time.thread_time(), time.perf_counter()
            p.start()
            await sink.wait_for(messages, 300)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            await p.stop()
    finally:
        await spool.close()
        tracing.shutdown()
    return {"us_per_msg": cpu / messages * 1e6, "msgs_per_s": messages / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_tracing", description=__doc__.split("\n")[0]
    )
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in a child process
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(asyncio.run(one_run(args.run, args.messages))))
        return 0
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            env = {**os.environ, **(UNSAMPLED_ENV if v == "unsampled" else {})}
            for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER") if v == "off" else ():
                env.pop(name, None)
            child = [
                sys.executable,
                "-m",
                "benchmarks.pipeline_tracing",
                "--run",
                v,
                "--messages",
                str(args.messages),
            ]
            out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    print(", ".join(f"{k}: {v}" for k, v in machine().items()))
    print(f"\n{args.messages:,} messages of 2 KB, one pipeline, 8 connections, medians of {args.rounds}")
    base = statistics.median(r["us_per_msg"] for r in runs["off"])
    rows = [["variant", "main-thread µs/msg", "/ off", "msgs/s"]]
    for v, rs in runs.items():
        us = statistics.median(r["us_per_msg"] for r in rs)
        rate = statistics.median(r["msgs_per_s"] for r in rs)
        rows.append([v, f"{us:.1f}", f"{us / base:.2f}", f"{rate:,.0f}"])
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
