"""Start the whole mesh on one machine, each service its own process.

Used by ``epoxi dev`` and by the end-to-end tests. Every service prints one line
``... listening on <address>`` when it is ready; that is how the addresses are learnt. With
``log_dir`` each service's output also goes to ``<log_dir>/<service>.log`` (``devmesh.logs``).
``restart`` starts a service again after it died; ``devmesh.watchdog`` decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devmesh.logs import ServiceLog, ServiceLogs, describe_exit
from epoxi.registry import client, services

_READY = re.compile(r"listening on (\S+)\s*$")
# The ingress's line before its ready line: where it takes SMTP.
_SMTP_READY = re.compile(r"^ingress SMTP on ([^\s,]+)")
# The line a service prints before its ready line when it serves metrics (Service.expose_metrics).
_METRICS_AT = re.compile(r" metrics on http://(\S+)/metrics\s*$")
STARTUP_TIMEOUT = 30.0
# Longer output lines are dropped (with a note) rather than stopping the reading of the output.
MAX_LINE = 1 << 20
_LISTEN_FLAGS = ("--listen", "--http-addr")


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
    address: str = ""
    # host:port of its /metrics; empty when it serves none.
    metrics_address: str = ""
    lines: list[str] = field(default_factory=list)
    line_added: asyncio.Event = field(default_factory=asyncio.Event)
    log: ServiceLog | None = None
    started_at: float = field(default_factory=time.monotonic)
    # Set by stop(): the exit that follows was asked for.
    stopping: bool = False
    _pump: asyncio.Task[None] | None = None
    # The address from the ready line; None when the output ended without one.
    _ready: asyncio.Future[str | None] = field(default_factory=asyncio.Future)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, count: int) -> list[str]:
        return [line.rstrip("\n") for line in self.lines[-count:]]

    async def wait_for_lines(self, prefix: str, count: int) -> list[str]:
        """Wait until ``count`` output lines start with ``prefix``; returns them."""
        while True:
            self.line_added.clear()
            found = [line for line in self.lines if line.startswith(prefix)]
            if len(found) >= count:
                return found
            await self.line_added.wait()

    async def exited(self) -> int:
        """Wait until the process has exited and its output is read; its return code."""
        if self._pump is not None:
            # Shielded: a waiter that is cancelled must not stop the reading of the output.
            await asyncio.shield(self._pump)
        return await self.proc.wait()

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
        self.stopping = True
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


class StartFailed(RuntimeError):
    """A service that exited, or was stopped, before it was ready."""

    def __init__(self, process: Process, reason: str) -> None:
        self.process = process
        self.reason = reason
        code = process.proc.returncode
        how = f" ({describe_exit(code)})" if code is not None else ""
        super().__init__(f"{process.name} {reason}{how}:\n" + "".join(process.lines))


async def spawn(
    name: str,
    args: list[str],
    echo: Callable[[str, str], None] | None = None,
    env: dict[str, str] | None = None,
    log: ServiceLog | None = None,
    own_process_group: bool = False,
) -> Process:
    """Run ``python -m <args>`` and wait for its ready line; its output also goes to ``log``.

    In ``own_process_group``, a Ctrl-C at the terminal reaches only the caller, which then
    stops the service when it chooses to."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        limit=MAX_LINE,
        process_group=0 if own_process_group else None,
    )
    p = Process(name, proc, log=log)
    if log is not None:
        log.mark(f"{name} started, pid {proc.pid}: python -m {shlex.join(args)}")
    p._pump = asyncio.create_task(_pump(p, echo))
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            address = await asyncio.shield(p._ready)
    except TimeoutError:
        await p.stop(signal.SIGKILL)
        raise StartFailed(p, f"was not ready within {STARTUP_TIMEOUT:g} s") from None
    except BaseException:
        await p.stop(signal.SIGKILL)
        raise
    if address is None:
        raise StartFailed(p, "exited before it was ready")
    p.address = address
    found = next((m for line in p.lines if (m := _METRICS_AT.search(line))), None)
    p.metrics_address = found.group(1) if found else ""
    return p


async def _pump(p: Process, echo: Callable[[str, str], None] | None) -> None:
    assert p.proc.stdout is not None
    while True:
        try:
            raw = await p.proc.stdout.readline()
        except ValueError:
            raw = f"[supervisor: a line over {MAX_LINE} bytes was dropped]\n".encode()
        if not raw:
            break
        line = raw.decode(errors="replace")
        p.lines.append(line)
        p.line_added.set()
        if p.log is not None:
            p.log.write(line)
        if echo:
            echo(p.name, line.rstrip())
        if not p._ready.done() and (m := _READY.search(line)):
            p._ready.set_result(m.group(1))
    code = await p.proc.wait()
    if not p._ready.done():
        p._ready.set_result(None)
    if p.log is not None:
        how = "stopped" if p.stopping else "died"
        p.log.mark(f"{p.name} (pid {p.pid}) {how}: {describe_exit(code)}")


