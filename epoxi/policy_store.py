"""Named pipeline policies kept in the registry's KV store, and which routing key uses which.

Layout (values are what ``curl -X PUT --data`` stores)::

    epoxi/policies/<name>                   protobuf JSON of epoxi.v1.PipelinePolicy
    epoxi/policy-assignments/<routing_key>  the name of a policy, as plain text

A node starting a pipeline without a policy in the request uses the policy assigned to its
routing key, else the policy named ``default``, else the built-in defaults. A running pipeline
follows its routing key's assignment, and otherwise the stored policy whose name it carries.
A stored policy that does not parse or validate is reported and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from epoxi import policy as policy_rules
from epoxi.policy import Policy
from epoxi.registry.client import Consul
from epoxi.shaping import ShapingTable
from epoxi.v1 import pipeline_pb2

POLICIES = "epoxi/policies/"
ASSIGNMENTS = "epoxi/policy-assignments/"
DEFAULT_POLICY = "default"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

Entry = dict[str, Any]


class PolicyError(ValueError):
    """A stored policy or assignment that cannot be used."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise PolicyError(f"policy name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def encode(p: pipeline_pb2.PipelinePolicy) -> bytes:
    return json_format.MessageToJson(p, indent=None).encode()


def decode(name: str, raw: bytes | None) -> Policy:
    """The policy stored as ``name``; PolicyError says why it cannot be used."""
    check_name(name)
    if not raw:
        raise PolicyError(f"policy {name!r} is empty")
    proto = pipeline_pb2.PipelinePolicy()
    try:
        json_format.Parse(raw, proto)
    except json_format.ParseError as e:
        raise PolicyError(f"policy {name!r} is not a PipelinePolicy in JSON: {e}") from None
    if proto.name and proto.name != name:
        raise PolicyError(f"policy {name!r} carries the name {proto.name!r}; leave it out or make them equal")
    problems = policy_rules.validate(proto)
    if problems:
        raise PolicyError(f"policy {name!r}: " + "; ".join(problems))
    return Policy.from_proto(proto, name)


@dataclass(frozen=True)
class PolicyTable:
    """What the KV store holds: valid policies by name, and policy names by routing key."""

    policies: Mapping[str, Policy] = field(default_factory=dict)
    assignments: Mapping[str, str] = field(default_factory=dict)
    # Shaping rules and MX sites (``epoxi.shaping``), kept beside the policies.
    shaping: ShapingTable = field(default_factory=ShapingTable)

    def named(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def for_new_pipeline(self, routing_key: str) -> Policy | None:
        """The assigned policy, else ``default``; None: use the built-in defaults."""
        assigned = self.assignments.get(routing_key)
        if assigned is not None and assigned in self.policies:
            return self.policies[assigned]
        return self.policies.get(DEFAULT_POLICY)

    def for_running_pipeline(self, routing_key: str, current: Policy) -> Policy:
        """The assigned policy, else the stored policy named like ``current``, else ``current``."""
        assigned = self.assignments.get(routing_key)
        if assigned is not None and assigned in self.policies:
            return self.policies[assigned]
        return self.policies.get(current.name, current)


def read_policies(
    entries: list[Entry] | None, previous: Mapping[str, Policy]
) -> tuple[dict[str, Policy], list[str]]:
    """Policies from a recursive read of ``POLICIES``, and the problems found.

    A policy that became invalid keeps its previous valid version, if any."""
    policies: dict[str, Policy] = {}
    problems: list[str] = []
    for e in entries or []:
        name = str(e["Key"]).removeprefix(POLICIES)
        if not name or name.endswith("/"):
            continue  # a "folder" key
        try:
            policies[name] = decode(name, e.get("Value"))
        except PolicyError as err:
            kept = previous.get(name)
            problems.append(f"{err} ({'keeping the previous version' if kept else 'ignored'})")
            if kept is not None:
                policies[name] = kept
    return policies, problems


def read_assignments(entries: list[Entry] | None) -> tuple[dict[str, str], list[str]]:
    assignments: dict[str, str] = {}
    problems: list[str] = []
    for e in entries or []:
        key = str(e["Key"]).removeprefix(ASSIGNMENTS)
        if not key or key.endswith("/"):
            continue
        value = (e.get("Value") or b"").decode(errors="replace").strip()
        try:
            assignments[key] = check_name(value)
        except PolicyError as err:
            problems.append(f"assignment of {key}: {err} (ignored)")
    return assignments, problems


# Reading and writing through the registry client.


async def put_policy(consul: Consul, name: str, p: pipeline_pb2.PipelinePolicy) -> None:
    """Store ``p`` as ``name`` once it validates (its name field is left out)."""
    stored = pipeline_pb2.PipelinePolicy()
    stored.CopyFrom(p)
    stored.ClearField("name")
    decode(name, encode(stored))
    await consul.kv.put(POLICIES + name, encode(stored))


async def delete_policy(consul: Consul, name: str) -> None:
    await consul.kv.delete(POLICIES + check_name(name))


async def assign(consul: Consul, routing_key: str, name: str) -> None:
    await consul.kv.put(ASSIGNMENTS + routing_key, check_name(name))


async def unassign(consul: Consul, routing_key: str) -> None:
    await consul.kv.delete(ASSIGNMENTS + routing_key)


async def read_table(consul: Consul) -> tuple[PolicyTable, list[str]]:
    """The current table (not blocking), with the problems found in it."""
    _, policy_entries = await consul.kv.get(POLICIES, recurse=True)
    _, assignment_entries = await consul.kv.get(ASSIGNMENTS, recurse=True)
    policies, problems = read_policies(policy_entries, {})
    assignments, more = read_assignments(assignment_entries)
    return PolicyTable(policies, assignments), problems + more
