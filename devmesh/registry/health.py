"""The health endpoints (``agent/health_endpoint.go``), all blocking queries.

``/v1/health/service/:name`` returns one ``CheckServiceNode`` per instance with the node's
checks first (``serfHealth``) and then the service's, each sorted by check ID. ``?tag`` may be
repeated and every tag must match (case-insensitively, as the catalog index is). ``?passing`` is
applied after the query, so ``X-Consul-Index`` is that of the unfiltered result, and it drops
instances the way ``filterNonPassing`` does: a failing entry is swapped with the last one.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devmesh.registry.acl import ACL, NODE, READ, SERVICE, Identity
from devmesh.registry.blocking import blocking_query, parse_query_options
from devmesh.registry.state import PASSING, Check, Service, Store
from devmesh.registry.views import health_check, node_service
from devmesh.registry.web import Handler, bad_request, json_response, meta_headers, parse_bool_param


def has_tags(service: Service, tags: list[str]) -> bool:
    """``serviceTagsFilter``: every requested tag is present, compared case-insensitively."""
    present = {tag.lower() for tag in service.tags}
    return all(tag.lower() in present for tag in tags)


def filter_non_passing(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``filterNonPassing``, including its swap-with-last reordering."""
    out = list(nodes)
    n = len(out)
    i = 0
    while i < n:
        if any(check["Status"] != PASSING for check in out[i]["Checks"]):
            out[i], out[n - 1] = out[n - 1], out[i]
            n -= 1
            continue
        i += 1
    return out[:n]


class HealthEndpoints:
    def __init__(self, store: Store, acl: ACL) -> None:
        self.store = store
        self.acl = acl

    def _can_read_node(self, identity: Identity) -> bool:
        return identity.can(NODE, READ, self.store.config.node_name)

    def _can_read_check(self, identity: Identity, check: Check) -> bool:
        """``filterHealthChecks``: node:read on its node, and service:read on its service if any."""
        return self._can_read_node(identity) and (
            not check.service_name or identity.can(SERVICE, READ, check.service_name)
        )

    async def service_nodes(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/health/service/")
        tags = request.query.getall("tag", [])

        if not name:
            self._missing_after_parse(request, "Missing service name")
        identity = self.acl.resolve_query(request, self.store.config.datacenter)

        def query() -> tuple[int, tuple[list[dict[str, Any]], bool]]:
            node = self.store.node_json()
            matching = [s for s in self.store.instances(name) if has_tags(s, tags)]
            # CheckServiceNode.CanRead: node:read and service:read.
            readable = [
                s for s in matching if self._can_read_node(identity) and identity.can(SERVICE, READ, s.name)
            ]
            nodes = [
                {
                    "Node": node,
                    "Service": node_service(service),
                    "Checks": [health_check(c) for c in self.store.checks_of(service.id)],
                }
                for service in readable
            ]
            return self.store.service_index(name, with_checks=True), (nodes, len(readable) != len(matching))

        index, (nodes, removed) = await blocking_query(self.store, request, query, filtered=True)
        try:
            passing = parse_bool_param(request, "passing")
        except ValueError:
            raise bad_request("Invalid value for ?passing") from None
        if passing:
            nodes = filter_non_passing(nodes)
        return json_response(nodes, meta_headers(index) | identity.filtered(removed))

    def _missing_after_parse(self, request: web.Request, reason: str) -> None:
        parse_query_options(request, self.store.config.datacenter)
        raise bad_request(reason)

    async def _checks_response(self, request: web.Request, select: Any) -> web.StreamResponse:
        identity = self.acl.resolve_query(request, self.store.config.datacenter)

        def query() -> tuple[int, tuple[list[dict[str, Any]], bool]]:
            chosen: list[Check] = sorted(
                (c for c in self.store.checks.values() if select(c)),
                key=lambda c: (c.service_name, c.check_id),
            )
            readable = [c for c in chosen if self._can_read_check(identity, c)]
            return self.store.table_index("checks"), (
                [health_check(c) for c in readable],
                len(readable) != len(chosen),
            )

        index, (checks, removed) = await blocking_query(self.store, request, query, filtered=True)
        return json_response(checks, meta_headers(index) | identity.filtered(removed))

    async def service_checks(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/health/checks/")
        if not name:
            self._missing_after_parse(request, "Missing service name")
        return await self._checks_response(request, lambda c: c.service_name.lower() == name.lower())

    async def checks_in_state(self, request: web.Request) -> web.StreamResponse:
        state = request.path.removeprefix("/v1/health/state/")
        if not state:
            self._missing_after_parse(request, "Missing check state")
        return await self._checks_response(request, lambda c: state == "any" or c.status == state)

    async def node_checks(self, request: web.Request) -> web.StreamResponse:
        node = request.path.removeprefix("/v1/health/node/")
        if not node:
            self._missing_after_parse(request, "Missing node name")
        return await self._checks_response(request, lambda c: c.node.lower() == node.lower())

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [
            ("/v1/health/service/", ("GET",), self.service_nodes),
            ("/v1/health/checks/", ("GET",), self.service_checks),
            ("/v1/health/state/", ("GET",), self.checks_in_state),
            ("/v1/health/node/", ("GET",), self.node_checks),
        ]
