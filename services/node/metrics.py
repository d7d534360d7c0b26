"""The node's metrics: what became of its mail, its SMTP connections, its spool and its queues.

Counted where it happens (``NodeMetrics`` is the engine's ``Instruments``, handed to the spool,
the sender, the bouncer and, through the supervisor, each pipeline):

- ``epoxi_node_messages_accepted_total{routing_key}``: messages spooled by EnqueueBatch (a
  retried batch the spool already held is not counted again);
- ``epoxi_node_deliveries_total{routing_key, outcome}``: attempts' outcomes per recipient,
  ``delivered``, ``deferred`` (to be tried again) or ``bounced``;
- ``epoxi_node_smtp_replies_total{routing_key, class}``: SMTP replies per recipient by class
  (``2xx`` to ``5xx``); a failure with no reply (no connection, DNS) has no class and is not
  counted here, only as its outcome;
- ``epoxi_node_delivery_latency_seconds{routing_key}``: a histogram of accepted (when the mesh
  first spooled the message, kept across hand-offs) to delivered, per delivered recipient;
- ``epoxi_node_smtp_connections_opened_total``, ``..._connection_reuses_total`` (a message sent
  over a connection an earlier one opened), ``epoxi_node_smtp_tls_total`` (connections upgraded
  with STARTTLS), ``epoxi_node_host_backoffs_total`` (a host refused a connection and now rests),
  all ``{routing_key}``;
- ``epoxi_node_spool_fsyncs_total`` and ``epoxi_node_spool_commit_seconds{operation}``: spool
  transactions that wrote rows and were synced (each is one commit, one fsync of the WAL under
  ``synchronous=FULL``; WAL checkpoints are not counted; a claim commits unsynced), and how long
  each transaction that wrote rows took, statements and commit; ``operation`` is the spool
  method (``enqueue``, ``record``, ``claim``, ...);
- ``epoxi_node_dsns_total``: DSNs spooled.

Read at scrape time (``refresh``, from ``Spool.backlog``):

- ``epoxi_node_queue_messages{routing_key, state}``: deliveries (a recipient each, as the
  pipeline counters count) ``queued``, ``in_flight`` or ``deferred``;
- ``epoxi_node_oldest_queued_age_seconds{routing_key}``: how long ago the oldest unfinished
  delivery's message was accepted; a key with nothing unfinished has no sample;
- ``epoxi_node_pipelines{state}``: the node's pipelines by status (``running``, ``failed``, ...).
- ``epoxi_node_shaping_factor{routing_key}``, ``epoxi_node_shaping_active{routing_key,action,rule}``
  and ``epoxi_node_shaping_until_timestamp_seconds{routing_key}``: the shaping rule in force for
  the key's (MX site, source IP) budget, if any, and when its action ends.

``NodeMetrics(None)`` (metrics off) creates nothing, and its methods return at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epoxi.shaping import action_name
from epoxi.v1 import pipeline_pb2, shaping_pb2
from services.node.engine.instruments import NO_KEY_INSTRUMENTS, Instruments, KeyInstruments
from services.node.engine.spool import Job, Outcome, Spool, State

OUTCOMES = (State.DELIVERED, State.DEFERRED, State.BOUNCED)
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")
QUEUE_STATES = {State.QUEUED: "queued", State.INFLIGHT: "in_flight", State.DEFERRED: "deferred"}
PIPELINE_STATES = tuple(
    name.removeprefix("PIPELINE_STATUS_").lower()
    for name in pipeline_pb2.PipelineStatus.keys()
    if name != "PIPELINE_STATUS_UNSPECIFIED"
)
# Accepted to delivered: from a fast local hand-over to a day of retries.
LATENCY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
    86400.0,
)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _KeyMetrics(KeyInstruments):
    """One routing key's labelled children, bound once."""

    def __init__(self, m: NodeMetrics, key: str) -> None:
        self._accepted = m._accepted.labels(key)
        self._outcomes = {s: m._deliveries.labels(key, s.value) for s in OUTCOMES}
        # Index: the reply code's first digit.
        classes = {c: m._replies.labels(key, c) for c in REPLY_CLASSES}
        self._classes: list[Any] = [None, None, *(classes[c] for c in REPLY_CLASSES)]
        self._latency = m._latency.labels(key)
        self._opened = m._opened.labels(key)
        self._reused = m._reused.labels(key)
        self._tls = m._tls.labels(key)
        self._backoffs = m._backoffs.labels(key)

    def accepted(self, messages: int) -> None:
        self._accepted.inc(messages)

    def attempted(self, job: Job, outcomes: Sequence[Outcome], now: float) -> None:
        for o in outcomes:
            self._outcomes[o.state].inc()
            code = o.reply.code
            if 200 <= code < 600:
                self._classes[code // 100].inc()
            if o.state is State.DELIVERED and job.accepted_at:
                self._latency.observe(max(0.0, now - job.accepted_at))

    def connection_opened(self, tls: bool) -> None:
        self._opened.inc()
        if tls:
            self._tls.inc()

    def connection_reused(self) -> None:
        self._reused.inc()

    def host_backoff(self) -> None:
        self._backoffs.inc()


class NodeMetrics(Instruments):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        self.on = registry is not None
        self._keys: dict[str, KeyInstruments] = {}
        if registry is None:
            return
        key = ["routing_key"]
        self._accepted = Counter(
            "epoxi_node_messages_accepted_total", "Messages spooled by EnqueueBatch.", key, registry=registry
        )
        self._deliveries = Counter(
            "epoxi_node_deliveries_total",
            "Delivery attempts' outcomes, per recipient: delivered, deferred or bounced.",
            ["routing_key", "outcome"],
            registry=registry,
        )
        self._replies = Counter(
            "epoxi_node_smtp_replies_total",
            "SMTP replies per recipient, by class (2xx to 5xx).",
            ["routing_key", "class"],
            registry=registry,
        )
        self._latency = Histogram(
            "epoxi_node_delivery_latency_seconds",
            "Seconds from when the mesh accepted a message to its delivery, per delivered recipient.",
            key,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._opened = Counter(
            "epoxi_node_smtp_connections_opened_total", "SMTP connections opened.", key, registry=registry
        )
        self._reused = Counter(
            "epoxi_node_smtp_connection_reuses_total",
            "Messages sent over a connection an earlier message opened.",
            key,
            registry=registry,
        )
        self._tls = Counter(
            "epoxi_node_smtp_tls_total", "SMTP connections upgraded with STARTTLS.", key, registry=registry
        )
        self._backoffs = Counter(
            "epoxi_node_host_backoffs_total",
            "Hosts put to rest after refusing a connection.",
            key,
            registry=registry,
        )
        self._fsyncs = Counter(
            "epoxi_node_spool_fsyncs_total",
            "Synced spool transactions that wrote rows: one commit, one fsync of the WAL each.",
            registry=registry,
        )
        self._commit = Histogram(
            "epoxi_node_spool_commit_seconds",
            "Seconds a spool transaction that wrote rows took, statements and commit, by operation.",
            ["operation"],
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self._commit_children: dict[str, Any] = {}
        self._dsns = Counter("epoxi_node_dsns_total", "DSNs spooled.", registry=registry)
        self._queue = Gauge(
            "epoxi_node_queue_messages",
            "Unfinished deliveries (a recipient each): queued, in_flight or deferred.",
            ["routing_key", "state"],
            registry=registry,
        )
        self._oldest = Gauge(
            "epoxi_node_oldest_queued_age_seconds",
            "Seconds since the oldest unfinished delivery's message was accepted.",
            key,
            registry=registry,
        )
        self._pipelines = Gauge("epoxi_node_pipelines", "Pipelines by status.", ["state"], registry=registry)
        self._shaping_factor = Gauge(
            "epoxi_node_shaping_factor",
            "What the limits of the key's (MX site, source IP) budget are multiplied by, while a"
            " shaping rule is in force.",
            key,
            registry=registry,
        )
        self._shaping_active = Gauge(
            "epoxi_node_shaping_active",
            "1 while a shaping rule's action (throttle, suspend, bounce) is in force for the key's site.",
            [*key, "action", "rule"],
            registry=registry,
        )
        self._shaping_until = Gauge(
            "epoxi_node_shaping_until_timestamp_seconds",
            "When the shaping action in force for the key's site ends (Unix time); recovery follows a throttle.",
            key,
            registry=registry,
        )
        for state in PIPELINE_STATES:
            self._pipelines.labels(state).set(0)

    # Instruments

    def key(self, routing_key: str) -> KeyInstruments:
        if not self.on:
            return NO_KEY_INSTRUMENTS
        found = self._keys.get(routing_key)
        if found is None:
            found = self._keys[routing_key] = _KeyMetrics(self, routing_key)
        return found

    def committed(self, operation: str, seconds: float, *, synced: bool = True) -> None:
        if not self.on:
            return
        if synced:
            self._fsyncs.inc()
        child = self._commit_children.get(operation)
        if child is None:
            child = self._commit_children[operation] = self._commit.labels(operation)
        child.observe(seconds)

    def dsn(self) -> None:
        if self.on:
            self._dsns.inc()

    # At scrape time

    async def refresh(
        self,
        spool: Spool,
        statuses: Iterable[pipeline_pb2.PipelineStatus.ValueType],
        shaping: Iterable[shaping_pb2.ShapingAdjustment] = (),
    ) -> None:
        """Set the queue gauges from one spool query, the pipeline gauge from ``statuses``, and
        the shaping gauges from the adjustments in force."""
        if not self.on:
            return
        backlog = await spool.backlog()
        now = time.time()
        # No await from here on: a scrape in between never sees the gauges half set.
        self._shaping_factor.clear()
        self._shaping_active.clear()
        self._shaping_until.clear()
        for a in shaping:
            for routing_key in a.routing_keys:
                self._shaping_factor.labels(routing_key).set(a.factor)
                self._shaping_active.labels(routing_key, action_name(a.action), a.rule).set(1)
                self._shaping_until.labels(routing_key).set(a.until.ToNanoseconds() / 1e9)
        self._queue.clear()
        self._oldest.clear()
        oldest: dict[str, float] = {}
        for b in backlog:
            self._queue.labels(b.routing_key, QUEUE_STATES[b.state]).set(b.deliveries)
            oldest[b.routing_key] = min(oldest.get(b.routing_key, b.oldest_accepted_at), b.oldest_accepted_at)
        for key in {b.routing_key for b in backlog}:
            for name in QUEUE_STATES.values():
                self._queue.labels(key, name)  # present at 0
        for key, at in oldest.items():
            self._oldest.labels(key).set(max(0.0, now - at))
        counts = dict.fromkeys(PIPELINE_STATES, 0)
        for status in statuses:
            name = pipeline_pb2.PipelineStatus.Name(status).removeprefix("PIPELINE_STATUS_").lower()
            counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            self._pipelines.labels(name).set(n)
