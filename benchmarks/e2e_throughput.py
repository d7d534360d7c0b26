"""End-to-end throughput: Epoxi against the SMTP path alone and against a Postfix relay.

    .venv/bin/python -m benchmarks.e2e_throughput                       # 20,000 x 2 KB, a few minutes
    .venv/bin/python -m benchmarks.e2e_throughput --messages 50000 --keys 20 --size 2048
    .venv/bin/python -m benchmarks.e2e_throughput --profile var/bench/profile
    .venv/bin/python -m benchmarks.e2e_throughput --telemetry off,metrics,tracing --repeat 3 --skip postfix

Three phases, each into a fresh Postfix ``smtp-sink`` on a free loopback port, each timed from
the first submit until the sink has received all N messages:

1. SMTP ceiling: the node's own client code (``SmtpSender``: aiosmtplib, bound to the key's
   source IP, connections reused) sends the same rendered messages straight to the sink over
   ``connections x keys`` connections, from one process.
2. Epoxi: ``devmesh.supervisor.Mesh`` (dev registry, nodes, router, monitor, gateway, each a process)
   with a route override to the sink; the emails go through ``RouterService.RouteEmails`` in
   batches, a few calls in flight; spool fsync on (the default). Also timed: acceptance (until
   RouteEmails acknowledged all N).
3. Postfix: a throwaway instance relaying to the sink (``benchmarks.postfix``), fed by
   ``smtp-source`` (or the aiosmtplib client), when Postfix is installed and we are root.

With ``--telemetry``, phase 2 runs once per variant (``--repeat`` times, the variants taking
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
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import duration_pb2

from benchmarks import _utils
from benchmarks.postfix import PostfixRelay
from benchmarks.profiling import PySpy, summarize
from benchmarks.smtpsink import SmtpSink
from benchmarks.workload import SENDER, Key, blast, emails, keys, rendered
from devmesh.supervisor import Mesh, NodeSpec, Process, spawn
from epoxi import address, rendering
from epoxi.policy import DEFAULT_MAX_CONNECTIONS
from epoxi.registry.services import PIPELINE_SERVICE, pipeline_service_id
from epoxi.runtime.channels import RPC_TIMEOUT, Channels, channel
from epoxi.v1 import email_pb2, node_pb2, node_pb2_grpc, pipeline_pb2, router_pb2, router_pb2_grpc

UNTHROTTLED = 1_000_000  # allowed_messages per second when --throttle is not given
TELEMETRY_VARIANTS = ("off", "metrics", "tracing", "sampled", "all")
SAMPLED_RATIO = "0.1"


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
class ProcessStats:
    peak_rss_mib: float
    cpu_seconds: float


@dataclass
class Report:
    args: dict[str, object]
    machine: dict[str, str]
    phases: list[Phase] = field(default_factory=list)
    processes: dict[str, ProcessStats] = field(default_factory=dict)
    load_after: str = ""
    skipped: list[str] = field(default_factory=list)
    # Variant -> end-to-end msgs/s of each of its runs (--telemetry).
    telemetry: dict[str, list[float]] = field(default_factory=dict)
    spans_exported: int = 0
    receiver_cpu_seconds: float = 0.0
    scrapes: int = 0

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)


def node_specs(nodes: int, ips_per_node: int) -> list[NodeSpec]:
    return [
        NodeSpec(f"node{n + 1}", [f"127.0.0.{2 + n * ips_per_node + i}" for i in range(ips_per_node)])
        for n in range(nodes)
    ]


def pipeline_policy(args: argparse.Namespace) -> pipeline_pb2.PipelinePolicy:
    policy = pipeline_pb2.PipelinePolicy(max_connections=args.connections, batch_size=args.batch_size)
    if args.batch_timeout is not None:
        policy.batch_timeout.CopyFrom(_duration(args.batch_timeout))
    if not args.throttle:
        # Lift the default rate limit (1000 messages a minute per pipeline): we measure the pipeline.
        policy.allowed_messages = UNTHROTTLED
        policy.message_interval.CopyFrom(_duration(1.0))
    return policy


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


# Phase 1


async def run_ceiling(args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key]) -> Phase:
    messages = rendered(es, ks)
    async with SmtpSink() as sink:
        start = time.perf_counter()
        result = await blast(messages, sink.address, args.connections)
        done = await sink.wait_for(len(messages), args.timeout)
    if result.failed:
        raise RuntimeError(f"SMTP ceiling: {result.failed} messages were not accepted by the sink")
    return Phase(
        "SMTP ceiling",
        len(messages),
        done - start,
        note=f"SmtpSender, {args.connections} x {len(ks)} connections, one process",
    )


# Phase 2


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


async def submit(
    router: str, requests: Sequence[router_pb2.RouteEmailsRequest], in_flight: int, rpc_seconds: float
) -> int:
    """RouteEmails for every request, ``in_flight`` calls at a time; the recipients accepted."""
    accepted = 0
    pending = iter(requests)
    async with channel(router) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)

        async def worker() -> None:
            nonlocal accepted
            for request in pending:
                reply = await stub.RouteEmails(request, timeout=rpc_seconds)
                if reply.failed_batches:
                    errors = {b.error for b in reply.batches if not b.ok}
                    raise RuntimeError(f"RouteEmails: {reply.failed_batches} batches failed: {errors}")
                accepted += reply.accepted_recipients

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


async def scrape_every(mesh: Mesh, seconds: float, report: Report) -> None:
    """Scrape every service's /metrics every ``seconds``, as Prometheus would."""
    while True:
        await asyncio.sleep(seconds)
        for name in list(mesh.processes):
            url = mesh.metrics_url(name)
            if url:
                body = await asyncio.to_thread(_fetch, url)
                if not body.startswith(b"#"):
                    raise RuntimeError(f"{name}'s /metrics answered {body[:80]!r}")
                report.scrapes += 1


