"""The delivery client alone: aiosmtplib the way the node used it before issue 11, against the
lean client (``services.node.engine.smtp_client``) without PIPELINING, with it, and with BDAT.

One process sends ``--messages`` rendered messages (``benchmarks.workload``) over
``--connections`` reused connections (a new one every 100 messages, as ``SmtpSender`` does), and
reports msgs/s and the CPU milliseconds per message of this process (``time.process_time``; the
servers are other processes), each as a ratio against aiosmtplib on the same server:

- against ``smtp-sink`` (C): (a) aiosmtplib, one command one reply; (b) the lean client, the
  server not offering PIPELINING (``-p``); (c) the lean client with PIPELINING;
- against ``benchmarks.chunking_sink`` (Python, offers CHUNKING, which smtp-sink does not):
  (a), (c) and (d) the lean client with BDAT.

``python -m benchmarks.smtp_client [--sizes 2048 102400] [--messages N] [--connections C]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiosmtplib

from benchmarks import workload
from benchmarks._utils import machine, table
from benchmarks.chunking_sink import ChunkingSink
from benchmarks.smtpsink import SmtpSink

_PER_CONNECTION = 100  # SmtpSender's default max_messages_per_connection
_EHLO = "bench.epoxi.test"


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: float
    accepted: int

    def rate(self, n: int) -> float:
        return n / self.seconds

    def cpu_ms(self, n: int) -> float:
        return self.cpu * 1000 / n


Client = Callable[[Sequence[workload.Rendered], str, int], Awaitable[int]]


async def aiosmtplib_client(messages: Sequence[workload.Rendered], target: str, connections: int) -> int:
    """The node's delivery before issue 11: MAIL, each RCPT, DATA, a reply awaited for each."""
    host, _, port = target.rpartition(":")
    queue = list(reversed(messages))
    accepted = 0

    async def lane() -> None:
        nonlocal accepted
        while queue:
            smtp = aiosmtplib.SMTP(
                hostname=host,
                port=int(port),
                source_address=("127.0.0.1", 0),
                local_hostname=_EHLO,
                timeout=60,
                start_tls=False,
            )
            await smtp.connect()
            await smtp.ehlo()
            for _ in range(_PER_CONNECTION):
                if not queue:
                    break
                m = queue.pop()
                await smtp.mail(m.sender)
                await smtp.rcpt(m.recipient)
                reply = await smtp.data(m.data)
                accepted += reply.code == 250
            await smtp.quit()

    async with asyncio.TaskGroup() as tg:
        for _ in range(connections):
            tg.create_task(lane())
    return accepted


def lean_client(chunking: bool) -> Client:
    async def send(messages: Sequence[workload.Rendered], target: str, connections: int) -> int:
        result = await workload.blast(messages, target, connections, bind_source=False, chunking=chunking)
        return result.accepted

    return send


async def measure(
    client: Client, messages: Sequence[workload.Rendered], target: str, connections: int
) -> Run:
    cpu, start = time.process_time(), time.perf_counter()
    accepted = await client(messages, target, connections)
    return Run(time.perf_counter() - start, time.process_time() - cpu, accepted)


@dataclass(frozen=True)
class Variant:
    name: str
    server: str  # "smtp-sink", "smtp-sink -p" or "chunking sink"
    client: Client


VARIANTS = [
    Variant("(a) aiosmtplib", "smtp-sink", aiosmtplib_client),
    Variant("(b) lean, no PIPELINING", "smtp-sink -p", lean_client(False)),
    Variant("(c) lean, PIPELINING", "smtp-sink", lean_client(False)),
    Variant("(a) aiosmtplib", "chunking sink", aiosmtplib_client),
    Variant("(c) lean, PIPELINING", "chunking sink", lean_client(False)),
    Variant("(d) lean, BDAT", "chunking sink", lean_client(True)),
]


async def run_variant(v: Variant, messages: Sequence[workload.Rendered], connections: int) -> Run:
    if v.server == "chunking sink":
        async with ChunkingSink() as chunking:
            return await measure(v.client, messages, chunking.address, connections)
    options = ["-p"] if v.server.endswith("-p") else []
    async with SmtpSink(options=options) as sink:
        run = await measure(v.client, messages, sink.address, connections)
        await sink.wait_for(run.accepted, 30)
        return run


async def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smtp_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 102400], help="message sizes in bytes")
    p.add_argument(
        "--messages", type=int, default=0, help="messages per run (default: 10,000 at 2 KB, 2,000 at 100 KB)"
    )
    p.add_argument("--connections", type=int, default=8)
    p.add_argument(
        "--rounds", type=int, default=3, help="runs of each variant, alternating; medians reported"
    )
    args = p.parse_args(argv)
    if not SmtpSink.available():
        print("smtp-sink not found: apt-get install postfix", file=sys.stderr)
        return 2
    if args.connections < 1 or args.rounds < 1 or args.messages < 0 or min(args.sizes) < 1:
        print(
            "--connections, --rounds and --sizes must be positive, --messages not negative", file=sys.stderr
        )
        return 2
    for name, value in machine().items():
        print(f"{name}: {value}")
    ks = workload.keys(1, ["127.0.0.1"])
    for size in args.sizes:
        n = args.messages or (10_000 if size <= 16_384 else 2_000)
        messages = workload.rendered(workload.emails(n, ks, size), ks)
        runs: dict[int, list[Run]] = {i: [] for i in range(len(VARIANTS))}
        for _ in range(args.rounds):
            for i, v in enumerate(VARIANTS):
                run = await run_variant(v, messages, args.connections)
                if run.accepted != n:
                    print(f"{v.name} on {v.server}: {run.accepted} of {n} accepted", file=sys.stderr)
                    return 1
                runs[i].append(run)
        rates = {i: statistics.median(r.rate(n) for r in rs) for i, rs in runs.items()}
        cpus = {i: statistics.median(r.cpu_ms(n) for r in rs) for i, rs in runs.items()}
        rows = [["client", "server", "msgs/s", "x (a)", "CPU ms/msg", "x (a)"]]
        for i, v in enumerate(VARIANTS):
            base = next(j for j, w in enumerate(VARIANTS) if w.server.split()[0] == v.server.split()[0])
            rows.append(
                [
                    v.name,
                    v.server,
                    f"{rates[i]:,.0f}",
                    f"{rates[i] / rates[base]:.2f}",
                    f"{cpus[i]:.3f}",
                    f"{cpus[i] / cpus[base]:.2f}",
                ]
            )
        print(f"\n{n:,} messages of {size:,} bytes, {args.connections} connections, medians of {args.rounds}")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
