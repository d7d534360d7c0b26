"""``PUT /v1/acl/token``: tokens from service and node identities (``agent/acl_endpoint.go``,
``ACL.TokenSet``), the one way beyond the management token to get a token of the dev registry.

The registry has no policies or roles, so a token names only ``ServiceIdentities`` and
``NodeIdentities``; their rules are Consul's templated policies:

* service identity ``web``: ``service "web"`` and ``service "web-sidecar-proxy"`` write,
  ``service_prefix ""`` and ``node_prefix ""`` read (only in its ``Datacenters``, when given);
* node identity ``n1`` (in ``Datacenter``): ``node "n1"`` write, ``service_prefix ""`` read.

A ``Policies``/``Roles`` link is refused as Consul refuses one it cannot find
(``No such ACL policy with name "x"``). Texts and their order are ``TokenWriter.Create``'s (``agent/consul/auth/token_writer.go``);
identities are not deduplicated. The answer is the ``ACLToken`` JSON; ``Hash`` is a
BLAKE2b-256 of the token's fields, not Consul's exact hash. Creating needs ``acl:write`` (the
management token); with ACLs disabled the endpoint answers ``401 ACL support disabled``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import uuid
from typing import Any

from aiohttp import web

from devmesh.registry.acl import ACL, ACL_RESOURCE, NODE, READ, SERVICE, WRITE, Rule
from devmesh.registry.codec import DecodeError, ListOf, Struct, decode_body
from devmesh.registry.state import Store
from devmesh.registry.web import Handler, HTTPError, json_response

_SERVICE_IDENTITY = Struct("ACLServiceIdentity", (("ServiceName", "str"), ("Datacenters", ListOf("str"))))
_NODE_IDENTITY = Struct("ACLNodeIdentity", (("NodeName", "str"), ("Datacenter", "str")))
_LINK = Struct("ACLTokenPolicyLink", (("ID", "str"), ("Name", "str")))

ACL_TOKEN = Struct(
    "ACLToken",
    (
        ("AccessorID", "str"),
        ("SecretID", "str"),
        ("Description", "str"),
        ("Policies", ListOf(_LINK)),
        ("Roles", ListOf(_LINK)),
        ("ServiceIdentities", ListOf(_SERVICE_IDENTITY)),
        ("NodeIdentities", ListOf(_NODE_IDENTITY)),
        ("TemplatedPolicies", "any"),
        ("Local", "bool"),
        ("ExpirationTime", "any"),
        ("ExpirationTTL", "duration"),
    ),
)

# structs.isValidServiceIdentityName / validateNodeIdentityName
_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
RESERVED_PREFIX = "00000000-0000-0000-0000-0000000000"  # structs.ACLReservedPrefix
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def identity_rules(token: dict[str, Any], datacenter: str) -> tuple[Rule, ...]:
    """The templated policies of a token's service and node identities, in ``datacenter``."""
    rules: list[Rule] = []
    for service in token.get("ServiceIdentities") or []:
        if service.get("Datacenters") and datacenter not in service["Datacenters"]:
            continue
        name = service["ServiceName"]
        rules += [
            Rule(SERVICE, name, False, WRITE),
            Rule(SERVICE, f"{name}-sidecar-proxy", False, WRITE),
            Rule(SERVICE, "", True, READ),
            Rule(NODE, "", True, READ),
        ]
    for node in token.get("NodeIdentities") or []:
        if node["Datacenter"] != datacenter:
            continue
        rules += [Rule(NODE, node["NodeName"], False, WRITE), Rule(SERVICE, "", True, READ)]
    return tuple(rules)


def _invalid(reason: str) -> HTTPError:
    return HTTPError(500, f"Invalid Token: {reason}")  # an ACL.TokenSet error: wrap writes 500


