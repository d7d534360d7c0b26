"""The router's metrics: what became of the emails and batches it routed, where their keys went,
and how old its view of the nodes is.

- ``epoxi_router_emails_total{outcome}``: emails of RouteEmails and RouteRawEmail calls, by what
  became of each: ``accepted`` (its batch was spooled by a node), ``failed`` (its batch was not,
  or no node sends from its source IP), ``unknown`` (a node may have spooled it and lost the
  reply), ``invalid`` (the call was refused whole, INVALID_ARGUMENT: nothing was routed);
- ``epoxi_router_batches_total{node, outcome}``: batches (as the responses list them) by the
  node that took the batch (``accepted``), else the last one tried (``failed``, ``unknown``;
  ``node="none"`` when no node could be tried, as for emails that got no source IP);
- ``epoxi_router_fallbacks_total``: batches accepted by another node than the first tried
  (``RouteEmailsResponse.fallbacks_used``);
- ``epoxi_router_placements_total{decision}``: how each batch's first node was chosen:
  ``existing`` (a node runs its key: the owner cache, or the key's placement record), ``placed``
  (nobody ran it: the best node for its source IP by ``epoxi.placement``, or the one this router
  placed it on moments ago), ``none`` (no passing node sends from its source IP);
- ``epoxi_router_registry_view_age_seconds``: at scrape time, seconds since the registry last
  answered the router's watch of the nodes (``epoxi.registry.watch.HealthWatch.answered_at``). A
  blocking query answers at least once per wait (30 s) while the registry is up, so it stays
  below that; more means the router routes on a view the registry has not confirmed for so long;
- ``epoxi_router_route_seconds``: a histogram of how long a call took to route, validation to
  summary.

Counted per batch and per call, never per email. ``RouterMetrics(None)`` (metrics off) creates
nothing and records nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epoxi.v1 import router_pb2

EMAIL_OUTCOMES = ("accepted", "failed", "unknown", "invalid")
DECISIONS = ("existing", "placed", "none")
NO_NODE = "none"
_BATCH_OUTCOMES = {
    router_pb2.BATCH_STATUS_ACCEPTED: "accepted",
    router_pb2.BATCH_STATUS_FAILED: "failed",
    router_pb2.BATCH_STATUS_UNKNOWN: "unknown",
}
ROUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        self.on = registry is not None
        if registry is None:
            return
        emails = Counter(
            "epoxi_router_emails_total",
            "Emails routed, by what became of them.",
            ["outcome"],
            registry=registry,
        )
        self._emails = {o: emails.labels(o) for o in EMAIL_OUTCOMES}
        self._batches = Counter(
            "epoxi_router_batches_total",
            "Batches routed, by the node that took them (or was tried last) and outcome.",
            ["node", "outcome"],
            registry=registry,
        )
        self._batch_children: dict[tuple[str, str], Any] = {}
        self._fallbacks = Counter(
            "epoxi_router_fallbacks_total",
            "Batches accepted by another node than the first one tried.",
            registry=registry,
        )
        placements = Counter(
            "epoxi_router_placements_total",
            "How each batch's first node was chosen: existing owner, placed by this router, or none.",
            ["decision"],
            registry=registry,
        )
        self._placements = {d: placements.labels(d) for d in DECISIONS}
        self._view_age = Gauge(
            "epoxi_router_registry_view_age_seconds",
            "Seconds since the registry last answered the router's watch of the nodes.",
            registry=registry,
        )
        self._route_seconds = Histogram(
            "epoxi_router_route_seconds",
            "How long a RouteEmails or RouteRawEmail call took to route.",
            buckets=ROUTE_BUCKETS,
            registry=registry,
        )
        self._answered_at: Callable[[], float] | None = None

    def watch_view(self, answered_at: Callable[[], float]) -> None:
        """Read the view's age at each scrape from ``answered_at()`` (a ``time.monotonic()``)."""
        self._answered_at = answered_at

    async def before_scrape(self) -> None:
        if self.on and self._answered_at is not None:
            self._view_age.set(max(0.0, time.monotonic() - self._answered_at()))

    def invalid(self, emails: int) -> None:
        if self.on:
            self._emails["invalid"].inc(emails)

    def placement(self, decision: str) -> None:
        if self.on:
            self._placements[decision].inc()

    def batch(self, result: router_pb2.BatchResult, last_node: str = "", fallback: bool = False) -> None:
        """A batch is routed: ``result`` as the response has it, ``last_node`` the last node
        tried (empty: none could be, as for the emails that got no source IP)."""
        if not self.on:
            return
        outcome = _BATCH_OUTCOMES.get(result.status, "failed")
        node = result.node or last_node or NO_NODE
        child = self._batch_children.get((node, outcome))
        if child is None:
            child = self._batch_children[(node, outcome)] = self._batches.labels(node, outcome)
        child.inc()
        self._emails[outcome].inc(result.email_count)
        if fallback:
            self._fallbacks.inc()

    def unroutable(self, emails: int) -> None:
        """A batch of emails that got no source IP: no node could be tried."""
        if not self.on:
            return
        self.batch(router_pb2.BatchResult(status=router_pb2.BATCH_STATUS_FAILED, email_count=emails))

    def routed(self, seconds: float) -> None:
        if self.on:
            self._route_seconds.observe(seconds)
