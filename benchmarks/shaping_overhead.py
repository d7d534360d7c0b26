"""What a shaping budget costs a pipeline per message, when no rule is in force.

    .venv/bin/python -m benchmarks.shaping_overhead
    .venv/bin/python -m benchmarks.shaping_overhead --messages 20000 --repeat 5

One pipeline in this process delivers ``--messages`` spooled 2 KB messages over 8 connections to
Postfix's ``smtp-sink``, first without a ``Shaper`` (the baseline), then with one (its MX site's
budget shared, no limits, no rule in force), then with one whose site has limits high enough
never to bind (the budget's rate limiter and connection count at work); the variants take turns,
``--repeat`` rounds. Prints each variant's median messages/s and CPU microseconds per message,
and both as ratios against the baseline of the same run. Not a test: only ratios mean much.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._utils import machine, table
from benchmarks.smtpsink import SmtpSink
from epoxi import rendering
from epoxi.envelope import new_email
from epoxi.policy import Policy
from epoxi.shaping import ShapingTable, Site
from services.node.engine.mx import Destinations, Host
from services.node.engine.pipeline import Pipeline
from services.node.engine.shaping import Shaper
from services.node.engine.smtp import SmtpSender
from services.node.engine.spool import NewMessage, Spool

VARIANTS = ("no shaper", "budget, no limits", "budget, site limits")


def shaper_for(variant: str, sink: SmtpSink, destinations: Destinations) -> Shaper | None:
    if variant == "no shaper":
        return None
    sites = {}
    if variant == "budget, site limits":
        sites = {sink.address: Site(sink.address, (sink.address,), 64, 10**7, 1.0)}
    return Shaper(destinations, ShapingTable(sites=sites), "bench")


async def one(variant: str, n: int, work: Path, sink: SmtpSink) -> tuple[float, float]:
    """(messages/s, CPU µs per message) of one variant's run."""
    spool = await Spool.open(work / f"{variant.replace(' ', '-').replace(',', '')}-{time.monotonic_ns()}.db")
    try:
        data = rendering.render(
            new_email("ann@bench.test", to=["bob@example.com"], subject="x", text="x" * 2000)
        )
        await spool.enqueue(
            "example.com_127_0_0_1", [NewMessage("ann@bench.test", ["bob@example.com"], data)] * n
        )
        sender = SmtpSender(Destinations({"*": Host(sink.host, sink.port)}), "bench.epoxi.test", timeout=30)
        policy = Policy(
            "bench", max_connections=8, batch_size=200, allowed_messages=10**7, message_interval=1.0
        )
        before = sink.count
        cpu, wall = time.process_time(), time.perf_counter()
        p = Pipeline(
            routing_key="example.com_127_0_0_1",
            domain="example.com",
            source_ip="127.0.0.1",
            policy=policy,
            spool=spool,
            sender=sender,
            shaper=shaper_for(variant, sink, sender.destinations),
        )
        p.start()
        done = await sink.wait_for(before + n, 300)
        cpu, wall = time.process_time() - cpu, done - wall
        await p.stop(grace=5)
        return n / wall, cpu / n * 1e6
    finally:
        await spool.close()


async def main_async(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="epoxi-shaping-") as tmp:
        async with SmtpSink() as sink:
            for _ in range(args.repeat):
                for variant in VARIANTS:
                    results[variant].append(await one(variant, args.messages, Path(tmp), sink))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    base_rate = statistics.median(r for r, _ in results[VARIANTS[0]])
    base_cpu = statistics.median(c for _, c in results[VARIANTS[0]])
    rows = [["variant", "msgs/s", "/ baseline", "CPU µs/msg", "/ baseline"]]
    for variant, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows.append(
            [variant, f"{rate:,.0f}", f"{rate / base_rate:.3f}", f"{cpu:.1f}", f"{cpu / base_cpu:.3f}"]
        )
    print(f"{args.messages:,} messages of 2 KB, one pipeline, 8 connections, medians of {args.repeat}")
    print(", ".join(f"{k}: {v}" for k, v in machine().items()))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