class ACLTokenEndpoints:
    def __init__(self, store: Store, acl: ACL) -> None:
        self.store = store
        self.acl = acl

    async def create(self, request: web.Request) -> web.StreamResponse:
        if not self.acl.enabled:
            raise HTTPError(401, "ACL support disabled")
        try:
            token = decode_body(await request.read(), ACL_TOKEN)
        except DecodeError as exc:
            raise HTTPError(400, f"Token decoding failed: {exc}") from None
        self.acl.require(self.acl.resolve(request), ACL_RESOURCE, WRITE, "")
        self._validate(token)
        accessor_id = token.get("AccessorID") or str(uuid.uuid4())
        secret_id = token.get("SecretID") or str(uuid.uuid4())
        services = [
            {
                "ServiceName": s["ServiceName"],
                **({"Datacenters": s["Datacenters"]} if s.get("Datacenters") else {}),
            }
            for s in token.get("ServiceIdentities") or []
        ]
        nodes = [
            {"NodeName": n["NodeName"], "Datacenter": n["Datacenter"]}
            for n in token.get("NodeIdentities") or []
        ]
        body: dict[str, Any] = {"AccessorID": accessor_id, "SecretID": secret_id}
        body["Description"] = token.get("Description", "")
        if services:
            body["ServiceIdentities"] = services
        if nodes:
            body["NodeIdentities"] = nodes
        body["Local"] = bool(token.get("Local"))
        body["CreateTime"] = datetime.datetime.now().astimezone().isoformat()
        digest = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=32).digest()
        body["Hash"] = base64.b64encode(digest).decode()
        index = self.store.record("acl-tokens")
        body["CreateIndex"] = body["ModifyIndex"] = index
        rules = identity_rules(
            {"ServiceIdentities": services, "NodeIdentities": nodes}, self.store.config.datacenter
        )
        self.acl.tokens[secret_id] = (accessor_id, rules)
        return json_response(body)

    def _in_use(self, id_: str) -> bool:
        """``tokenIDInUse``: an AccessorID or SecretID of any token."""
        accessors = {accessor for accessor, _ in self.acl.tokens.values()} | {self.acl.management_accessor_id}
        return id_ in accessors or id_ in self.acl.tokens or self.acl.is_management(id_)

    def _validate(self, token: dict[str, Any]) -> None:
        """``TokenWriter.Create`` and ``write``, in their order."""
        for field in ("AccessorID", "SecretID"):
            value = token.get(field, "")
            if not value:
                continue
            if value.startswith(RESERVED_PREFIX):
                raise _invalid(f'{field} - UUIDs with the prefix "{RESERVED_PREFIX}" are reserved')
            if not _UUID.match(value):
                raise _invalid(f"{field} - not a valid UUID")
            if self._in_use(value):
                raise _invalid(f"{field} is already in use")
        for kind, links in (("role", token.get("Roles")), ("policy", token.get("Policies"))):
            for link in links or []:  # the dev registry has neither
                what = f'ID "{link["ID"]}"' if link.get("ID") else f'name "{link.get("Name", "")}"'
                raise HTTPError(500, f"No such ACL {kind} with {what}")
        for service in token.get("ServiceIdentities") or []:
            name = service.get("ServiceName", "")
            if not name:
                raise HTTPError(500, "Service identity is missing the service name field on this token")
            if token.get("Local") and service.get("Datacenters"):
                raise HTTPError(
                    500, f'Service identity "{name}" cannot specify a list of datacenters on a local token'
                )
            if not _IDENTITY_NAME.match(name):
                raise HTTPError(
                    500,
                    f'Service identity "{name}" has an invalid name. Only lowercase alphanumeric '
                    "characters, '-' and '_' are allowed",
                )
        for node in token.get("NodeIdentities") or []:
            if not node.get("NodeName"):
                raise HTTPError(500, "Node identity is missing the node name field on this token")
            if not node.get("Datacenter"):
                raise HTTPError(500, "Node identity is missing the datacenter field on this token")
            if not _IDENTITY_NAME.match(node["NodeName"]):
                raise HTTPError(
                    500,
                    "Node identity has an invalid name. Only lowercase alphanumeric characters, "
                    "'-' and '_' are allowed",
                )

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [("/v1/acl/token", ("PUT",), self.create)]
