"""JSON shapes of Consul's structs (``agent/structs/structs.go``, ``api/agent.go``), key order included."""

from __future__ import annotations

import base64
from typing import Any

from devmesh.registry.state import Check, KVEntry, Service, Session

# ConnectProxyConfig.MarshalJSON for a typical service: only the non-omitempty fields remain.
_EMPTY_PROXY: dict[str, Any] = {"Mode": "", "MeshGateway": {}, "Expose": {}}


def agent_service(service: Service, datacenter: str) -> dict[str, Any]:
    """``api.AgentService`` as ``buildAgentService`` fills it."""
    out: dict[str, Any] = {}
    if service.kind:
        out["Kind"] = service.kind
    out |= {
        "ID": service.id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Meta": dict(service.meta),
        "Port": service.port,
        "Address": service.address,
    }
    if service.tagged_addresses:
        out["TaggedAddresses"] = {k: dict(v) for k, v in service.tagged_addresses.items()}
    out["Weights"] = dict(service.weights)
    out["EnableTagOverride"] = service.enable_tag_override
    out["Datacenter"] = datacenter
    return out


def node_service(service: Service) -> dict[str, Any]:
    """``structs.NodeService`` as the catalog returns it (``/v1/health/service``)."""
    out: dict[str, Any] = {}
    if service.kind:
        out["Kind"] = service.kind
    out |= {"ID": service.id, "Service": service.name, "Tags": list(service.tags), "Address": service.address}
    if service.tagged_addresses:
        out["TaggedAddresses"] = {k: dict(v) for k, v in service.tagged_addresses.items()}
    out["Meta"] = dict(service.meta)
    if service.port:
        out["Port"] = service.port
    out |= {
        "Weights": dict(service.weights),
        "EnableTagOverride": service.enable_tag_override,
        "Proxy": dict(_EMPTY_PROXY),
        "Connect": {},
        "PeerName": "",
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    }
    return out


def service_node(service: Service, node: dict[str, Any]) -> dict[str, Any]:
    """``structs.ServiceNode`` (``/v1/catalog/service/:name``)."""
    out: dict[str, Any] = {
        "ID": node["ID"],
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": node["Datacenter"],
        "TaggedAddresses": dict(node["TaggedAddresses"]),
        "NodeMeta": dict(node["Meta"]),
        "ServiceKind": service.kind,
        "ServiceID": service.id,
        "ServiceName": service.name,
        "ServiceTags": list(service.tags),
        "ServiceAddress": service.address,
    }
    if service.tagged_addresses:
        out["ServiceTaggedAddresses"] = {k: dict(v) for k, v in service.tagged_addresses.items()}
    out |= {
        "ServiceWeights": dict(service.weights),
        "ServiceMeta": dict(service.meta),
        "ServicePort": service.port,
        "ServiceSocketPath": "",
        "ServiceEnableTagOverride": service.enable_tag_override,
        "ServiceProxy": dict(_EMPTY_PROXY),
        "ServiceConnect": {},
        "ServiceLocality": None,
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    }
    return out


def health_check(check: Check) -> dict[str, Any]:
    """``structs.HealthCheck``; the agent's own view carries zero Raft indexes, as in Consul."""
    return {
        "Node": check.node,
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(check.service_tags),
        "Type": check.type,
        "Interval": check.interval,
        "Timeout": check.timeout,
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    }


def kv_entry(entry: KVEntry) -> dict[str, Any]:
    """``structs.DirEntry``: ``Value`` in base64 (``null`` when empty), ``Session`` only when held."""
    out: dict[str, Any] = {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
    }
    if entry.session:
        out["Session"] = entry.session
    out["CreateIndex"] = entry.create_index
    out["ModifyIndex"] = entry.modify_index
    return out


def session(entry: Session) -> dict[str, Any]:
    """``structs.Session``: ``LockDelay`` in nanoseconds, ``Checks`` only when set."""
    out: dict[str, Any] = {
        "ID": entry.id,
        "Name": entry.name,
        "Node": entry.node,
        "LockDelay": entry.lock_delay,
        "Behavior": entry.behavior,
        "TTL": entry.ttl,
        "NodeChecks": entry.node_checks,
        "ServiceChecks": entry.service_checks,
    }
    if entry.checks:
        out["Checks"] = entry.checks
    out["CreateIndex"] = entry.create_index
    out["ModifyIndex"] = entry.modify_index
    return out
