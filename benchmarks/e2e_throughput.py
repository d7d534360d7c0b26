"""End-to-end throughput and latency: Epoxi against the SMTP path alone, against Postfix's C
``smtp-source`` blasting ``smtp-sink`` directly, and against a Postfix relay.

    .venv/bin/python -m benchmarks.e2e_throughput                       # 20,000 x 2 KB, a few minutes
    .venv/bin/python -m benchmarks.e2e_throughput --messages 50000 --keys 20 --size 2048
    .venv/bin/python -m benchmarks.e2e_throughput --sizes 2048,102400   # every phase at each size
    .venv/bin/python -m benchmarks.e2e_throughput --profile var/bench/profile
    .venv/bin/python -m benchmarks.e2e_throughput --telemetry off,metrics,tracing --repeat 3 --skip postfix

Five phases per message size. The first four go each into a fresh Postfix ``smtp-sink`` on a free
loopback port, each timed from the first submit until the sink has received all N messages:

1. ``ceiling``, SMTP ceiling: the node's own client code (``SmtpSender``, bound to the key's
   source IP, connections reused) sends the same rendered messages straight to the sink over
   ``connections x keys`` connections, from one process.
2. ``source``, smtp-source direct: Postfix's C ``smtp-source`` sends N messages of the same size
   to the sink over ``connections x keys`` sessions (at most ``SOURCE_SESSIONS``), each kept open
   (``-d``): the physical limit of SMTP on this machine. smtp-source does not pipeline.
3. ``epoxi``, Epoxi: ``devmesh.supervisor.Mesh`` (dev registry, nodes, router, monitor, gateway, each
   a process) with a route override to the sink; the emails go through ``RouterService.RouteEmails``
   in batches (``--batch``, by default as many as fit ``CALL_BYTES``), a few calls in flight; spool
   fsync on (the default). Also timed: acceptance (until RouteEmails acknowledged all N), and the
   CPU-seconds every mesh process spent from the first submit until the sink had all N, per
   1,000 messages (/proc/<pid>/stat utime + stime; with ``--telemetry``, of the last variant run).
4. ``postfix``, Postfix: a throwaway instance relaying to the sink (``devmesh.postfix``), fed by
   ``smtp-source`` (or the aiosmtplib client), when Postfix is installed and we are root.
5. ``latency``: latency from acceptance (the return of the RouteEmails call that carried the
   email) to the sink's 250 for its end of data, p50 and p99, in a phase of its own: a fresh mesh
   delivering into ``benchmarks.latency_sink`` (Python; ``smtp-sink`` cannot time messages), every
   email tracked by a header. First at a low rate (``--latency-rate`` a second, one email per
   call, paced, ``--latency-messages`` of them), then at full load (``--latency-load`` emails
   submitted as in phase 3). The Python sink costs more CPU than ``smtp-sink``, so the full-load
   figures are taken here and not in phase 3, whose throughput stays the headline. Both clocks
   are this machine's ``time.time()``; a delivery may beat the acknowledgement back to the
   client, so a latency can be slightly negative.

With ``--callback-cpu``, phase 3 also reports, per router and node, the CPU its event loop spent
in each kind of callback over the same window (``benchmarks/callback_cpu``: measured as CPU
time, not sampled, so time spent waiting for a core is not counted), per 1,000 messages.

With ``--telemetry``, phase 3 runs once per variant (``--repeat`` times, the variants taking
turns), and the report gives each variant's median against ``off``: ``off`` (metrics off, no
tracing), ``metrics`` (metrics on, every service scraped every ``--scrape-interval``), ``tracing``
(metrics off, every span exported to an OTLP receiver, ``devmesh.otlp``, a process of its own
that only counts them), ``sampled`` (as ``tracing``, with 1 trace in 10 sampled:
``parentbased_traceidratio``), ``all`` (metrics and every span).

The machine is shared and noisy, so the figures that matter are the ratios within one run.
Every process started here is stopped on exit, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import _utils, callback_cpu
from benchmarks.latency_sink import LatencySink
from benchmarks.profiling import PySpy, summarize
from benchmarks.smtpsink import SmtpSink
from benchmarks.workload import SENDER, Key, blast, emails, keys, rendered, track_id
from devmesh.postfix import PostfixRelay
from devmesh.supervisor import Mesh, NodeSpec, Process, spawn
from epoxi import address, proto_time, rendering
from epoxi.policy import DEFAULT_MAX_CONNECTIONS
from epoxi.registry.services import PIPELINE_SERVICE, pipeline_service_id
from epoxi.runtime.channels import RPC_TIMEOUT, Channels, channel
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, pipeline_pb2, router_pb2, router_pb2_grpc

UNTHROTTLED = 1_000_000  # allowed_messages per second when --throttle is not given
TELEMETRY_VARIANTS = ("off", "metrics", "tracing", "sampled", "all")
SAMPLED_RATIO = "0.1"
PHASES = ("ceiling", "source", "epoxi", "postfix", "latency")
CALLBACKS_SHOWN = 6  # --callback-cpu: the costliest kinds of callback shown per process
# What one RouteEmails call carries by default (--batch): at most 500 emails, and about this many
# bytes, well under the mesh's gRPC message limit (epoxi.runtime.limits) and quick to spool.
CALL_BYTES = 4 * 1024 * 1024
MAX_BATCH = 500
# smtp-source sessions at most (connections x keys, 200 by default, as many as Epoxi's lanes).
SOURCE_SESSIONS = 200

CEILING = "SMTP ceiling"
SOURCE = "smtp-source direct"
EPOXI = "Epoxi end to end"
POSTFIX = "Postfix relay"
LATENCY_LOAD = "Epoxi into the latency sink"


@dataclass
class Phase:
    name: str
    messages: int
    seconds: float
    accept_seconds: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def accept_rate(self) -> float | None:
        return self.messages / self.accept_seconds if self.accept_seconds else None


@dataclass
class Latency:
    """Acceptance to the sink's 250, over ``messages`` emails, in milliseconds."""

    name: str
    messages: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    note: str = ""


