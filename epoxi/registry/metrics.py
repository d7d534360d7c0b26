"""What a service's registry client shows of itself: the calls that failed, and how stale the
registry said its blocking-query answers were.

- ``epoxi_registry_errors_total{operation}``: registry calls that raised (the registry down,
  slow, or refusing: ``epoxi.registry.client.RegistryError``), by ``operation``, the API
  endpoint without its arguments (``kv.get``, ``kv.put``, ``health.service``,
  ``agent.service.register``, ``agent.check.update``, ``session.create``, ...);
- ``epoxi_registry_blocking_query_lag_seconds``: a histogram of Consul's ``X-Consul-LastContact``
  on each blocking-query answer (``?index=``): how long before the answer the server that gave
  it had last heard from the cluster's leader. 0 when the leader answered itself (the default
  consistency mode; the development registry always says 0); larger when a follower answers
  from its own, possibly stale, copy. Its count is the number of blocking-query answers. How
  old a watcher's view is (the time since its watch last answered) is the watcher's to say,
  e.g. the router's ``epoxi_router_registry_view_age_seconds``.

Each service builds its own ``RegistryMetrics`` on its own Prometheus registry and gives it to
``epoxi.registry.client.connect``; ``RegistryMetrics(None)`` (metrics off) records nothing.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

LAG_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
LAST_CONTACT = "X-Consul-LastContact"
# Endpoints named by their first three path segments; the others by two (the rest are IDs, names, keys).
_THREE_SEGMENTS = {"agent", "acl", "operator"}


def operation(method: str, uri: str) -> str:
    """The endpoint a registry call reaches, without its arguments: ``GET /v1/kv/a/b`` is
    ``kv.get``, ``/v1/health/service/epoxi-node`` ``health.service``,
    ``/v1/agent/check/update/service:n1`` ``agent.check.update``."""
    path = urllib.parse.urlsplit(uri).path.removeprefix("/v1/")
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "unknown"
    if parts[0] == "kv":
        return f"kv.{method.lower()}"
    return ".".join(parts[: 3 if parts[0] in _THREE_SEGMENTS else 2])


def is_blocking(method: str, uri: str) -> bool:
    """Whether a call is a blocking query (a GET with ``?index=``)."""
    return method == "GET" and "index" in urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.on = registry is not None
        if registry is None:
            return
        self._errors = Counter(
            "epoxi_registry_errors_total",
            "Registry calls that failed (unreachable, timed out, or refused), by operation.",
            ["operation"],
            registry=registry,
        )
        self._lag = Histogram(
            "epoxi_registry_blocking_query_lag_seconds",
            "X-Consul-LastContact of each blocking-query answer: how long before it the answering "
            "server had last heard from the leader (0: the leader answered).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._error_children: dict[str, Any] = {}

    def error(self, operation: str) -> None:
        if not self.on:
            return
        child = self._error_children.get(operation)
        if child is None:
            child = self._error_children[operation] = self._errors.labels(operation)
        child.inc()

    def blocking_answer(self, headers: Any) -> None:
        """A blocking query answered with these response headers."""
        if not self.on:
            return
        value = headers.get(LAST_CONTACT)
        if value is None:
            return
        try:
            self._lag.observe(max(0.0, int(value) / 1000))
        except ValueError:
            pass
