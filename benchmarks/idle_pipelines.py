"""Memory and registry cost of idle pipelines on one node.

    .venv/bin/python -m benchmarks.idle_pipelines                     # 1,000 pipelines
    .venv/bin/python -m benchmarks.idle_pipelines --pipelines 200 --observe 15

Starts the development registry and one node (each its own process, as ``devmesh.supervisor`` does),
then starts ``--pipelines`` pipelines through ``NodeService.StartPipeline`` (one domain each,
all from egress IP 127.0.0.2; nothing is ever sent), waits until the registry shows every
pipeline passing, and watches the idle node for ``--observe`` seconds. Prints the node's RSS
before and after and per pipeline, the time it took to start them, and what the node and the
registry spend keeping 1,000 TTL checks passing (CPU while idle, checks still passing, the
size and latency of the health query the router's watch issues).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _utils
from devmesh.supervisor import Process, spawn
from epoxi.registry import client
from epoxi.registry.services import NODE_SERVICE, PIPELINE_SERVICE
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc

EGRESS_IP = "127.0.0.2"
NODE_ID = "idle1"


@dataclass
class Result:
    pipelines: int
    started: int = 0
    start_seconds: float = 0.0
    start_progress: list[tuple[int, float]] = field(default_factory=list)
    passing_seconds: float | None = None
    node_rss_before_mib: float = 0.0
    node_rss_after_mib: float = 0.0
    node_peak_rss_mib: float = 0.0
    registry_rss_before_mib: float = 0.0
    registry_rss_after_mib: float = 0.0
    observe_seconds: float = 0.0
    node_idle_cpu: float = 0.0
    registry_idle_cpu: float = 0.0
    passing_after_observe: int = 0
    health_query_seconds: float = 0.0
    health_query_kib: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)

    @property
    def per_pipeline_kib(self) -> float:
        return (self.node_rss_after_mib - self.node_rss_before_mib) * 1024 / max(1, self.started)


def _mib(pid: int, field: str = "VmRSS") -> float:
    return _utils.status_kib(pid, field) / 1024


async def _passing(consul: Any, service: str) -> list[Any]:
    _, entries = await consul.health.service(service, passing=True)
    return list(entries)


async def _wait_passing(consul: Any, service: str, count: int, seconds: float) -> None:
    """Until ``count`` instances of ``service`` pass, following the registry with blocking queries."""
    async with asyncio.timeout(seconds):
        index = None
        while True:
            index, entries = await consul.health.service(service, passing=True, index=index, wait="5s")
            if len(entries) >= count:
                return


async def start_pipelines(address: str, count: int, concurrency: int, r: Result, seconds: float) -> None:
    domains = iter(f"idle{i}.bench.test" for i in range(count))
    start = time.perf_counter()
    marks = {m for m in (1, 10, 100, 250, 500, 750, 1000, 2000, 5000) if m <= count} | {count}
    async with channel(address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)

        async def worker() -> None:
            for domain in domains:
                await stub.StartPipeline(
                    node_pb2.StartPipelineRequest(domain=domain, source_ip=EGRESS_IP), timeout=seconds
                )
                r.started += 1
                if r.started in marks:
                    r.start_progress.append((r.started, time.perf_counter() - start))
                    print(
                        f"  {r.started} pipelines started after {time.perf_counter() - start:.1f}s",
                        flush=True,
                    )

        async with asyncio.timeout(seconds):
            async with asyncio.TaskGroup() as tg:
                for _ in range(concurrency):
                    tg.create_task(worker())
    r.start_seconds = time.perf_counter() - start


async def run(args: argparse.Namespace) -> Result:
    r = Result(args.pipelines, machine=_utils.machine())
    work = Path(tempfile.mkdtemp(prefix="epoxi-idle-", dir=args.work_dir))
    procs: list[Process] = []
    consul = None
    try:
        registry = await spawn(
            "registry", ["devmesh.registry", "--http-addr", "127.0.0.1:0", "--check-update-interval", "0s"]
        )
        procs.append(registry)
        reg_addr = registry.address.removeprefix("http://")
        node = await spawn(
            "node",
            [
                "services.node",
                "--id",
                NODE_ID,
                "--listen",
                "127.0.0.1:0",
                "--egress-ip",
                EGRESS_IP,
                "--spool",
                str(work / "spool.db"),
                "--route",
                "*=127.0.0.1:9",  # never used: nothing is sent
                "--consul",
                reg_addr,
                "--check-interval",
                args.check_interval,
            ],
        )
        procs.append(node)
        consul = client.connect(reg_addr)
        await _wait_passing(consul, NODE_SERVICE, 1, 30)
        await asyncio.sleep(2)  # let start-up garbage settle
        node_pid, reg_pid = node.proc.pid, registry.proc.pid
        r.node_rss_before_mib, r.registry_rss_before_mib = _mib(node_pid), _mib(reg_pid)
        print(f"node RSS {r.node_rss_before_mib:.1f} MiB; starting {args.pipelines} pipelines", flush=True)
        try:
            await start_pipelines(node.address, args.pipelines, args.concurrency, r, args.timeout)
        except TimeoutError:
            print(f"  gave up after {args.timeout:.0f}s with {r.started} pipelines started", flush=True)
            r.start_seconds = args.timeout
        begin = time.perf_counter()
        try:
            await _wait_passing(consul, PIPELINE_SERVICE, r.started, args.timeout)
            r.passing_seconds = time.perf_counter() - begin
        except TimeoutError:
            pass
        print(f"observing the idle node for {args.observe:.0f}s", flush=True)
        cpu_node, cpu_reg, t0 = _utils.cpu_seconds(node_pid), _utils.cpu_seconds(reg_pid), time.perf_counter()
        await asyncio.sleep(args.observe)
        r.observe_seconds = time.perf_counter() - t0
        r.node_idle_cpu = (_utils.cpu_seconds(node_pid) - cpu_node) / r.observe_seconds
        r.registry_idle_cpu = (_utils.cpu_seconds(reg_pid) - cpu_reg) / r.observe_seconds
        q0 = time.perf_counter()
        _, entries = await consul.health.service(PIPELINE_SERVICE)
        r.health_query_seconds = time.perf_counter() - q0
        r.health_query_kib = len(json.dumps(entries)) / 1024
        r.passing_after_observe = len(await _passing(consul, PIPELINE_SERVICE))
        r.node_rss_after_mib, r.node_peak_rss_mib = _mib(node_pid), _mib(node_pid, "VmHWM")
        r.registry_rss_after_mib = _mib(reg_pid)
    finally:
        if consul is not None:
            await consul.close()
        for p in reversed(procs):
            await p.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return r


def render(r: Result) -> str:
    rows = [["", "value"]]
    rows.append(["pipelines started", f"{r.started} of {r.pipelines}"])
    rows.append(["time to start them", f"{r.start_seconds:.1f} s"])
    for n, t in r.start_progress:
        rows.append([f"  first {n}", f"{t:.1f} s"])
    passing = f"{r.passing_seconds:.1f} s" if r.passing_seconds is not None else "not within the timeout"
    rows.append(["then until all passing", passing])
    rows.append(["node RSS before", f"{r.node_rss_before_mib:.1f} MiB"])
    rows.append(["node RSS after", f"{r.node_rss_after_mib:.1f} MiB (peak {r.node_peak_rss_mib:.1f})"])
    rows.append(["node RSS per pipeline", f"{r.per_pipeline_kib:.1f} KiB"])
    rows.append(
        [
            "registry RSS before / after",
            f"{r.registry_rss_before_mib:.1f} / {r.registry_rss_after_mib:.1f} MiB",
        ]
    )
    rows.append([f"node CPU while idle ({r.observe_seconds:.0f} s)", f"{r.node_idle_cpu:.0%} of a core"])
    rows.append(["registry CPU while idle", f"{r.registry_idle_cpu:.0%} of a core"])
    rows.append(["pipelines passing after", f"{r.passing_after_observe} of {r.started}"])
    rows.append(
        [
            "health query (all pipelines)",
            f"{r.health_query_seconds * 1000:.0f} ms, {r.health_query_kib:.0f} KiB",
        ]
    )
    head = "Machine: " + "; ".join(f"{k} {v}" for k, v in r.machine.items())
    return f"\n{head}\n\n{_utils.table(rows)}\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.idle_pipelines", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8, help="StartPipeline calls in flight")
    p.add_argument("--check-interval", default="5s", help="the node's registry sync interval")
    p.add_argument("--observe", type=float, default=30.0, help="seconds to watch the idle node")
    p.add_argument("--timeout", type=float, default=900.0, help="give up starting pipelines after this")
    p.add_argument("--work-dir", help="where the spool goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    r = asyncio.run(run(args))
    print(render(r), end="")
    if args.json is not None:
        args.json.write_text(
            json.dumps({**asdict(r), "per_pipeline_kib": r.per_pipeline_kib}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