def _listening_at(args: list[str], address: str) -> list[str]:
    """``args`` with the listen address replaced by ``address`` (where the service was bound)."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in _LISTEN_FLAGS:
            out[i + 1] = address.removeprefix("http://")
    return out


@dataclass
class Mesh:
    """Registry (unless ``consul`` is given), nodes, router, monitor, gateway, a sink (unless
    ``route``), and with ``ingress`` the SMTP ingress (``smtp_address``)."""

    data_dir: Path
    nodes: list[NodeSpec] = field(default_factory=lambda: list(DEFAULT_NODES))
    consul: str | None = None
    route: str | None = None
    # More node routes beyond ``route``, each "DOMAIN=HOST:PORT".
    routes: list[str] = field(default_factory=list)
    registry_addr: str = "127.0.0.1:0"
    router_addr: str = "127.0.0.1:0"
    monitor_addr: str = "127.0.0.1:0"
    gateway_addr: str = "127.0.0.1:0"
    sink_addr: str = "127.0.0.1:0"
    # The SMTP ingress: started when set; its SMTP address (port 0: any), and its flags beyond
    # the mesh's (users file, certificate, ...). Without flags it takes anonymous mail.
    ingress: bool = False
    ingress_addr: str = "127.0.0.1:0"
    ingress_args: list[str] = field(default_factory=list)
    check_interval: str = "1s"
    # Routers beyond the first, named router2, router3, ...
    extra_routers: int = 0
    echo: Callable[[str, str], None] | None = None
    # Added to every service's environment (e.g. EPOXI_TLS_*, CONSUL_HTTP_TOKEN).
    env: dict[str, str] = field(default_factory=dict)
    # Each service's output also in <log_dir>/<service>.log.
    log_dir: Path | None = None
    # Services in their own process group: a Ctrl-C at the terminal reaches only this process.
    own_process_group: bool = False
    processes: dict[str, Process] = field(default_factory=dict)
    # Where the ingress takes SMTP (once started).
    smtp_address: str = ""
    # How to start each service but the nodes again: as before, at the address it had.
    _restart_args: dict[str, list[str]] = field(default_factory=dict)
    _logs: ServiceLogs | None = None

    async def start(self) -> Mesh:
        if self.log_dir is not None:
            self._logs = ServiceLogs(self.log_dir)
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
                "--router",
                self.address("router"),
                "--consul",
                self.consul,
            ],
        )
        if self.ingress:
            await self.start_ingress()

    async def start_ingress(self) -> Process:
        """The ingress, sending to the router (at the address it keeps across restarts); itself
        restarted at the SMTP address it got."""
        args = ["services.ingress", "--listen", "127.0.0.1:0", "--smtp-listen", self.ingress_addr]
        args += ["--router", self.address("router")]
        args += self.ingress_args or ["--allow-anonymous", "1"]
        p = await self._spawn("ingress", [*args, *self._common()])
        found = next((m for line in p.lines if (m := _SMTP_READY.search(line))), None)
        if found is None:
            await p.stop(signal.SIGKILL)
            raise StartFailed(p, "did not say where it takes SMTP")
        self.smtp_address = found.group(1)
        restart = self._restart_args["ingress"]
        restart[restart.index("--smtp-listen") + 1] = self.smtp_address
        return p

    async def wait_passing(self, service: str, ids: set[str]) -> None:
        """Block until the registry shows every one of ``ids`` passing (their first check has run)."""
        await self._wait_registry(service, lambda entries: ids <= {e["Service"]["ID"] for e in entries})

    async def _wait_registry(self, service: str, done: Callable[[list[services.Entry]], bool]) -> None:
        """Block until ``done`` holds for the registry's passing entries of ``service``."""
        # The registry may enforce ACLs: read it with the token the services are given.
        consul = client.connect(self.consul, token=client.token_from_env({**os.environ, **self.env}))
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                index = None
                while True:
                    index, entries = await consul.health.service(
                        service, passing=True, index=index, wait="5s"
                    )
                    if done(entries):
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
        args += ["--spool", str(self.data_dir / spec.id / "spool.db"), "--route", self.route]
        for route in self.routes:
            args += ["--route", route]
        args += self._common()
        (self.data_dir / spec.id).mkdir(parents=True, exist_ok=True)
        return await self._spawn(spec.id, args)

    async def start_router(self, name: str = "router", listen: str = "127.0.0.1:0") -> Process:
        return await self._spawn(name, ["services.router", "--listen", listen, *self._common()])

    async def restart(self, name: str) -> Process:
        """Start ``name`` again and wait until it is ready: a node until the registry shows it
        passing at its new address (it may have any), any other service at the address it had,
        the one its clients know."""
        spec = next((n for n in self.nodes if n.id == name), None)
        if spec is None:
            return await self._spawn(name, self._restart_args[name])
        p = await self.start_node(spec)
        try:
            await self._wait_registry(
                services.NODE_SERVICE,
                lambda entries: any(
                    (info := services.node_from_entry(e)).id == name and info.address == p.address
                    for e in entries
                ),
            )
        except TimeoutError:
            await p.stop(signal.SIGKILL)
            raise StartFailed(p, f"was not passing its health check within {STARTUP_TIMEOUT:g} s") from None
        return p

    async def _spawn(self, name: str, args: list[str]) -> Process:
        log = self._logs.get(name) if self._logs is not None else None
        p = await spawn(
            name, args, self.echo, env=self.env, log=log, own_process_group=self.own_process_group
        )
        self.processes[name] = p
        self._restart_args[name] = _listening_at(args, p.address)
        return p

    def address(self, name: str) -> str:
        return self.processes[name].address

    def metrics_url(self, name: str) -> str:
        """Where ``name`` serves its Prometheus metrics; empty when it serves none."""
        address = self.processes[name].metrics_address
        return f"http://{address}/metrics" if address else ""

    def log_path(self, name: str) -> Path | None:
        return self._logs.path(name) if self._logs is not None else None

    async def stop_process(self, name: str, sig: int = signal.SIGTERM) -> int:
        return await self.processes.pop(name).stop(sig)

    async def stop(self) -> None:
        # Front to back, so nothing routes to a service that is already gone.
        routers = [name for name in self.processes if name.startswith("router")]
        order = ["ingress", "gateway", *routers, "monitor", *[n.id for n in self.nodes], "sink", "registry"]
        try:
            for name in order:
                if name in self.processes:
                    await self.stop_process(name)
        finally:
            if self._logs is not None:
                self._logs.close()
