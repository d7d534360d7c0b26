"""Start the whole mesh on one machine, each service its own process.

Used by ``epoxi dev`` and by the end-to-end tests. Every service prints one line
``... listening on <address>`` when it is ready; that is how the addresses are learnt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from epoxi.registry import client, services

_READY = re.compile(r"listening on (\S+)\s*$")
STARTUP_TIMEOUT = 30.0


@dataclass
class NodeSpec:
    id: str
    egress_ips: list[str]
    ip_pool: str = "default"


DEFAULT_NODES = [
    NodeSpec("node1", ["127.0.0.2", "127.0.0.3"]),
    NodeSpec("node2", ["127.0.0.4", "127.0.0.5"]),
]


@dataclass
class Process:
    name: str
    proc: asyncio.subprocess.Process
    address: str
    lines: list[str] = field(default_factory=list)
    line_added: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None

    async def wait_for_lines(self, prefix: str, count: int) -> list[str]:
        """Wait until ``count`` output lines start with ``prefix``; returns them."""
        while True:
            self.line_added.clear()
            found = [line for line in self.lines if line.startswith(prefix)]
            if len(found) >= count:
                return found
            await self.line_added.wait()

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        return self.proc.returncode if self.proc.returncode is not None else -1


async def spawn(
    name: str,
    args: list[str],
    echo: Callable[[str, str], None] | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """Run ``python -m <args>`` and wait for its ready line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise RuntimeError(f"{name} exited before it was ready:\n" + "".join(lines))
                line = raw.decode(errors="replace")
                lines.append(line)
                if echo:
                    echo(name, line.rstrip())
                if m := _READY.search(line):
                    break
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    p = Process(name, proc, m.group(1), lines)
    p._pump = asyncio.create_task(_pump(p, echo))
    return p


async def _pump(p: Process, echo: Callable[[str, str], None] | None) -> None:
    assert p.proc.stdout is not None
    async for raw in p.proc.stdout:
        line = raw.decode(errors="replace")
        p.lines.append(line)
        p.line_added.set()
        if echo:
            echo(p.name, line.rstrip())


@dataclass
class Mesh:
    """Registry (unless ``consul`` is given), nodes, router, monitor, gateway and a sink (unless ``route``)."""

    data_dir: Path
    nodes: list[NodeSpec] = field(default_factory=lambda: list(DEFAULT_NODES))
    consul: str | None = None
    route: str | None = None
    registry_addr: str = "127.0.0.1:0"
    router_addr: str = "127.0.0.1:0"
    monitor_addr: str = "127.0.0.1:0"
    gateway_addr: str = "127.0.0.1:0"
    sink_addr: str = "127.0.0.1:0"
    check_interval: str = "1s"
    # Routers beyond the first, named router2, router3, ...
    extra_routers: int = 0
    echo: Callable[[str, str], None] | None = None
    processes: dict[str, Process] = field(default_factory=dict)

    async def start(self) -> Mesh:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        if self.consul is None:
            reg = await self._spawn("registry", ["devmesh.registry", "--http-addr", self.registry_addr])
            self.consul = reg.address.removeprefix("http://")
        if self.route is None:
            sink = await self._spawn(
                "sink", ["devmesh.sink", "--listen", self.sink_addr, "--maildir", str(self.data_dir / "sink")]
            )
            self.route = f"*={sink.address}"
        await asyncio.gather(*(self.start_node(n) for n in self.nodes))
        await self.wait_passing(services.NODE_SERVICE, {n.id for n in self.nodes})
        await asyncio.gather(
            self.start_router("router", self.router_addr),
            *(self.start_router(f"router{i + 2}") for i in range(self.extra_routers)),
            self._spawn(
                "monitor", ["services.monitor", "--listen", self.monitor_addr, "--consul", self.consul]
            ),
        )
        await self._spawn(
            "gateway",
            [
                "gateway",
                "--listen",
                self.gateway_addr,
                "--monitor",
                self.address("monitor"),
                "--consul",
                self.consul,
            ],
        )

    async def wait_passing(self, service: str, ids: set[str]) -> None:
        """Block until the registry shows every one of ``ids`` passing (their first check has run)."""
        consul = client.connect(self.consul)
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                index = None
                while True:
                    index, entries = await consul.health.service(
                        service, passing=True, index=index, wait="5s"
                    )
                    if ids <= {e["Service"]["ID"] for e in entries}:
                        return
        finally:
            await consul.close()

    def _common(self) -> list[str]:
        assert self.consul is not None
        return ["--consul", self.consul, "--check-interval", self.check_interval]

    async def start_node(self, spec: NodeSpec) -> Process:
        assert self.route is not None
        args = ["services.node", "--id", spec.id, "--listen", "127.0.0.1:0", "--ip-pool", spec.ip_pool]
        for ip in spec.egress_ips:
            args += ["--egress-ip", ip]
        args += ["--spool", str(self.data_dir / spec.id / "spool.db"), "--route", self.route, *self._common()]
        (self.data_dir / spec.id).mkdir(parents=True, exist_ok=True)
        return await self._spawn(spec.id, args)

    async def start_router(self, name: str = "router", listen: str = "127.0.0.1:0") -> Process:
        return await self._spawn(name, ["services.router", "--listen", listen, *self._common()])

    async def _spawn(self, name: str, args: list[str]) -> Process:
        p = await spawn(name, args, self.echo)
        self.processes[name] = p
        return p

    def address(self, name: str) -> str:
        return self.processes[name].address

    async def stop_process(self, name: str, sig: int = signal.SIGTERM) -> int:
        return await self.processes.pop(name).stop(sig)

    async def stop(self) -> None:
        # Front to back, so nothing routes to a service that is already gone.
        routers = [name for name in self.processes if name.startswith("router")]
        order = ["gateway", *routers, "monitor", *[n.id for n in self.nodes], "sink", "registry"]
        for name in order:
            if name in self.processes:
                await self.stop_process(name)