async def run_epoxi(
    args: argparse.Namespace,
    es: Sequence[email_pb2.Email],
    ks: Sequence[Key],
    work: Path,
    report: Report,
    variant: str = "default",
    otlp: str = "",
) -> Phase:
    specs = node_specs(args.nodes, args.ips_per_node)
    requests = [
        router_pb2.RouteEmailsRequest(emails=es[i : i + args.batch]) for i in range(0, len(es), args.batch)
    ]
    shutil.rmtree(work / "mesh", ignore_errors=True)
    async with SmtpSink() as sink:
        mesh = Mesh(
            data_dir=work / "mesh",
            nodes=specs,
            route=f"*={sink.address}",
            check_interval=args.check_interval,
            env=telemetry_env(variant, otlp),
        )
        await mesh.start()
        spies: list[PySpy] = []
        scraper: asyncio.Task[None] | None = None
        try:
            await start_pipelines(mesh, specs, ks, pipeline_policy(args))
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                for name in ("router", *(s.id for s in specs)):
                    out = args.profile / f"{name}.raw"
                    spies.append(await PySpy(mesh.processes[name].proc.pid, out, args.profile_rate).start())
            pids = {name: p.proc.pid for name, p in mesh.processes.items()}
            cpu_before = {name: _utils.cpu_seconds(pid) for name, pid in pids.items()}
            if variant in ("metrics", "all"):
                scraper = asyncio.create_task(scrape_every(mesh, args.scrape_interval, report))
            start = time.perf_counter()
            accepted = await submit(mesh.address("router"), requests, args.in_flight, args.timeout)
            acked = time.perf_counter()
            done = await sink.wait_for(len(es), args.timeout)
            for name, pid in pids.items():
                report.processes[name] = ProcessStats(
                    _utils.status_kib(pid, "VmHWM") / 1024, _utils.cpu_seconds(pid) - cpu_before[name]
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
    policy = "rate limit lifted" if not args.throttle else "default rate limit"
    return Phase(
        "Epoxi end to end" if variant == "default" else f"Epoxi, telemetry {variant}",
        len(es),
        done - start,
        acked - start,
        note=f"{args.nodes} nodes, RouteEmails x{args.batch}, {args.in_flight} in flight, {policy}",
    )


async def run_telemetry(
    args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key], work: Path, report: Report
) -> None:
    """Phase 2 for each ``--telemetry`` variant, ``--repeat`` rounds, the variants taking turns."""
    receiver: Process | None = None
    if any(v in ("tracing", "sampled", "all") for v in args.telemetry):
        receiver = await spawn("otlp", ["devmesh.otlp", "--listen", "127.0.0.1:0", "--count-only"])
    try:
        for round_ in range(args.repeat):
            for variant in args.telemetry:
                phase = await run_epoxi(
                    args, es, ks, work, report, variant, receiver.address if receiver else ""
                )
                report.phases.append(phase)
                report.telemetry.setdefault(variant, []).append(phase.rate)
                print(f"  round {round_ + 1}, {variant}: {phase.rate:,.0f} msgs/s", flush=True)
    finally:
        if receiver is not None:
            report.receiver_cpu_seconds = _utils.cpu_seconds(receiver.pid)
            await receiver.stop()
            counted = [line for line in receiver.lines if line.startswith("otlp received ")]
            if counted:
                report.spans_exported = int(counted[-1].split()[2])


