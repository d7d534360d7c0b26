"""What the router's view of the cluster costs: nodes watched, owners cached, against the old
watch of every pipeline.

    .venv/bin/python -m benchmarks.router_view                    # 10,000 keys, 3 nodes, about 4 minutes
    .venv/bin/python -m benchmarks.router_view --keys 2000 --json var/router_view.json
    .venv/bin/python -m benchmarks.router_view --only decision   # (a) alone

In-process: the development registry (``devmesh.registry.app.serve``) runs on its own thread and
event loop, so the router side's CPU is the main thread's (``time.thread_time``). The registry
gets ``--nodes`` node services (passing TTL checks; the meta a node registers), ``--keys``
placement records (``epoxi/placement/<key>``, each held by its node's session, as
``epoxi.registry.ownership`` takes them) and, for the baseline, the same keys as passing
``epoxi-pipeline`` services with the meta a node registers.

(a) **Routing decision per email**: ``epoxi.validation.validate``, ``batching.plan`` and the
    owner lookup from a warm cache (``Owners.cached``), over requests of 500 emails to 100 keys
    each, with the router knowing 100 keys and then 10,000 (best of ``--rounds``). Printed as
    µs/email and as the ratio 10k/100.
(b) **Change cost**: one pipeline registering while ``--keys`` exist, as a node does it (the
    pipeline service, its TTL pass, then the node again with its new ``pipeline_count``). For the
    router's view (one HealthWatch on ``epoxi-node``), and for the old design (a HealthWatch on
    ``epoxi-pipeline`` too, and the old snapshot build over every pipeline) as the baseline:
    the router thread's CPU seconds and the bytes its registry client received (an aiohttp
    trace: headers and body of every response), from the change until the view shows it and
    its snapshot is built. Median of ``--changes`` changes each; printed with the ratio old/new.
(c) **Peak RSS**: a child process runs a real router (``start_router``) against the registry,
    and reports ``resource.getrusage`` ``ru_maxrss`` once serving and again with ``--keys``
    owners cached (``Owners.lookup_all``: one KV GET per key). Another child holds the old
    design's state (the pipeline watch with every pipeline, and its snapshot) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from benchmarks import _utils
from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import RegistryConfig
from epoxi import policy, validation
from epoxi.envelope import new_email
from epoxi.registry import client, services
from epoxi.registry.ownership import Owner, record_key
from epoxi.registry.watch import HealthWatch
from epoxi.routing import routing_key
from epoxi.v1 import email_pb2, node_pb2, pipeline_pb2
from services.router.batching import plan
from services.router.discovery import ClusterSnapshot, ClusterView
from services.router.main import RouterConfig, start_router
from services.router.owners import OwnerCache, Owners

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
NO_SUCH_TAG = "epoxi-benchmark-no-such-tag"

EMAILS_PER_REQUEST = 500
KEYS_PER_REQUEST = 100
REQUESTS_PER_ROUND = 20


@dataclass
class Result:
    keys: int
    nodes: int
    decision_us_per_email: dict[str, float] = field(default_factory=dict)
    decision_ratio: float = 0.0
    change: dict[str, dict[str, float]] = field(default_factory=dict)
    change_cpu_ratio: float = 0.0
    change_bytes_ratio: float = 0.0
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    cache_bytes_per_key: float = 0.0
    setup_seconds: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)


def node_id(j: int) -> str:
    return f"n{j + 1}"


def node_ip(j: int) -> str:
    return f"127.0.0.{2 + j}"


def key_of(i: int, nodes: int) -> tuple[str, str, int]:
    """The i-th routing key: its domain, its source IP, and the index of the node that runs it."""
    j = i % nodes
    return f"d{i}.bench.test", node_ip(j), j


def node_info(j: int, pipelines: int) -> node_pb2.NodeInfo:
    return node_pb2.NodeInfo(
        id=node_id(j),
        address=f"127.0.0.1:{40000 + j}",
        egress_ips=[node_ip(j)],
        ip_pool="default",
        pipeline_count=pipelines,
        load=0,
    )


def node_registration(j: int, pipelines: int) -> dict[str, Any]:
    """What a node registers, with a TTL check (passing) for its gRPC check: nothing listens."""
    registration = services.node_registration(node_info(j, pipelines), "5s", "1m")
    registration["check"] = {"Name": "node TTL", "TTL": "1h", "Status": "passing"}
    return registration


def pipeline_info(i: int, nodes: int) -> pipeline_pb2.PipelineInfo:
    domain, ip, j = key_of(i, nodes)
    key = routing_key(domain, ip)
    return pipeline_pb2.PipelineInfo(
        name=services.pipeline_service_id(node_id(j), key),
        routing_key=key,
        node=node_id(j),
        address=node_info(j, 0).address,
        domain=domain,
        source_ip=ip,
        policy=policy.Policy(name=key).to_proto(),
    )


# --- the registry, on its own thread -------------------------------------------------------------


class RegistryThread:
    """The dev registry and a setup client, on a thread with its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="registry", daemon=True)
        self.registry: RunningRegistry | None = None
        self.consul: Any = None

    def start(self) -> RegistryThread:
        self._thread.start()
        self.call(self._open())
        return self

    async def _open(self) -> None:
        self.registry = await serve("127.0.0.1", 0, RegistryConfig())
        self.consul = client.connect(self.registry.address)

    @property
    def address(self) -> str:
        assert self.registry is not None
        return self.registry.address

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self.loop)

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        return self.submit(work).result()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work`` on the registry's thread from another loop."""
        return await asyncio.wrap_future(self.submit(work))

    def stop(self) -> None:
        async def close() -> None:
            if self.consul is not None:
                await self.consul.close()
            if self.registry is not None:
                await self.registry.close()

        if self._thread.is_alive():
            self.call(close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


async def _bounded(calls: Iterable[Callable[[], Awaitable[object]]], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


async def populate(consul: Any, keys: int, nodes: int, pipelines: bool = True) -> None:
    """Nodes, their sessions, the keys' placement records, and (``pipelines``) the keys as
    pipeline services."""
    per_node = [len(range(j, keys, nodes)) for j in range(nodes)]
    for j in range(nodes):
        await consul.agent.service.register(**node_registration(j, per_node[j]))
    sessions = [
        await consul.session.create(name=f"epoxi-node {node_id(j)}", lock_delay=0, behavior="release")
        for j in range(nodes)
    ]

    def claim(i: int) -> Callable[[], Awaitable[object]]:
        domain, ip, j = key_of(i, nodes)
        value = json.dumps({"node": node_id(j), "address": node_info(j, 0).address})
        return lambda: consul.kv.put(record_key(routing_key(domain, ip)), value, acquire=sessions[j])

    await _bounded((claim(i) for i in range(keys)), 64)
    if pipelines:
        await _bounded((register_pipeline(consul, i, nodes) for i in range(keys)), 64)


def register_pipeline(consul: Any, i: int, nodes: int) -> Callable[[], Awaitable[None]]:
    p = pipeline_info(i, nodes)

    async def register() -> None:
        await consul.agent.service.register(**services.pipeline_registration(p, "1h", "1m"))
        await consul.agent.check.ttl_pass(services.pipeline_check_id(p.name), notes="idle")

    return register


async def add_pipeline(consul: Any, i: int, nodes: int) -> None:
    """One more pipeline, as a node registers it: the service, its TTL pass, the node's count."""
    await register_pipeline(consul, i, nodes)()
    _, _, j = key_of(i, nodes)
    await consul.agent.service.register(**node_registration(j, len(range(j, i + 1, nodes))))


# --- the router side ---------------------------------------------------------------------------


class CountingClient:
    """A registry client whose responses are counted in bytes (status line, headers, body)."""

    def __init__(self, address: str) -> None:
        self.consul: Any = client.connect(address)
        self.bytes = 0
        self.responses = 0
        trace = aiohttp.TraceConfig()
        trace.on_response_chunk_received.append(self._chunk)
        trace.on_request_end.append(self._headers)
        self._trace = trace

    async def open(self) -> CountingClient:
        await self.consul.http._session.close()
        self.consul.http._session = aiohttp.ClientSession(trace_configs=[self._trace])
        return self

    async def _chunk(self, _: Any, __: Any, params: aiohttp.TraceResponseChunkReceivedParams) -> None:
        self.bytes += len(params.chunk)

    async def _headers(self, _: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        raw = params.response.raw_headers
        self.responses += 1
        self.bytes += 15 + sum(len(k) + len(v) + 4 for k, v in raw)

    async def close(self) -> None:
        await self.consul.close()


def old_build_snapshot(
    node_entries: list[services.Entry], pipeline_entries: list[services.Entry]
) -> dict[str, Any]:
    """The snapshot the router built before (services/router/discovery.py at 38e8082)."""
    nodes = {n.id: n for n in map(services.node_from_entry, filter(services.passing, node_entries))}
    pipelines: dict[str, list[pipeline_pb2.PipelineInfo]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for entry in filter(services.passing, pipeline_entries):
        p = services.pipeline_from_entry(entry)
        if p.node in nodes:
            pipelines[p.routing_key].append(p)
            counts[p.node] += 1
    for candidates in pipelines.values():
        candidates.sort(key=lambda p: (nodes[p.node].load, p.node))
    pools: dict[str, set[str]] = defaultdict(set)
    for n in nodes.values():
        pools[n.ip_pool].update(n.egress_ips)
    return {"nodes": nodes, "pipelines": dict(pipelines), "pools": pools, "counts": dict(counts)}


async def until(check: Callable[[], bool], seconds: float = 120.0) -> None:
    # Polling, not the watches' events: the same few 5 ms wake-ups in both designs.
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def registry_indexes(consul: Any) -> tuple[int, int]:
    """The registry's indexes of the node and the pipeline health queries now (asked with a tag
    nothing has: the same index, and no entries to send)."""
    node_index, _ = await consul.health.service(services.NODE_SERVICE, tag=NO_SUCH_TAG)
    pipeline_index, _ = await consul.health.service(services.PIPELINE_SERVICE, tag=NO_SUCH_TAG)
    return int(node_index), int(pipeline_index)


async def measure_change(
    registry: RegistryThread,
    counted: CountingClient,
    i: int,
    nodes: int,
    seen: Callable[[tuple[int, int]], bool],
    build: Callable[[], object],
) -> dict[str, float]:
    """Add pipeline ``i``, and measure the router thread until its watches reached the indexes
    the registry has after the change (``seen``) and the snapshot was built (``build``)."""
    await asyncio.sleep(0.2)  # let every watch settle into its blocking query
    gc.collect()
    bytes0, answers0 = counted.bytes, counted.responses
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    await registry.run(add_pipeline(registry.consul, i, nodes))
    # Read on the registry's thread: its CPU is not the router's.
    indexes = await registry.run(registry_indexes(registry.consul))
    await until(lambda: seen(indexes))
    build()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    await asyncio.sleep(0.2)
    return {
        "cpu_s": cpu,
        "bytes": float(counted.bytes - bytes0),
        "answers": float(counted.responses - answers0),
        "wall_s": wall,
    }


def median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


async def change_costs(registry: RegistryThread, keys: int, nodes: int, changes: int, r: Result) -> None:
    # The router's view: one watch, on the nodes.
    counted = await CountingClient(registry.address).open()
    view = ClusterView(counted.consul).start()
    try:
        await view.ready()
        samples = []
        for n in range(changes):
            i = keys + n
            _, _, j = key_of(i, nodes)
            want = len(range(j, i + 1, nodes))

            def seen(_: tuple[int, int], j: int = j, want: int = want) -> bool:
                return view.snapshot().pipeline_counts.get(node_id(j)) == want

            samples.append(await measure_change(registry, counted, i, nodes, seen, view.snapshot))
        r.change["node view"] = median(samples)
    finally:
        await view.close()
        await counted.close()

    # The old design: the same node watch, and a watch of every pipeline.
    counted = await CountingClient(registry.address).open()
    node_watch = HealthWatch(counted.consul, services.NODE_SERVICE, "30s").start()
    pipeline_watch = HealthWatch(counted.consul, services.PIPELINE_SERVICE, "30s").start()
    try:
        await node_watch.ready.wait()
        await pipeline_watch.ready.wait()
        samples = []
        for n in range(changes):
            samples.append(
                await measure_change(
                    registry,
                    counted,
                    keys + changes + n,
                    nodes,
                    lambda at: node_watch.index >= at[0] and pipeline_watch.index >= at[1],
                    lambda: old_build_snapshot(node_watch.entries, pipeline_watch.entries),
                )
            )
        r.change["pipeline watch (old)"] = median(samples)
    finally:
        await asyncio.gather(node_watch.close(), pipeline_watch.close())
        await counted.close()
    new, old = r.change["node view"], r.change["pipeline watch (old)"]
    r.change_cpu_ratio = old["cpu_s"] / max(new["cpu_s"], 1e-9)
    r.change_bytes_ratio = old["bytes"] / max(new["bytes"], 1.0)


def requests(known: int, nodes: int) -> list[list[email_pb2.Email]]:
    """REQUESTS_PER_ROUND requests of EMAILS_PER_REQUEST emails over KEYS_PER_REQUEST keys each,
    the keys taken in turn from the ``known`` ones."""
    out = []
    for q in range(REQUESTS_PER_ROUND):
        emails = []
        for m in range(EMAILS_PER_REQUEST):
            i = (q * KEYS_PER_REQUEST + m % KEYS_PER_REQUEST) % known
            domain, ip, _ = key_of(i, nodes)
            emails.append(
                new_email(
                    "Ann <ann@sender.test>",
                    to=[f"u{m}@{domain}"],
                    subject="Hello",
                    text="hello " * 50,
                    delivery=email_pb2.Delivery(ip=ip),
                )
            )
        out.append(emails)
    return out


def decide(emails: list[email_pb2.Email], snap: ClusterSnapshot, owners: Owners) -> int:
    """What RouteEmails does before sending, with a warm cache: validate, plan, find each owner."""
    for i, e in enumerate(emails):
        if validation.validate(e, f"emails[{i}]"):
            raise AssertionError("invalid benchmark email")
    batches, _ = plan(emails, "", snap.pools, 500)
    found = 0
    for b in batches:
        found += owners.cached(b.routing_key, snap) is not None
    return found


async def decision_costs(registry: RegistryThread, keys: int, nodes: int, rounds: int, r: Result) -> None:
    consul = client.connect(registry.address)
    view = ClusterView(consul).start()
    try:
        await view.ready()
        snap = view.snapshot()
        for known in sorted({min(100, keys), keys}):
            owners = Owners(consul, OwnerCache())
            names = [routing_key(*key_of(i, nodes)[:2]) for i in range(known)]
            await owners.lookup_all(names, snap)
            assert len(owners.cache) == known, (len(owners.cache), known)
            work = requests(known, nodes)
            best = float("inf")
            for _ in range(rounds):
                gc.collect()
                start = time.thread_time()
                for emails in work:
                    found = decide(emails, snap, owners)
                    assert found == KEYS_PER_REQUEST
                best = min(best, time.thread_time() - start)
            r.decision_us_per_email[f"{known} keys"] = best / (REQUESTS_PER_ROUND * EMAILS_PER_REQUEST) * 1e6
    finally:
        await view.close()
        await consul.close()
    values = list(r.decision_us_per_email.values())
    r.decision_ratio = values[-1] / values[0]


# --- peak RSS, in a child ------------------------------------------------------------------------
#
# Linux keeps ru_maxrss across fork and exec: a child starts from its parent's peak. So the
# children are started before the registry is filled (the parent is then ~57 MiB, its imports),
# and wait for a line on stdin before they begin; each reports VmHWM too (reset at exec).


def _peak() -> dict[str, int]:
    return {
        "maxrss_kib": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "vmhwm_kib": _utils.status_kib(os.getpid(), "VmHWM"),
    }


async def rss_child(address: str, keys: int, nodes: int, design: str) -> dict[str, Any]:
    at_start = _peak()
    await asyncio.to_thread(sys.stdin.readline)  # go
    if design == "old":
        consul = client.connect(address)
        watches = [
            HealthWatch(consul, services.NODE_SERVICE).start(),
            HealthWatch(consul, services.PIPELINE_SERVICE).start(),
        ]
        for w in watches:
            await w.ready.wait()
        snap = old_build_snapshot(watches[0].entries, watches[1].entries)
        gc.collect()
        out = {"start": at_start, "peak": _peak(), "count": sum(len(p) for p in snap["pipelines"].values())}
        for w in watches:
            await w.close()
        await consul.close()
        return out
    router = await start_router(RouterConfig(id="router-bench", listen="127.0.0.1:0", consul=address))
    try:
        await router.view.ready()
        owners = router.servicer.owners
        names = [routing_key(*key_of(i, nodes)[:2]) for i in range(keys)]
        await owners.lookup_all(names, router.view.snapshot())
        del names
        gc.collect()
        return {"start": at_start, "peak": _peak(), "count": len(owners.cache)}
    finally:
        await router.close()


class RssChild:
    """``python -m benchmarks.router_view --rss-child``, started now, measuring when told."""

    def __init__(self, design: str, keys: int) -> None:
        self.design, self.keys = design, keys
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, address: str, nodes: int) -> RssChild:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "benchmarks.router_view", "--rss-child", address),
            *("--keys", str(self.keys), "--nodes", str(nodes), "--design", self.design),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return self

    async def measure(self) -> dict[str, Any]:
        assert self.proc is not None
        stdout, _ = await self.proc.communicate(b"go\n")
        if self.proc.returncode != 0:
            raise RuntimeError(f"the RSS child ({self.design}) exited with {self.proc.returncode}")
        result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        return result

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def rss(children: list[RssChild], r: Result) -> None:
    empty, full, old = [await c.measure() for c in children]
    r.rss_kib = {
        "router serving, nothing cached": empty["peak"],
        f"router with {full['count']:,} owners cached": full["peak"],
        f"old design's state ({old['count']:,} pipelines watched)": old["peak"],
        "inherited at start (the parent's peak)": full["start"],
    }


def cache_bytes_per_key(keys: int, nodes: int) -> float:
    """What one entry of the owner cache holds once built (tracemalloc): its slot and its key's
    name; the Owner values are shared."""
    owners = [Owner(node_id(j), node_info(j, 0).address) for j in range(nodes)]
    tracemalloc.start()
    try:
        cache = OwnerCache()
        for i in range(keys):
            domain, ip, j = key_of(i, nodes)
            cache.put(routing_key(domain, ip), owners[j])
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return used / max(1, len(cache))


# --- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, registry: RegistryThread) -> Result:
    r = Result(args.keys, args.nodes, machine=_utils.machine())
    designs = [("new", 0), ("new", args.keys), ("old", args.keys)]
    if args.only == "decision":
        return await measure_all(args, registry, [], r)
    children = [await RssChild(d, k).start(registry.address, args.nodes) for d, k in designs]
    try:
        return await measure_all(args, registry, children, r)
    finally:
        for c in children:
            await c.stop()


async def measure_all(
    args: argparse.Namespace, registry: RegistryThread, children: list[RssChild], r: Result
) -> Result:
    start = time.perf_counter()
    print(f"registering {args.nodes} nodes, {args.keys:,} placement records and pipelines ...", flush=True)
    only_decision = args.only == "decision"
    await registry.run(populate(registry.consul, args.keys, args.nodes, pipelines=not only_decision))
    r.setup_seconds = time.perf_counter() - start
    print(f"  done in {r.setup_seconds:.1f}s", flush=True)
    print("(a) routing decision per email ...", flush=True)
    await decision_costs(registry, args.keys, args.nodes, args.rounds, r)
    if only_decision:
        return r
    print("(b) change cost ...", flush=True)
    await change_costs(registry, args.keys, args.nodes, args.changes, r)
    print("(c) peak RSS ...", flush=True)
    await rss(children, r)
    r.cache_bytes_per_key = cache_bytes_per_key(args.keys, args.nodes)
    return r


def report(r: Result) -> str:
    keys = list(r.decision_us_per_email)
    lines = [
        f"{r.keys:,} keys over {r.nodes} nodes; machine: {r.machine.get('cpus')} CPUs, "
        f"{r.machine.get('cpu model')}, load {r.machine.get('load average at start')}",
        "",
        "(a) routing decision (validate + plan + owner from a warm cache)",
        _utils.table(
            [["known keys", "µs/email"]] + [[k, f"{v:.1f}"] for k, v in r.decision_us_per_email.items()]
        ),
        f"ratio {keys[-1]} / {keys[0]}: {r.decision_ratio:.2f}",
    ]
    if not r.change:  # --only decision
        return "\n".join(lines)
    lines += [
        "",
        f"(b) one pipeline registering while {r.keys:,} exist (median)",
        _utils.table(
            [["router watches", "CPU ms", "KiB received", "answers", "wall ms"]]
            + [
                [
                    k,
                    f"{v['cpu_s'] * 1e3:.2f}",
                    f"{v['bytes'] / 1024:.1f}",
                    f"{v['answers']:.0f}",
                    f"{v['wall_s'] * 1e3:.1f}",
                ]
                for k, v in r.change.items()
            ]
        ),
        f"old / new: CPU {r.change_cpu_ratio:,.0f}x, bytes {r.change_bytes_ratio:,.0f}x",
        "",
        "(c) peak RSS",
        _utils.table(
            [["process", "ru_maxrss MiB", "VmHWM MiB"]]
            + [
                [k, f"{v['maxrss_kib'] / 1024:.1f}", f"{v['vmhwm_kib'] / 1024:.1f}"]
                for k, v in r.rss_kib.items()
            ]
        ),
    ]
    sizes = [v["vmhwm_kib"] for v in r.rss_kib.values()]
    if r.keys:
        lines.append(
            f"per cached owner: {(sizes[1] - sizes[0]) * 1024 / r.keys:.0f} bytes of peak (VmHWM, with the"
            f" lookups' transient buffers); {r.cache_bytes_per_key:.0f} bytes held (tracemalloc)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.router_view", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--keys", type=int, default=10_000, help="routing keys (placement records, pipelines)"
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (a); the best counts")
    parser.add_argument("--changes", type=int, default=3, help="changes measured per design in (b)")
    parser.add_argument(
        "--only", choices=["decision"], help="measure (a) alone (no pipeline services, no children)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--rss-child", metavar="REGISTRY", help=argparse.SUPPRESS)
    parser.add_argument("--design", default="new", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(asyncio.run(rss_child(args.rss_child, args.keys, args.nodes, args.design))))
        return 0
    registry = RegistryThread().start()
    try:
        r = asyncio.run(run(args, registry))
    finally:
        registry.stop()
    print()
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(asdict(r), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