@dataclass
class ProcessStats:
    peak_rss_mib: float
    cpu_seconds: float
    cpu_seconds_per_1000: float
    # Thread name -> its CPU seconds per 1,000 msgs (where the process's CPU went).
    threads: dict[str, float] = field(default_factory=dict)
    # Spool operation -> commits (fsyncs) per 1,000 msgs, from the node's /metrics.
    commits: dict[str, float] = field(default_factory=dict)
    # Event-loop callback (the task it steps) -> CPU seconds per 1,000 msgs (--callback-cpu).
    callbacks: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """Every phase at one message size."""

    size: int
    rendered_bytes: int
    batch: int
    phases: list[Phase] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    processes: dict[str, ProcessStats] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # Variant -> end-to-end msgs/s of each of its runs (--telemetry).
    telemetry: dict[str, list[float]] = field(default_factory=dict)
    spans_exported: int = 0
    receiver_cpu_seconds: float = 0.0
    scrapes: int = 0

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)


@dataclass
class Report:
    args: dict[str, object]
    machine: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    load_after: str = ""


def node_specs(nodes: int, ips_per_node: int) -> list[NodeSpec]:
    return [
        NodeSpec(f"node{n + 1}", [f"127.0.0.{2 + n * ips_per_node + i}" for i in range(ips_per_node)])
        for n in range(nodes)
    ]


def pipeline_policy(args: argparse.Namespace) -> pipeline_pb2.PipelinePolicy:
    policy = pipeline_pb2.PipelinePolicy(max_connections=args.connections, batch_size=args.batch_size)
    if args.batch_timeout is not None:
        policy.batch_timeout.CopyFrom(proto_time.duration(args.batch_timeout))
    if not args.throttle:
        # Lift the default rate limit (1000 messages a minute per pipeline): we measure the pipeline.
        policy.allowed_messages = UNTHROTTLED
        policy.message_interval.CopyFrom(proto_time.duration(1.0))
    return policy


