"""The registry client's metrics (epoxi.registry.metrics): failed calls by operation, and the
staleness the registry reports on blocking-query answers. Against the dev registry, and an
address nothing listens on."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from epoxi.registry import client, services
from epoxi.registry.client import RegistryError
from epoxi.registry.metrics import RegistryMetrics, is_blocking, operation
from epoxi.registry.watch import HealthWatch
from tests.support import eventually, unused_address


@pytest.mark.parametrize(
    ("method", "uri", "expected"),
    [
        ("GET", "http://h:8500/v1/kv/epoxi/placement/a.example_127_0_0_2", "kv.get"),
        ("PUT", "http://h:8500/v1/kv/epoxi/placement/k?acquire=s1", "kv.put"),
        ("DELETE", "http://h:8500/v1/kv/k", "kv.delete"),
        ("GET", "http://h:8500/v1/health/service/epoxi-node?index=7&wait=30s", "health.service"),
        ("PUT", "http://h:8500/v1/agent/service/register", "agent.service.register"),
        ("PUT", "http://h:8500/v1/agent/service/deregister/node1", "agent.service.deregister"),
        ("PUT", "http://h:8500/v1/agent/check/update/service:node1", "agent.check.update"),
        ("PUT", "http://h:8500/v1/session/create", "session.create"),
        ("GET", "http://h:8500/v1/session/info/0b1c", "session.info"),
        ("GET", "http://h:8500/v1/status/leader", "status.leader"),
    ],
)
def test_an_operation_is_the_endpoint_without_its_arguments(method: str, uri: str, expected: str) -> None:
    assert operation(method, uri) == expected


def test_a_blocking_query_is_a_get_with_an_index() -> None:
    assert is_blocking("GET", "http://h/v1/health/service/x?index=3&wait=5s")
    assert not is_blocking("GET", "http://h/v1/health/service/x?passing=1")
    assert not is_blocking("GET", "http://h/v1/kv/reindex=1")
    assert not is_blocking("PUT", "http://h/v1/kv/k?index=3")


async def test_failed_calls_are_counted_by_operation(registry_addr: str) -> None:
    prometheus = CollectorRegistry()
    metrics = RegistryMetrics(prometheus)  # one per service, shared by its clients
    consul = client.connect(registry_addr, metrics=metrics)
    try:
        assert await consul.kv.put("k", "v")  # a call that succeeds counts nothing
        with pytest.raises(RegistryError):
            await consul.kv.put("k", "v", acquire="no-such-session")
        with pytest.raises(RegistryError):
            await consul.session.renew("00000000-0000-0000-0000-000000000000")
    finally:
        await consul.close()
    down = client.connect(unused_address(), metrics=metrics)
    try:
        for _ in range(2):
            with pytest.raises(RegistryError):
                await down.kv.get("k")
    finally:
        await down.close()

    def errors(op: str) -> float | None:
        return prometheus.get_sample_value("epoxi_registry_errors_total", {"operation": op})

    assert errors("kv.put") == 1
    assert errors("session.renew") == 1
    assert errors("kv.get") == 2


async def test_blocking_answers_are_observed(registry_addr: str) -> None:
    prometheus = CollectorRegistry()
    consul = client.connect(registry_addr, metrics=RegistryMetrics(prometheus))
    watch = HealthWatch(consul, services.NODE_SERVICE, wait="100ms").start()
    try:
        await watch.ready.wait()

        async def answered_twice() -> float | None:
            count = prometheus.get_sample_value("epoxi_registry_blocking_query_lag_seconds_count")
            return count if count is not None and count >= 2 else None

        # The first query has no index yet: only the ones after it block.
        await eventually(answered_twice)
        # The dev registry answers as a leader: X-Consul-LastContact 0.
        assert prometheus.get_sample_value("epoxi_registry_blocking_query_lag_seconds_sum") == 0
        assert (
            prometheus.get_sample_value("epoxi_registry_errors_total", {"operation": "health.service"})
            is None
        )
    finally:
        await watch.close()
        await consul.close()


async def test_without_metrics_the_client_records_nothing(registry_addr: str) -> None:
    consul = client.connect(registry_addr)
    off = client.connect(registry_addr, metrics=RegistryMetrics(None))
    try:
        assert consul.http.metrics is None and off.http.metrics is None
        assert await off.kv.put("k", "v")
        _, entry = await off.kv.get("k")
        assert entry["Value"] == b"v"
    finally:
        await consul.close()
        await off.close()
