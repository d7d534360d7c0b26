"""How fast the spool records delivery outcomes: one transaction each, against groups.

    .venv/bin/python -m benchmarks.spool_outcomes
    .venv/bin/python -m benchmarks.spool_outcomes --outcomes 5000 --lanes 10 --group 50

For each way, a fresh spool (WAL, ``synchronous=FULL``, as the node runs it) in ``--work-dir``
gets ``--outcomes`` one-recipient messages, all claimed at once; then ``--lanes`` coroutines, as
a pipeline's lanes would, report their outcomes:

- **capacity** — as fast as the spool takes them: *one per transaction* (before: each lane
  awaits ``Spool.record([outcome])``) against *groups of --group* (each lane awaits
  ``Spool.record`` of ``--group`` outcomes). The ratio of these is the spool's gain.
- **pipeline** — each lane first waits ``--send-ms`` (an SMTP transaction), then either awaits
  ``Spool.record([outcome])`` (before) or hands the outcome to the pipeline's ``Recorder``
  (``--group`` outcomes or ``--delay`` seconds per commit; the end of the batch flushes the rest).

Meanwhile a probe enqueues one message every 2 ms and times each ``Spool.enqueue`` (itself one
commit): how long the spool thread keeps an enqueue waiting. Prints outcomes/s and commits of
each way, the ratios, and the enqueue latencies. Not a test: the machine is shared, so only
ratios measured in one run mean much.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _utils
from services.node.engine.recorder import RECORD_DELAY, RECORD_GROUP, Recorder
from services.node.engine.reply import Reply
from services.node.engine.spool import NewMessage, Outcome, Spool, State

KEY = "example.com_127_0_0_2"
DATA = b"Subject: hi\r\n\r\n" + b"x" * 2000 + b"\r\n"
OK = Reply.parse(250, "2.0.0 OK")

Report = Callable[[Spool, list[list[Outcome]]], Awaitable[None]]


@dataclass
class Run:
    name: str
    outcomes: int
    seconds: float
    commits: int
    enqueue_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.outcomes / self.seconds


def in_groups(size: int, send: float = 0.0) -> Report:
    """Each lane awaits ``Spool.record`` of ``size`` outcomes at a time, after ``send`` seconds each."""

    async def report(spool: Spool, lanes: list[list[Outcome]]) -> None:
        async def lane(outcomes: list[Outcome]) -> None:
            for start in range(0, len(outcomes), size):
                if send:
                    await asyncio.sleep(send)
                await spool.record(outcomes[start : start + size])

        await asyncio.gather(*(lane(x) for x in lanes))

    return report


def recorded(group: int, delay: float, send: float) -> Report:
    """Each lane hands each outcome to one ``Recorder``, as the pipeline does, after ``send`` seconds."""

    async def report(spool: Spool, lanes: list[list[Outcome]]) -> None:
        recorder = Recorder(spool, group, delay)

        async def lane(outcomes: list[Outcome]) -> None:
            for o in outcomes:
                await asyncio.sleep(send)
                recorder.add([o])

        await asyncio.gather(*(lane(x) for x in lanes))
        await recorder.flush()  # the end of the batch

    return report


async def measure(name: str, report: Report, path: Path, outcomes: int, lanes: int) -> Run:
    spool = await Spool.open(path)
    try:
        msgs = [NewMessage("ann@sender.test", [f"r{i}@example.com"], DATA) for i in range(outcomes)]
        for start in range(0, outcomes, 500):
            await spool.enqueue(KEY, msgs[start : start + 500])
        jobs = await spool.claim(KEY, time.time(), outcomes)
        now = time.time()
        all_outcomes = [Outcome(j.deliveries[0].id, State.DELIVERED, 1, now, OK, now) for j in jobs]
        per_lane = [all_outcomes[i::lanes] for i in range(lanes)]

        commits = 0

        def trace(statement: str) -> None:
            nonlocal commits
            commits += statement.lstrip().upper().startswith("COMMIT")

        await spool._run(spool._db.set_trace_callback, trace)
        latencies: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            n = 0
            while not done.is_set():
                t = time.perf_counter()
                await spool.enqueue(
                    "probe.test_127_0_0_2", [NewMessage("a@b.test", [f"p{n}@probe.test"], DATA)]
                )
                latencies.append((time.perf_counter() - t) * 1000)
                n += 1
                await asyncio.sleep(0.002)

        prober = asyncio.create_task(probe())
        started = time.perf_counter()
        await report(spool, per_lane)
        seconds = time.perf_counter() - started
        done.set()
        await prober
        await spool._run(spool._db.set_trace_callback, None)
        counts = await spool.counts(KEY)
        assert counts.delivered == outcomes, counts
        return Run(name, outcomes, seconds, commits - len(latencies), latencies)
    finally:
        await spool.close()


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


WAYS = (
    "capacity, one per transaction",
    "capacity, groups",
    "pipeline, one per transaction",
    "pipeline, Recorder",
)


def ways(args: argparse.Namespace) -> dict[str, Report]:
    send = args.send_ms / 1000
    return {
        WAYS[0]: in_groups(1),
        WAYS[1]: in_groups(args.group),
        WAYS[2]: in_groups(1, send),
        WAYS[3]: recorded(args.group, args.delay, send),
    }


async def main_async(args: argparse.Namespace) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="spool-outcomes-", dir=args.work_dir) as d:
        work = Path(d)
        runs = []
        for round_ in range(args.rounds):  # alternated, so background load hits both ways alike
            for n, (name, report) in enumerate(ways(args).items()):
                runs.append(await measure(name, report, work / f"{round_}-{n}.db", args.outcomes, args.lanes))
        return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outcomes", type=int, default=3000)
    parser.add_argument("--lanes", type=int, default=10, help="concurrent reporters, like max_connections")
    parser.add_argument("--group", type=int, default=RECORD_GROUP)
    parser.add_argument("--delay", type=float, default=RECORD_DELAY)
    parser.add_argument("--send-ms", type=float, default=2.0, help="time of one send, for the pipeline ways")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="where the spools go (a real disk: fsync matters)")
    args = parser.parse_args(argv)

    runs = asyncio.run(main_async(args))
    rows = [["way", "outcomes", "seconds", "outcomes/s", "commits", "enqueue ms p50", "p99", "max"]]
    for r in runs:
        rows.append(
            [
                r.name,
                str(r.outcomes),
                f"{r.seconds:.3f}",
                f"{r.per_second:,.0f}",
                str(r.commits),
                f"{pct(r.enqueue_ms, 50):.2f}",
                f"{pct(r.enqueue_ms, 99):.2f}",
                f"{max(r.enqueue_ms, default=0.0):.2f}",
            ]
        )
    print(_utils.table(rows))
    rate = {w: statistics.median(r.per_second for r in runs if r.name == w) for w in WAYS}
    p50 = {w: statistics.median(pct(r.enqueue_ms, 50) for r in runs if r.name == w) for w in WAYS}
    print(f"\nmedians of {args.rounds} rounds, {args.lanes} lanes, group {args.group}:")
    for w in WAYS:
        print(f"  {w}: {rate[w]:,.0f} outcomes/s, enqueue p50 {p50[w]:.2f} ms")
    print(
        f"spool capacity, groups of {args.group} / one per transaction: {rate[WAYS[1]] / rate[WAYS[0]]:.1f}x"
    )
    print(
        f"pipeline ({args.send_ms:g} ms sends), Recorder / one per transaction: {rate[WAYS[3]] / rate[WAYS[2]]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