def call_batch(requested: int | None, rendered_bytes: int) -> int:
    """Emails per RouteEmails call: ``requested``, or as many as fit ``CALL_BYTES`` (1 to ``MAX_BATCH``)."""
    if requested is not None:
        return requested
    return max(1, min(MAX_BATCH, CALL_BYTES // max(1, rendered_bytes)))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# Phase 1


async def run_ceiling(args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key]) -> Phase:
    messages = rendered(es, ks)
    async with SmtpSink() as sink:
        start = time.perf_counter()
        result = await blast(messages, sink.address, args.connections, chunking=args.chunking)
        done = await sink.wait_for(len(messages), args.timeout)
    if result.failed:
        raise RuntimeError(f"SMTP ceiling: {result.failed} messages were not accepted by the sink")
    return Phase(
        CEILING,
        len(messages),
        done - start,
        note=f"SmtpSender{' with BDAT' if args.chunking else ''}, {args.connections} x {len(ks)} connections, one process",
    )


# Phase 2


def source_sessions(args: argparse.Namespace, key_count: int) -> int:
    return max(1, min(int(args.connections) * key_count, SOURCE_SESSIONS))


async def run_source(args: argparse.Namespace, count: int, size: int, key_count: int) -> Phase:
    sessions = source_sessions(args, key_count)
    async with SmtpSink() as sink:
        start = time.perf_counter()
        await _smtp_source(sink.address, count, size, sessions, args.timeout)
        done = await sink.wait_for(count, args.timeout)
    return Phase(
        SOURCE,
        count,
        done - start,
        note=f"Postfix's smtp-source -d -s {sessions} into smtp-sink (no PIPELINING)",
    )


# Phase 3


async def start_pipelines(
    mesh: Mesh, specs: Sequence[NodeSpec], ks: Sequence[Key], policy: pipeline_pb2.PipelinePolicy
) -> None:
    """Start every key's pipeline with ``policy`` on the node that owns its IP, and wait until the
    registry shows them passing (the router would start them with the default policy)."""
    owner = {ip: spec.id for spec in specs for ip in spec.egress_ips}
    channels = Channels()
    try:
        for k in ks:
            node = owner[k.source_ip]
            stub = node_pb2_grpc.NodeServiceStub(channels.get(mesh.address(node)))
            await stub.StartPipeline(
                node_pb2.StartPipelineRequest(domain=k.domain, source_ip=k.source_ip, policy=policy),
                timeout=RPC_TIMEOUT,
            )
    finally:
        await channels.close()
    await mesh.wait_passing(
        PIPELINE_SERVICE, {pipeline_service_id(owner[k.source_ip], k.routing_key) for k in ks}
    )


async def route(
    stub: router_pb2_grpc.RouterServiceStub, es: Sequence[email_pb2.Email], rpc_seconds: float
) -> int:
    """One RouteEmails call; the recipients accepted (a failed batch is an error)."""
    reply = await stub.RouteEmails(router_pb2.RouteEmailsRequest(emails=es), timeout=rpc_seconds)
    if reply.failed_batches:
        errors = {b.error for b in reply.batches if not b.ok}
        raise RuntimeError(f"RouteEmails: {reply.failed_batches} batches failed: {errors}")
    return int(reply.accepted_recipients)


async def submit(
    stub: router_pb2_grpc.RouterServiceStub,
    es: Sequence[email_pb2.Email],
    batch: int,
    in_flight: int,
    rpc_seconds: float,
    acked: list[float] | None = None,
) -> int:
    """RouteEmails for ``es``, ``batch`` a call, ``in_flight`` calls at a time; the recipients
    accepted. With ``acked``, ``acked[i]`` becomes the ``time.time()`` email ``i``'s call returned.
    Each request is built just before its call, so the emails are held once, not twice."""
    accepted = 0
    pending = iter(range(0, len(es), batch))

    async def worker() -> None:
        nonlocal accepted
        for first in pending:
            chunk = es[first : first + batch]
            n = await route(stub, chunk, rpc_seconds)
            accepted += n  # not `accepted += await ...`: that reads `accepted` before the await
            if acked is not None:
                acked[first : first + len(chunk)] = [time.time()] * len(chunk)

    async with asyncio.TaskGroup() as tg:
        for _ in range(in_flight):
            tg.create_task(worker())
    return accepted


def telemetry_env(variant: str, otlp: str) -> dict[str, str]:
    """The environment a mesh runs with for a ``--telemetry`` variant (``default``: as it ships)."""
    env: dict[str, str] = {}
    if variant in ("off", "tracing", "sampled"):
        env["EPOXI_METRICS_LISTEN"] = "off"
    if variant in ("tracing", "sampled", "all"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{otlp}"
    if variant == "sampled":
        env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": SAMPLED_RATIO}
    return env


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


async def scrape_every(mesh: Mesh, seconds: float, run: Run) -> None:
    """Scrape every service's /metrics every ``seconds``, as Prometheus would."""
    while True:
        await asyncio.sleep(seconds)
        for name in list(mesh.processes):
            url = mesh.metrics_url(name)
            if url:
                body = await asyncio.to_thread(_fetch, url)
                if not body.startswith(b"#"):
                    raise RuntimeError(f"{name}'s /metrics answered {body[:80]!r}")
                run.scrapes += 1


async def spool_commits(mesh: Mesh, node: str) -> dict[str, float]:
    """Spool commits so far by operation, from ``node``'s /metrics (none when it serves none)."""
    url = mesh.metrics_url(node)
    if not url:
        return {}
    text = (await asyncio.to_thread(_fetch, url)).decode()
    return {
        sample.labels["operation"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "epoxi_node_spool_commit_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }


def _mesh(
    args: argparse.Namespace, work: Path, specs: list[NodeSpec], sink: str, variant: str, otlp: str
) -> Mesh:
    shutil.rmtree(work / "mesh", ignore_errors=True)
    env = telemetry_env(variant, otlp)
    if args.callback_cpu:
        env |= callback_cpu.env(work / "callback-cpu")
    return Mesh(
        data_dir=work / "mesh",
        nodes=specs,
        route=f"*={sink}",
        check_interval=args.check_interval,
        env=env,
    )


async def run_epoxi(
    args: argparse.Namespace,
    es: Sequence[email_pb2.Email],
    ks: Sequence[Key],
    work: Path,
    run: Run,
    variant: str = "default",
    otlp: str = "",
) -> Phase:
    specs = node_specs(args.nodes, args.ips_per_node)
    async with SmtpSink() as sink:
        mesh = _mesh(args, work, specs, sink.address, variant, otlp)
        await mesh.start()
        spies: list[PySpy] = []
        scraper: asyncio.Task[None] | None = None
        try:
            await start_pipelines(mesh, specs, ks, pipeline_policy(args))
            if args.profile is not None:
                out_dir = args.profile / str(run.size) if len(args.sizes) > 1 else args.profile
                out_dir.mkdir(parents=True, exist_ok=True)
                for name in ("router", *(s.id for s in specs)):
                    out = out_dir / f"{name}.raw"
                    spies.append(await PySpy(mesh.processes[name].proc.pid, out, args.profile_rate).start())
            pids = {name: p.proc.pid for name, p in mesh.processes.items()}
            cpu_before = {name: _utils.cpu_seconds(pid) for name, pid in pids.items()}
            threads_before = {name: _utils.thread_cpu_seconds(pid) for name, pid in pids.items()}
            commits_before = {s.id: await spool_commits(mesh, s.id) for s in specs}
            probed = {n: pids[n] for n in ("router", *(s.id for s in specs))} if args.callback_cpu else {}
            callbacks_before = await callback_cpu.snapshot(work / "callback-cpu", probed)
            if variant in ("metrics", "all"):
                scraper = asyncio.create_task(scrape_every(mesh, args.scrape_interval, run))
            async with channel(mesh.address("router")) as ch:
                stub = router_pb2_grpc.RouterServiceStub(ch)
                start = time.perf_counter()
                accepted = await submit(stub, es, run.batch, args.in_flight, args.timeout)
                acked = time.perf_counter()
                done = await sink.wait_for(len(es), args.timeout)
            per_1000 = 1000 / len(es)
            callbacks = callback_cpu.spent(
                callbacks_before, await callback_cpu.snapshot(work / "callback-cpu", probed)
            )
            for name, pid in pids.items():
                cpu = _utils.cpu_seconds(pid) - cpu_before[name]
                threads = _utils.thread_cpu_seconds(pid)
                commits = await spool_commits(mesh, name) if name in commits_before else {}
                run.processes[name] = ProcessStats(
                    _utils.status_kib(pid, "VmHWM") / 1024,
                    cpu,
                    cpu * per_1000,
                    {t: (c - threads_before[name].get(t, 0.0)) * per_1000 for t, c in threads.items()},
                    {op: (n - commits_before[name].get(op, 0.0)) * per_1000 for op, n in commits.items()},
                    {c: seconds * per_1000 for c, seconds in callbacks.get(name, {}).items()},
                )
        finally:
            if scraper is not None:
                scraper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scraper
            for spy in spies:
                await spy.stop()
            await mesh.stop()
    if accepted != len(es):
        raise RuntimeError(f"Epoxi accepted {accepted} of {len(es)} recipients")
    return Phase(
        EPOXI if variant == "default" else f"Epoxi, telemetry {variant}",
        len(es),
        done - start,
        acked - start,
        note=_epoxi_note(args, run.batch),
    )


def _epoxi_note(args: argparse.Namespace, batch: int) -> str:
    policy = "rate limit lifted" if not args.throttle else "default rate limit"
    return f"{args.nodes} nodes, RouteEmails x{batch}, {args.in_flight} in flight, {policy}"


async def run_telemetry(
    args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key], work: Path, run: Run
) -> None:
    """Phase 3 for each ``--telemetry`` variant, ``--repeat`` rounds, the variants taking turns."""
    receiver: Process | None = None
    if any(v in ("tracing", "sampled", "all") for v in args.telemetry):
        receiver = await spawn("otlp", ["devmesh.otlp", "--listen", "127.0.0.1:0", "--count-only"])
    try:
        for round_ in range(args.repeat):
            for variant in args.telemetry:
                phase = await run_epoxi(
                    args, es, ks, work, run, variant, receiver.address if receiver else ""
                )
                run.phases.append(phase)
                run.telemetry.setdefault(variant, []).append(phase.rate)
                print(f"  round {round_ + 1}, {variant}: {phase.rate:,.0f} msgs/s", flush=True)
    finally:
        if receiver is not None:
            run.receiver_cpu_seconds = _utils.cpu_seconds(receiver.pid)
            await receiver.stop()
            counted = [line for line in receiver.lines if line.startswith("otlp received ")]
            if counted:
                run.spans_exported = int(counted[-1].split()[2])


# Phase 4


async def run_postfix(
    args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key], work: Path, size: int
) -> Phase:
    concurrency = args.connections * len(ks)
    async with SmtpSink() as sink, PostfixRelay(work / "postfix", sink.address, concurrency) as pf:
        start = time.perf_counter()
        if args.postfix_feeder == "smtp-source":
            await _smtp_source(pf.address, len(es), size, args.feed_sessions, args.timeout)
            how = f"smtp-source, {args.feed_sessions} sessions"
        else:
            messages = rendered(es, ks)
            per_key = max(1, args.feed_sessions // len(ks))
            result = await blast(messages, pf.address, per_key, bind_source=False)
            if result.failed:
                raise RuntimeError(f"Postfix refused {result.failed} messages")
            how = f"aiosmtplib, {per_key * len(ks)} sessions"
        acked = time.perf_counter()
        done = await sink.wait_for(len(es), args.timeout)
    return Phase(
        POSTFIX,
        len(es),
        done - start,
        acked - start,
        note=f"{how}; destination concurrency {concurrency}",
    )


async def _smtp_source(target: str, count: int, size: int, sessions: int, seconds: float) -> None:
    # -l is the body length; smtp-source adds ~150 bytes of headers.
    args = ["-d", "-s", str(sessions), "-m", str(count), "-l", str(max(1, size - 150))]
    args += ["-f", address.addr_spec(SENDER), "-t", "user@d0.bench.test", "-N", "-M", "feeder.bench.test"]
    proc = await asyncio.create_subprocess_exec(
        "smtp-source", *args, target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(seconds):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited with {proc.returncode}: {out.decode(errors='replace')}")


# Phase 5


async def paced(
    stub: router_pb2_grpc.RouterServiceStub, es: Sequence[email_pb2.Email], rate: float, rpc_seconds: float
) -> list[float]:
    """One RouteEmails call per email, started ``rate`` a second whatever the earlier ones are
    doing; the ``time.time()`` each call returned."""
    acked = [0.0] * len(es)

    async def one(i: int) -> None:
        await route(stub, es[i : i + 1], rpc_seconds)
        acked[i] = time.time()

    start = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for i in range(len(es)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tg.create_task(one(i))
    return acked


def latencies(name: str, track: str, acked: Sequence[float], sink: LatencySink, note: str) -> Latency:
    """Each tracked email's sink 250 minus its acknowledgement, summarized."""
    ms: list[float] = []
    for i, at in enumerate(acked):
        replied = sink.replied.get(track_id(track, i))
        if replied is None:
            raise RuntimeError(f"latency: the sink never saw {track_id(track, i)}")
        ms.append((replied - at) * 1000)
    return Latency(name, len(ms), percentile(ms, 0.5), percentile(ms, 0.99), max(ms), note)


async def run_latency(args: argparse.Namespace, ks: Sequence[Key], work: Path, run: Run) -> None:
    """Low rate, then full load, through one fresh mesh into the latency sink (see the module's doc)."""
    specs = node_specs(args.nodes, args.ips_per_node)
    low = emails(args.latency_messages, ks, run.size, track="low")
    load = emails(min(args.latency_load, args.messages), ks, run.size, track="load")
    load_acked = [0.0] * len(load)
    async with LatencySink() as sink:
        mesh = _mesh(args, work, specs, sink.address, "default", "")
        await mesh.start()
        try:
            await start_pipelines(mesh, specs, ks, pipeline_policy(args))
            async with channel(mesh.address("router")) as ch:
                stub = router_pb2_grpc.RouterServiceStub(ch)
                low_acked = await paced(stub, low, args.latency_rate, args.timeout)
                await sink.wait_for(len(low), args.timeout)
                start = time.perf_counter()
                await submit(stub, load, run.batch, args.in_flight, args.timeout, load_acked)
                acked = time.perf_counter()
                done = await sink.wait_for(len(low) + len(load), args.timeout)
        finally:
            await mesh.stop()
    timeout = "default" if args.batch_timeout is None else f"{args.batch_timeout:g} s"
    run.latency.append(
        latencies(
            f"low rate, {args.latency_rate:g} msgs/s",
            "low",
            low_acked,
            sink,
            f"one email per call, idle pipelines, batch_timeout {timeout}",
        )
    )
    run.latency.append(latencies("full load", "load", load_acked, sink, _epoxi_note(args, run.batch)))
    run.phases.append(
        Phase(
            LATENCY_LOAD, len(load), done - start, acked - start, note="full load; the Python sink times each"
        )
    )


# Report


def _ratio(a: Phase | None, b: Phase | None) -> float | None:
    return a.rate / b.rate if a and b else None


def render_run(r: Run) -> list[str]:
    lines = [f"== {r.size:,} bytes a message ({r.rendered_bytes:,} rendered), RouteEmails x{r.batch} =="]
    rows = [["path", "msgs/s", "seconds", "accepted msgs/s", "notes"]]
    for p in r.phases:
        acc = f"{p.accept_rate:,.0f}" if p.accept_rate else "-"
        rows.append([p.name, f"{p.rate:,.0f}", f"{p.seconds:.1f}", acc, p.note])
    if len(rows) > 1:
        lines += ["", _utils.table(rows), ""]
    epoxi, postfix = r.phase(EPOXI), r.phase(POSTFIX)
    for label, base, target in (
        ("Epoxi / smtp-source direct", r.phase(SOURCE), "   (issue #11 target: >= 0.5)"),
        ("Epoxi / Postfix", postfix, "   (issue #11 target: >= 8)"),
        ("Epoxi / SMTP ceiling", r.phase(CEILING), ""),
    ):
        ratio = _ratio(epoxi, base)
        if ratio is not None:
            lines.append(f"{label + ':':28} {ratio:.2f}{target}")
    if epoxi and postfix and epoxi.accept_rate and postfix.accept_rate:
        lines.append(f"{'Acceptance, Epoxi / Postfix:':28} {epoxi.accept_rate / postfix.accept_rate:.2f}")
    if r.latency:
        rows = [["acceptance to the sink's 250", "emails", "p50 ms", "p99 ms", "max ms", "notes"]]
        for x in r.latency:
            rows.append(
                [
                    x.name,
                    f"{x.messages:,}",
                    f"{x.p50_ms:,.1f}",
                    f"{x.p99_ms:,.1f}",
                    f"{x.max_ms:,.1f}",
                    x.note,
                ]
            )
        lines += ["", _utils.table(rows), "target (issue #11): p99 < 100 ms at the low rate"]
    if r.telemetry:
        off = statistics.median(r.telemetry["off"]) if r.telemetry.get("off") else None
        rows = [["telemetry", "median msgs/s", "runs", "/ off"]]
        for variant, rates in r.telemetry.items():
            median = statistics.median(rates)
            share = f"{median / off:.3f}" if off else "-"
            rows.append([variant, f"{median:,.0f}", " ".join(f"{x:,.0f}" for x in rates), share])
        lines += ["", _utils.table(rows), ""]
        lines.append(
            f"spans exported to the OTLP receiver: {r.spans_exported:,} (its CPU: "
            f"{r.receiver_cpu_seconds:.1f} s); scrapes: {r.scrapes:,}"
        )
        lines.append("targets (issue #10): tracing >= 0.90 of off, metrics >= 0.97 of off")
        lines.append(f"sampled: OTEL_TRACES_SAMPLER=parentbased_traceidratio, ratio {SAMPLED_RATIO}")
    for s in r.skipped:
        lines.append(f"skipped: {s}")
    if r.processes:
        rows = [["mesh process (Epoxi phase)", "peak RSS MiB", "CPU s", "CPU s / 1,000 msgs"]]
        rows += [
            [n, f"{s.peak_rss_mib:.1f}", f"{s.cpu_seconds:.2f}", f"{s.cpu_seconds_per_1000:.3f}"]
            for n, s in r.processes.items()
        ]
        lines += ["", _utils.table(rows)]
        for name, stats in r.processes.items():
            busy = sorted(((c, t) for t, c in stats.threads.items() if c >= 0.001), reverse=True)
            if len(busy) > 1:
                by_thread = ", ".join(f"{t} {c:.3f}" for c, t in busy)
                lines.append(f"  {name} CPU s / 1,000 msgs by thread: {by_thread}")
            if stats.commits:
                total = sum(stats.commits.values())
                parts = ", ".join(f"{op} {c:.1f}" for op, c in sorted(stats.commits.items()) if c)
                lines.append(f"  {name} spool commits / 1,000 msgs: {total:.1f} ({parts})")
            if stats.callbacks:
                top = sorted(((c, n) for n, c in stats.callbacks.items() if c >= 0.0005), reverse=True)
                total = sum(stats.callbacks.values())
                parts = ", ".join(f"{n} {c:.3f}" for c, n in top[:CALLBACKS_SHOWN])
                lines.append(f"  {name} event loop CPU s / 1,000 msgs: {total:.3f} ({parts})")
    return lines


def render_summary(runs: Sequence[Run]) -> list[str]:
    """One line per size, when there are several."""
    rows = [["size", "Epoxi msgs/s", "/ smtp-source", "/ Postfix", "/ ceiling", "low p99 ms", "load p99 ms"]]
    for r in runs:
        epoxi = r.phase(EPOXI)
        ratios = [_ratio(epoxi, r.phase(name)) for name in (SOURCE, POSTFIX, CEILING)]
        p99 = {x.name.partition(",")[0]: x.p99_ms for x in r.latency}
        rows.append(
            [
                f"{r.size:,}",
                f"{epoxi.rate:,.0f}" if epoxi else "-",
                *(f"{x:.2f}" if x is not None else "-" for x in ratios),
                *(f"{p99[k]:,.1f}" if k in p99 else "-" for k in ("low rate", "full load")),
            ]
        )
    return ["", _utils.table(rows)]


def render_report(r: Report) -> str:
    lines = [
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in r.machine.items()) + f"; load after {r.load_after}",
    ]
    for run_ in r.runs:
        lines += ["", *render_run(run_)]
    if len(r.runs) > 1:
        lines += render_summary(r.runs)
    return "\n".join(lines) + "\n"


def _code_dir() -> str:
    """The tree the services are imported from (a snapshot, or the working tree)."""
    return str(Path(rendering.__file__).resolve().parent.parent)


def _work_dir(parent: str | None) -> Path:
    work = Path(tempfile.mkdtemp(prefix="epoxi-bench-", dir=parent))
    work.chmod(0o755)  # Postfix's daemons run as user postfix and need to reach their queue
    return work


async def run_size(args: argparse.Namespace, size: int, ks: Sequence[Key], work: Path) -> Run:
    es = emails(args.messages, ks, size)
    rendered_bytes = len(rendering.render(es[0]))
    r = Run(size, rendered_bytes, call_batch(args.batch, rendered_bytes))
    print(f"{args.messages} emails of {rendered_bytes} bytes over {len(ks)} routing keys", flush=True)
    for name in (p for p in PHASES if p not in args.skip):
        print(f"running {name} ...", flush=True)
        if name == "ceiling":
            r.phases.append(await run_ceiling(args, es, ks))
        elif name == "source" and not shutil.which("smtp-source"):
            r.skipped.append("smtp-source direct: needs Postfix's smtp-source")
        elif name == "source":
            r.phases.append(await run_source(args, len(es), size, len(ks)))
        elif name == "epoxi" and args.telemetry:
            await run_telemetry(args, es, ks, work, r)
        elif name == "epoxi":
            r.phases.append(await run_epoxi(args, es, ks, work, r))
        elif name == "postfix" and (not SmtpSink.available() or not PostfixRelay.available()):
            r.skipped.append("Postfix relay: needs postfix installed and root")
        elif name == "postfix":
            r.phases.append(await run_postfix(args, es, ks, work, size))
        elif name == "latency":
            await run_latency(args, ks, work, r)
            print(
                "  "
                + "; ".join(f"{x.name}: p50 {x.p50_ms:,.1f} ms, p99 {x.p99_ms:,.1f} ms" for x in r.latency)
            )
        if name != "latency" and r.phases:
            print(f"  {r.phases[-1].rate:,.0f} msgs/s", flush=True)
    return r


async def run(args: argparse.Namespace) -> Report:
    report = Report({k: str(v) for k, v in vars(args).items()}, _utils.machine())
    report.machine["code under test"] = _code_dir()
    ks = keys(args.keys, [ip for s in node_specs(args.nodes, args.ips_per_node) for ip in s.egress_ips])
    work = _work_dir(args.work_dir)
    try:
        for size in args.sizes:
            report.runs.append(await run_size(args, size, ks, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return report


def _variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in TELEMETRY_VARIANTS]
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"telemetry variants are among {', '.join(TELEMETRY_VARIANTS)}")
    return variants


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are positive byte counts, comma-separated: {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.e2e_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="emails, one recipient each")
    p.add_argument("--keys", type=int, default=20, help="routing keys (domains x egress IPs)")
    p.add_argument("--size", type=int, default=2048, help="rendered message size in bytes")
    p.add_argument(
        "--sizes",
        type=_sizes,
        metavar="SIZES",
        help="run every phase at each size, e.g. 2048,102400 (over --size)",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ips-per-node", type=int, default=2, help="egress IPs 127.0.0.2, .3, ... per node")
    p.add_argument(
        "--chunking",
        action="store_true",
        help="the ceiling phase sends with BDAT (RFC 3030) where the sink offers CHUNKING",
    )
    p.add_argument(
        "--connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help="max_connections per pipeline"
    )
    p.add_argument("--batch-size", type=int, default=100, help="pipeline policy batch_size")
    p.add_argument("--batch-timeout", type=float, help="pipeline policy batch_timeout in seconds (default 5)")
    p.add_argument("--throttle", action="store_true", help="keep the default rate limit (1000/min per key)")
    p.add_argument(
        "--batch",
        type=int,
        help=f"emails per RouteEmails call (default: {MAX_BATCH}, fewer when {MAX_BATCH} would pass "
        f"{CALL_BYTES >> 20} MiB)",
    )
    p.add_argument("--in-flight", type=int, default=4, help="RouteEmails calls in flight")
    p.add_argument("--check-interval", default="5s", help="registry check interval of the mesh")
    p.add_argument("--postfix-feeder", choices=["smtp-source", "aiosmtplib"], default="smtp-source")
    p.add_argument("--feed-sessions", type=int, default=50, help="SMTP sessions feeding Postfix")
    p.add_argument("--skip", action="append", default=[], choices=PHASES)
    p.add_argument(
        "--latency-rate", type=float, default=10.0, help="emails a second in the low-rate latency run"
    )
    p.add_argument("--latency-messages", type=int, default=200, help="emails in the low-rate latency run")
    p.add_argument(
        "--latency-load",
        type=int,
        default=5000,
        help="emails in the full-load latency run (at most --messages)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a phase after this many seconds")
    p.add_argument("--profile", type=Path, help="py-spy the router and nodes during the Epoxi phase into DIR")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument(
        "--callback-cpu",
        action="store_true",
        help="report the CPU of each kind of event-loop callback in the router and nodes (phase 3)",
    )
    p.add_argument("--work-dir", help="where spools and the Postfix instance go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--telemetry",
        type=_variants,
        default=[],
        metavar="VARIANTS",
        help=f"run the Epoxi phase once per variant, comma-separated: {', '.join(TELEMETRY_VARIANTS)}",
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of the --telemetry variants")
    p.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between scrapes (--telemetry)")
    args = p.parse_args(argv)
    for flag in ("messages", "keys", "size", "nodes", "ips_per_node", "connections", "batch_size", "batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    for flag in ("in_flight", "feed_sessions", "latency_messages", "latency_load", "repeat"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    for flag in ("latency_rate", "timeout", "scrape_interval"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be above 0, not {getattr(args, flag)}")
    if args.sizes is None:
        args.sizes = [args.size]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reaper = _utils.become_subreaper()
    try:
        report = asyncio.run(run(args))
    finally:
        if reaper:
            _utils.reap_orphans()
    print(render_report(report), end="")
    if args.profile is not None:
        for raw in sorted(args.profile.rglob("*.raw")):
            print(summarize(raw))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