# Phase 3


async def run_postfix(
    args: argparse.Namespace, es: Sequence[email_pb2.Email], ks: Sequence[Key], work: Path
) -> Phase:
    concurrency = args.connections * len(ks)
    async with SmtpSink() as sink, PostfixRelay(work / "postfix", sink.address, concurrency) as pf:
        start = time.perf_counter()
        if args.postfix_feeder == "smtp-source":
            await _smtp_source(pf.address, len(es), args.size, args.feed_sessions)
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
        "Postfix relay",
        len(es),
        done - start,
        acked - start,
        note=f"{how}; destination concurrency {concurrency}",
    )


async def _smtp_source(target: str, count: int, size: int, sessions: int) -> None:
    # -l is the body length; smtp-source adds ~150 bytes of headers.
    args = ["-d", "-s", str(sessions), "-m", str(count), "-l", str(max(1, size - 150))]
    args += ["-f", address.addr_spec(SENDER), "-t", "user@d0.bench.test", "-N", "-M", "feeder.bench.test"]
    proc = await asyncio.create_subprocess_exec(
        "smtp-source", *args, target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited with {proc.returncode}: {out.decode(errors='replace')}")


# Report


def render_report(r: Report) -> str:
    lines = [
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in r.machine.items()) + f"; load after {r.load_after}",
    ]
    rows = [["path", "msgs/s", "seconds", "accepted msgs/s", "notes"]]
    for p in r.phases:
        acc = f"{p.accept_rate:,.0f}" if p.accept_rate else "-"
        rows.append([p.name, f"{p.rate:,.0f}", f"{p.seconds:.1f}", acc, p.note])
    lines += ["", _utils.table(rows), ""]
    epoxi, ceiling, postfix = r.phase("Epoxi end to end"), r.phase("SMTP ceiling"), r.phase("Postfix relay")
    if epoxi and ceiling:
        lines.append(f"Epoxi / SMTP ceiling: {epoxi.rate / ceiling.rate:.2f}")
    if epoxi and postfix:
        lines.append(f"Epoxi / Postfix:      {epoxi.rate / postfix.rate:.2f}   (issue #3 target: >= 3)")
        if epoxi.accept_rate and postfix.accept_rate:
            lines.append(f"Acceptance, Epoxi / Postfix: {epoxi.accept_rate / postfix.accept_rate:.2f}")
    if r.telemetry:
        off = statistics.median(r.telemetry["off"]) if r.telemetry.get("off") else None
        rows = [["telemetry", "median msgs/s", "runs", "/ off"]]
        for variant, rates in r.telemetry.items():
            median = statistics.median(rates)
            ratio = f"{median / off:.3f}" if off else "-"
            rows.append([variant, f"{median:,.0f}", " ".join(f"{x:,.0f}" for x in rates), ratio])
        lines += [_utils.table(rows), ""]
        lines.append(
            f"spans exported to the OTLP receiver: {r.spans_exported:,} (its CPU: "
            f"{r.receiver_cpu_seconds:.1f} s); scrapes: {r.scrapes:,}"
        )
        lines.append("targets (issue #10): tracing >= 0.90 of off, metrics >= 0.97 of off")
        lines.append(f"sampled: OTEL_TRACES_SAMPLER=parentbased_traceidratio, ratio {SAMPLED_RATIO}")
    for s in r.skipped:
        lines.append(f"skipped: {s}")
    if r.processes:
        rows = [["mesh process", "peak RSS MiB", "CPU s during run"]]
        rows += [[n, f"{s.peak_rss_mib:.1f}", f"{s.cpu_seconds:.1f}"] for n, s in r.processes.items()]
        lines += ["", _utils.table(rows)]
    return "\n".join(lines) + "\n"


