"""How nodes and pipelines appear in the registry, and how to read them back.

A node is a service ``epoxi-node`` (ID = node ID) with a GRPC check on its own address;
its egress IPs are tags ``ip:<addr>`` so a health query can filter on them.
A pipeline is a service ``epoxi-pipeline`` tagged with its routing key and ``node:<id>``, with
a TTL check the node refreshes; the check's Output is the pipeline's state for an operator.
A service that serves Prometheus metrics names their address in its Meta as ``metrics``
(``with_metrics``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2

from epoxi import durations
from epoxi.v1 import node_pb2, pipeline_pb2

NODE_SERVICE = "epoxi-node"
PIPELINE_SERVICE = "epoxi-pipeline"
IP_TAG = "ip:"
NODE_TAG = "node:"

Entry = dict[str, Any]


def pipeline_service_id(node_id: str, routing_key: str) -> str:
    return f"{PIPELINE_SERVICE}-{node_id}-{routing_key}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def node_registration(node: node_pb2.NodeInfo, check_interval: str, deregister_after: str) -> dict[str, Any]:
    """Keyword arguments for ``agent.service.register``."""
    host, port = split_address(node.address)
    return {
        "name": NODE_SERVICE,
        "service_id": node.id,
        "address": host,
        "port": port,
        "tags": [f"{IP_TAG}{ip}" for ip in node.egress_ips] + [f"pool:{node.ip_pool}"],
        "meta": {
            "egress_ips": ",".join(node.egress_ips),
            "ip_pool": node.ip_pool,
            "pipeline_count": str(node.pipeline_count),
            "load": str(node.load),
        },
        "check": {
            "Name": "node gRPC health",
            # The node registers itself, so it is up: passing from the start, which its registry
            # session (epoxi.registry.ownership) needs.
            "Status": "passing",
            "GRPC": node.address,
            "Interval": check_interval,
            # A probe that times out ends the node's registry session, and so frees its keys. The
            # registry probes at most once a second, so a shorter interval gets a 1 s timeout.
            "Timeout": durations.format(max(durations.parse(check_interval), durations.SECOND)),
            "DeregisterCriticalServiceAfter": deregister_after,
        },
    }


def pipeline_registration(p: pipeline_pb2.PipelineInfo, ttl: str, deregister_after: str) -> dict[str, Any]:
    """The check starts critical; the node's first TTL pass, carrying the state line, turns it
    passing (a status change, which Consul syncs to the catalog at once)."""
    host, port = split_address(p.address)
    return {
        "name": PIPELINE_SERVICE,
        "service_id": p.name,
        "address": host,
        "port": port,
        "tags": [p.routing_key, f"{NODE_TAG}{p.node}"],
        "meta": {
            "routing_key": p.routing_key,
            "node": p.node,
            "domain": p.domain,
            "source_ip": p.source_ip,
            "started_at": p.started_at.ToJsonString(),
            "policy": json_format.MessageToJson(p.policy, indent=None),
            "site": p.site,
        },
        "check": {
            "Name": "pipeline state",
            "TTL": ttl,
            "DeregisterCriticalServiceAfter": deregister_after,
        },
    }


def pipeline_check_id(service_id: str) -> str:
    """Consul's generated ID for a service's single check."""
    return f"service:{service_id}"


def passing(entry: Entry) -> bool:
    return all(c.get("Status") == "passing" for c in entry.get("Checks") or [])


def worst_status(entry: Entry) -> str:
    order = {"passing": 0, "warning": 1, "critical": 2}
    statuses = [c.get("Status", "critical") for c in entry.get("Checks") or []]
    return max(statuses, key=lambda s: order.get(s, 2), default="critical")


def _address(service: Entry, entry: Entry) -> str:
    host = service.get("Address") or entry.get("Node", {}).get("Address", "")
    return f"{host}:{service.get('Port', 0)}"


def node_from_entry(entry: Entry) -> node_pb2.NodeInfo:
    service = entry["Service"]
    meta = service.get("Meta") or {}
    return node_pb2.NodeInfo(
        id=service["ID"],
        address=_address(service, entry),
        egress_ips=[ip for ip in meta.get("egress_ips", "").split(",") if ip],
        ip_pool=meta.get("ip_pool", ""),
        pipeline_count=int(meta.get("pipeline_count") or 0),
        load=int(meta.get("load") or 0),
    )


def pipeline_from_entry(entry: Entry) -> pipeline_pb2.PipelineInfo:
    service = entry["Service"]
    meta = service.get("Meta") or {}
    info = pipeline_pb2.PipelineInfo(
        name=service["ID"],
        routing_key=meta.get("routing_key", ""),
        node=meta.get("node", ""),
        address=_address(service, entry),
        domain=meta.get("domain", ""),
        source_ip=meta.get("source_ip", ""),
        site=meta.get("site", ""),
        healthy=passing(entry),
        status=pipeline_pb2.PIPELINE_STATUS_RUNNING
        if passing(entry)
        else pipeline_pb2.PIPELINE_STATUS_FAILED,
    )
    if meta.get("policy"):
        json_format.Parse(meta["policy"], info.policy)
    if meta.get("started_at"):
        ts = timestamp_pb2.Timestamp()
        ts.FromJsonString(meta["started_at"])
        info.started_at.CopyFrom(ts)
    return info


def check_outputs(entry: Entry) -> list[str]:
    return [str(c.get("Output", "")) for c in entry.get("Checks") or [] if c.get("ServiceID")]


def grpc_service_registration(
    name: str, service_id: str, address: str, check_interval: str
) -> dict[str, Any]:
    """A plain gRPC service (router, monitor) with a GRPC health check on its own address."""
    host, port = split_address(address)
    return {
        "name": name,
        "service_id": service_id,
        "address": host,
        "port": port,
        "check": {
            "Name": f"{name} gRPC health",
            "GRPC": address,
            "Interval": check_interval,
            "Timeout": check_interval,
            "DeregisterCriticalServiceAfter": "1m",
        },
    }


METRICS_META = "metrics"
_WILDCARDS = {"", "0.0.0.0", "::"}


def with_metrics(registration: dict[str, Any], metrics_address: str) -> dict[str, Any]:
    """``registration`` with the service's ``/metrics`` address (``host:port``) in its Meta as
    ``metrics``, where Prometheus's consul_sd finds it (``__meta_consul_service_metadata_metrics``);
    unchanged when the service serves no metrics (``metrics_address`` empty). A wildcard host
    (``0.0.0.0``, ``::``) becomes the host the service registers, the one others reach it at."""
    if not metrics_address:
        return registration
    host, _, port = metrics_address.rpartition(":")
    if host.strip("[]") in _WILDCARDS and registration.get("address"):
        own = str(registration["address"])
        metrics_address = f"[{own}]:{port}" if ":" in own else f"{own}:{port}"
    meta = {**(registration.get("meta") or {}), METRICS_META: metrics_address}
    return {**registration, "meta": meta}
