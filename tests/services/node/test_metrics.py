"""The node's /metrics after a known workload, scraped over HTTP and parsed with prometheus_client.

A real node in process, delivering to a real SMTP sink that defers two recipients (451) and
refuses three (550); the node sends the three DSNs too. Every figure is asserted exactly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devmesh.sink import Sink
from epoxi.observability.config import TelemetryConfig
from epoxi.runtime.channels import channel
from epoxi.v1 import node_pb2, node_pb2_grpc
from services.node.main import NodeConfig, RunningNode, start_node
from tests.services.node.support import KEY, SENDER_KEY, email, enqueue_batch, start
from tests.support import eventually

DELIVERED = [f"ok{i}@example.com" for i in range(10)]
BOUNCED = [f"gone{i}@example.com" for i in range(3)]
DEFERRED = [f"later{i}@example.com" for i in range(2)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def node_config(node_config: NodeConfig) -> NodeConfig:
    """n1 with DSNs, and retries so far off that deferred mail stays deferred."""
    delivery = replace(node_config.delivery, dsn_from="MAILER-DAEMON@n1.epoxi.test")
    return replace(node_config, retry_base=3600.0, delivery=delivery)


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def settled(stub: node_pb2_grpc.NodeServiceStub) -> bool:
    stats = await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
    by_key = {p.routing_key: p.counters for p in stats.pipelines}
    mail, dsns = by_key.get(KEY), by_key.get(SENDER_KEY)
    return (
        mail is not None
        and dsns is not None
        and (mail.delivered, mail.bounced, mail.deferred, mail.queued, mail.in_flight) == (10, 3, 2, 0, 0)
        and (dsns.delivered, dsns.queued, dsns.in_flight) == (3, 0, 0)
    )


@pytest.fixture
async def worked(node: RunningNode, sink: Sink) -> AsyncIterator[RunningNode]:
    """``node`` once 15 emails to KEY (10 delivered, 3 bounced, 2 deferred) and 3 DSNs are done."""
    sink.replies.update(dict.fromkeys(BOUNCED, "550 5.1.1 no such user"))
    sink.replies.update(dict.fromkeys(DEFERRED, "451 4.3.0 try later"))
    async with channel(node.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        await start(stub)
        await start(stub, domain="sender.test")  # the DSNs' key, with the fast policy
        await enqueue_batch(stub, KEY, *(email(r) for r in DELIVERED + BOUNCED + DEFERRED))
        await sink.wait_for(13)  # 10 deliveries and 3 DSNs
        await eventually(lambda: settled(stub))
        yield node


async def test_the_scrape_shows_the_workload(worked: RunningNode) -> None:
    assert worked.metrics_address
    samples = await scrape(f"http://{worked.metrics_address}/metrics")

    assert value(samples, "epoxi_node_messages_accepted_total", routing_key=KEY) == 15
    deliveries = "epoxi_node_deliveries_total"
    assert value(samples, deliveries, routing_key=KEY, outcome="delivered") == 10
    assert value(samples, deliveries, routing_key=KEY, outcome="bounced") == 3
    assert value(samples, deliveries, routing_key=KEY, outcome="deferred") == 2
    assert value(samples, deliveries, routing_key=SENDER_KEY, outcome="delivered") == 3
    replies = "epoxi_node_smtp_replies_total"
    assert {
        c: value(samples, replies, routing_key=KEY, **{"class": c}) for c in ("2xx", "3xx", "4xx", "5xx")
    } == {
        "2xx": 10,
        "3xx": 0,
        "4xx": 2,
        "5xx": 3,
    }
    assert value(samples, "epoxi_node_dsns_total") == 3

    # Scrape time: only KEY has unfinished mail, its two deferred recipients.
    assert labelled(samples, "epoxi_node_queue_messages") == {
        frozenset({("routing_key", KEY), ("state", "queued")}): 0,
        frozenset({("routing_key", KEY), ("state", "in_flight")}): 0,
        frozenset({("routing_key", KEY), ("state", "deferred")}): 2,
    }
    [(labels, age)] = labelled(samples, "epoxi_node_oldest_queued_age_seconds").items()
    assert labels == frozenset({("routing_key", KEY)}) and age > 0
    assert value(samples, "epoxi_node_pipelines", state="running") == 2
    assert value(samples, "epoxi_node_pipelines", state="failed") == 0

    latency = "epoxi_node_delivery_latency_seconds"
    assert value(samples, f"{latency}_count", routing_key=KEY) == 10
    assert value(samples, f"{latency}_count", routing_key=SENDER_KEY) == 3
    assert (value(samples, f"{latency}_sum", routing_key=KEY) or 0) > 0

    # Every message to KEY went over a connection: opened for it, or reused from an earlier one.
    opened = value(samples, "epoxi_node_smtp_connections_opened_total", routing_key=KEY) or 0
    reused = value(samples, "epoxi_node_smtp_connection_reuses_total", routing_key=KEY) or 0
    assert opened >= 1 and opened + reused == 15
    assert value(samples, "epoxi_node_smtp_tls_total", routing_key=KEY) == 0  # the sink offers none
    assert value(samples, "epoxi_node_host_backoffs_total", routing_key=KEY) == 0

    # One commit for the batch, and the DSNs' (those spooled at once share a commit); every
    # counted commit is timed under its operation, and every one is synced but the claims'.
    commits = "epoxi_node_spool_commit_seconds_count"
    assert 2 <= (value(samples, commits, operation="enqueue") or 0) <= 4
    claims = value(samples, commits, operation="claim") or 0
    assert claims >= 1
    assert sum(labelled(samples, commits).values()) - claims == value(
        samples, "epoxi_node_spool_fsyncs_total"
    )
    assert (value(samples, commits, operation="record") or 0) >= 1

    handled = "epoxi_grpc_server_handled_total"
    assert value(samples, handled, method="epoxi.v1.NodeService/EnqueueBatch", code="OK") == 1
    assert value(samples, "epoxi_build_info", service="node", version="0.1.0") == 1


async def test_a_host_that_refuses_connections_is_counted_as_a_backoff(
    node_config: NodeConfig, sink: Sink
) -> None:
    await sink.stop()  # nothing listens at the route any more
    async with await start_node(node_config) as node, channel(node.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        await start(stub)
        await enqueue_batch(stub, KEY, email("a@example.com"))
        url = f"http://{node.metrics_address}/metrics"

        async def backed_off() -> Samples | None:
            samples = await scrape(url)
            return samples if value(samples, "epoxi_node_host_backoffs_total", routing_key=KEY) else None

        samples = await eventually(backed_off)
        assert value(samples, "epoxi_node_host_backoffs_total", routing_key=KEY) == 1
        assert value(samples, "epoxi_node_smtp_connections_opened_total", routing_key=KEY) == 0


async def test_with_metrics_off_the_node_serves_none(node_config: NodeConfig) -> None:
    config = replace(node_config, telemetry=TelemetryConfig(metrics_listen="off"))
    async with await start_node(config) as node:
        assert node.metrics_address == ""
        assert node.metrics.registry is None
        assert node.metrics.key(KEY) is node.metrics.key("other_127_0_0_2")  # the no-op one


async def test_a_shaping_rule_in_force_shows_in_the_scrape_and_the_state_line(
    node: RunningNode, sink: Sink
) -> None:
    sink.replies["slow@example.com"] = "421 4.7.0 Try again later"  # the built-in try-again-later
    async with channel(node.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        await start(stub)
        await enqueue_batch(stub, KEY, email("slow@example.com"))
        url = f"http://{node.metrics_address}/metrics"

        async def shaped() -> Samples | None:
            samples = await scrape(url)
            return samples if value(samples, "epoxi_node_shaping_factor", routing_key=KEY) else None

        samples = await eventually(shaped)
        assert value(samples, "epoxi_node_shaping_factor", routing_key=KEY) == 0.5
        active = {"routing_key": KEY, "action": "throttle", "rule": "try-again-later"}
        assert value(samples, "epoxi_node_shaping_active", **active) == 1
        until = value(samples, "epoxi_node_shaping_until_timestamp_seconds", routing_key=KEY)
        assert until is not None and time.time() < until <= time.time() + 300  # the rule's 5 minutes
        p = node.supervisor.pipeline(KEY)
        assert p is not None
        line = p.state_line(await p.counts())
        # example.com goes to the sink by the catch-all route: a site of its own.
        assert "; example.com x0.5 by rule try-again-later until " in line