def _code_dir() -> str:
    """The tree the services are imported from (a snapshot, or the working tree)."""
    return str(Path(rendering.__file__).resolve().parent.parent)


def _work_dir(parent: str | None) -> Path:
    work = Path(tempfile.mkdtemp(prefix="epoxi-bench-", dir=parent))
    work.chmod(0o755)  # Postfix's daemons run as user postfix and need to reach their queue
    return work


async def run(args: argparse.Namespace) -> Report:
    report = Report({k: str(v) for k, v in vars(args).items()}, _utils.machine())
    report.machine["code under test"] = _code_dir()
    ks = keys(args.keys, [ip for s in node_specs(args.nodes, args.ips_per_node) for ip in s.egress_ips])
    es = emails(args.messages, ks, args.size)
    print(
        f"{args.messages} emails of {len(rendering.render(es[0]))} bytes over {len(ks)} routing keys",
        flush=True,
    )
    work = _work_dir(args.work_dir)
    try:
        phases = [p for p in ("ceiling", "epoxi", "postfix") if p not in args.skip]
        for name in phases:
            print(f"running {name} ...", flush=True)
            if name == "ceiling":
                report.phases.append(await run_ceiling(args, es, ks))
            elif name == "epoxi" and args.telemetry:
                await run_telemetry(args, es, ks, work, report)
            elif name == "epoxi":
                report.phases.append(await run_epoxi(args, es, ks, work, report))
            elif not SmtpSink.available() or not PostfixRelay.available():
                report.skipped.append("Postfix relay: needs postfix installed and root")
            else:
                report.phases.append(await run_postfix(args, es, ks, work))
            print(f"  {report.phases[-1].rate:,.0f} msgs/s" if report.phases else "", flush=True)
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.e2e_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="emails, one recipient each")
    p.add_argument("--keys", type=int, default=20, help="routing keys (domains x egress IPs)")
    p.add_argument("--size", type=int, default=2048, help="rendered message size in bytes")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ips-per-node", type=int, default=2, help="egress IPs 127.0.0.2, .3, ... per node")
    p.add_argument(
        "--connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help="max_connections per pipeline"
    )
    p.add_argument("--batch-size", type=int, default=100, help="pipeline policy batch_size")
    p.add_argument("--batch-timeout", type=float, help="pipeline policy batch_timeout in seconds (default 5)")
    p.add_argument("--throttle", action="store_true", help="keep the default rate limit (1000/min per key)")
    p.add_argument("--batch", type=int, default=500, help="emails per RouteEmails call")
    p.add_argument("--in-flight", type=int, default=4, help="RouteEmails calls in flight")
    p.add_argument("--check-interval", default="5s", help="registry check interval of the mesh")
    p.add_argument("--postfix-feeder", choices=["smtp-source", "aiosmtplib"], default="smtp-source")
    p.add_argument("--feed-sessions", type=int, default=50, help="SMTP sessions feeding Postfix")
    p.add_argument("--skip", action="append", default=[], choices=["ceiling", "epoxi", "postfix"])
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a phase after this many seconds")
    p.add_argument("--profile", type=Path, help="py-spy the router and nodes during the Epoxi phase into DIR")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
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
    return p.parse_args(argv)


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
        for raw in sorted(args.profile.glob("*.raw")):
            print(summarize(raw))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
