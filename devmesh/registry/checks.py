"""Running checks: TTL timers, gRPC health probes and the critical-service reaper.

Behaviour follows ``agent/checks/check.go``, ``agent/checks/grpc.go`` and ``Agent.reapServices``:

* A TTL check's timer starts at registration and restarts on every pass/warn/fail/update. When it
  fires the check turns critical with output ``TTL expired``, or ``TTL expired (last output
  before timeout follows): <output>`` if the last update carried output. It then stays quiet
  until the next update.
* A gRPC check calls ``grpc.health.v1.Health/Check`` on ``host:port`` (or ``host:port/service``)
  every ``Interval`` (at least 1s), after a random initial pause shorter than one interval, with
  ``Timeout`` (default 10s). SERVING is passing with ``gRPC check <target>: success``. With
  ``GRPCUseTLS`` it dials over TLS as ``devmesh.registry.check_tls`` sets it up (the agent's CA
  and certificate when ``enable_agent_tls_for_checks``, ``TLSServerName``, ``TLSSkipVerify``).
* Every ``check_reap_interval`` the reaper deregisters a service one of whose checks has been
  critical for longer than its ``DeregisterCriticalServiceAfter`` (at least
  ``check_deregister_interval_min``). The critical clock starts when a check *becomes* critical
  by an update, as in Consul, not at registration.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devmesh.registry.check_tls import CheckTLS, check_channel
from devmesh.registry.state import CRITICAL, PASSING, WARNING, CheckSpec, Store
from epoxi import durations
from epoxi.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MIN_INTERVAL = durations.SECOND
DEFAULT_GRPC_TIMEOUT = 10 * durations.SECOND
OUTPUT_MAX_SIZE = 4 * 1024
_GO_CODE_NAMES = {"CANCELLED": "Canceled"}


def truncate_output(output: str) -> str:
    """Consul keeps at most 4 KiB of check output (``checks.DefaultBufSize``)."""
    raw = output.encode()
    if len(raw) <= OUTPUT_MAX_SIZE:
        return output
    head = raw[:OUTPUT_MAX_SIZE].decode(errors="ignore")
    return f"{head} ... (captured {OUTPUT_MAX_SIZE} of {len(raw)} bytes)"


def _go_code(code: grpc.StatusCode) -> str:
    name: str = code.name
    return _GO_CODE_NAMES.get(name, "".join(part.capitalize() for part in name.split("_")))


async def probe_grpc(
    target: str, deadline: float, spec: CheckSpec | None = None, tls: CheckTLS | None = None
) -> tuple[str, str]:
    """One gRPC health probe; returns ``(status, output)`` with Consul's output texts. Over TLS
    when ``spec.grpc_use_tls``, as ``tls`` (the agent's TLS for checks) and the spec's
    ``TLSServerName``/``TLSSkipVerify`` say."""
    spec = spec or CheckSpec()
    server, _, service = target.partition("/")
    try:
        async with check_channel(
            server, spec.grpc_use_tls, spec.tls_server_name, spec.tls_skip_verify, tls or CheckTLS()
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return CRITICAL, f"rpc error: code = {_go_code(exc.code())} desc = {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CRITICAL, f"gRPC {target} serving status: {status_name}"
    return PASSING, f"gRPC check {target}: success"


class StatusHandler:
    """``checks.StatusHandler``: passes a probe's result on only once its threshold is reached."""

    def __init__(self, spec: CheckSpec) -> None:
        self.success_before_passing = spec.success_before_passing
        self.failures_before_warning = spec.failures_before_warning
        self.failures_before_critical = spec.failures_before_critical
        self.successes = spec.success_before_passing
        self.failures = spec.failures_before_critical

    def status(self, status: str) -> str | None:
        """The status to record for this result, or ``None`` to leave the check as it is."""
        if status != CRITICAL:
            self.successes += 1
            self.failures = 0
            return status if self.successes >= self.success_before_passing else None
        self.failures += 1
        self.successes = 0
        if self.failures >= self.failures_before_critical:
            return CRITICAL
        if self.failures >= self.failures_before_warning:
            return WARNING
        return None


class CheckRunner:
    """Owns the timers and probe tasks of the agent's checks."""

    def __init__(self, store: Store, tls: CheckTLS | None = None) -> None:
        self.store = store
        self.tls = tls or CheckTLS()
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self._last_output: dict[str, str] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None

    def start(self, check_id: str) -> None:
        """(Re)start the runner of a registered check, as ``Agent.addCheck`` does."""
        self.stop(check_id)
        local = self.store.local_checks[check_id]
        spec = local.spec
        if spec.ttl > 0:
            self._last_output[check_id] = ""
            self._arm_ttl(check_id, spec.ttl)
        elif spec.grpc and spec.interval > 0:
            interval = max(spec.interval, MIN_INTERVAL)
            timeout = spec.timeout if spec.timeout > 0 else DEFAULT_GRPC_TIMEOUT
            self._probes[check_id] = asyncio.create_task(
                self._probe_loop(check_id, spec, interval / durations.SECOND, timeout / durations.SECOND)
            )

    def stop(self, check_id: str) -> None:
        timer = self._ttl_timers.pop(check_id, None)
        if timer is not None:
            timer.cancel()
        self._last_output.pop(check_id, None)
        probe = self._probes.pop(check_id, None)
        if probe is not None:
            probe.cancel()

    def is_ttl(self, check_id: str) -> bool:
        return check_id in self._last_output

    def set_ttl_status(self, check_id: str, status: str, output: str) -> None:
        """``CheckTTL.SetStatus``: record the status and output and restart the TTL."""
        output = truncate_output(output)
        self.store.update_check(check_id, status, output)
        self._last_output[check_id] = output
        self._arm_ttl(check_id, self.store.local_checks[check_id].spec.ttl)

    def _arm_ttl(self, check_id: str, ttl: int) -> None:
        timer = self._ttl_timers.pop(check_id, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._ttl_timers[check_id] = loop.call_later(ttl / durations.SECOND, self._ttl_expired, check_id)

    def _ttl_expired(self, check_id: str) -> None:
        self._ttl_timers.pop(check_id, None)
        last = self._last_output.get(check_id, "")
        output = f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
        log.warning("check %s missed its TTL and is now critical", check_id)
        self.store.update_check(check_id, CRITICAL, output)

    async def _probe_loop(self, check_id: str, spec: CheckSpec, interval: float, deadline: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))
        handler = StatusHandler(spec)
        while True:
            status, output = await probe_grpc(spec.grpc, deadline, spec, self.tls)
            recorded = handler.status(status)
            if recorded is None:
                log.warning("check %s: %s, but its threshold is not reached", check_id, status)
            else:
                self.store.update_check(check_id, recorded, truncate_output(output))
            await asyncio.sleep(interval)

    # --- services -------------------------------------------------------------------------------

    def remove_service(self, service_id: str) -> bool:
        for check_id, local in list(self.store.local_checks.items()):
            if local.check.service_id == service_id:
                self.stop(check_id)
        return self.store.remove_service(service_id)

    def remove_check(self, check_id: str) -> None:
        self.stop(check_id)
        self.store.remove_check(check_id)

    # --- reaper ---------------------------------------------------------------------------------

    def start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.store.config.check_reap_interval / durations.SECOND)
            self.reap()

    def reap(self) -> None:
        """``reapServicesInternal``: deregister services critical for longer than allowed."""
        now = time.monotonic()
        minimum = self.store.config.check_deregister_interval_min
        reaped: set[str] = set()
        for local in list(self.store.local_checks.values()):
            service_id = local.check.service_id
            after = local.spec.deregister_critical_service_after
            if not service_id or service_id in reaped or after <= 0 or local.critical_since is None:
                continue
            if (now - local.critical_since) * durations.SECOND > max(after, minimum):
                reaped.add(service_id)
                log.info("service %s has been critical for too long; deregistered", service_id)
                self.remove_service(service_id)

    async def close(self) -> None:
        tasks = list(self._probes.values())
        for check_id in list(self._ttl_timers) + list(self._probes):
            self.stop(check_id)
        reaper, self._reaper = self._reaper, None
        await cancel_and_wait(*tasks, reaper)
