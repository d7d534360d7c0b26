"""The catalog endpoints (``agent/catalog_endpoint.go``), all blocking queries.

The catalog holds the dev node, the ``consul`` service the server registers for itself, and
every service the agent synced. Service names match case-insensitively; ``?tag`` may repeat.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devmesh.registry.acl import ACL, NODE, READ, SERVICE
from devmesh.registry.blocking import blocking_query, parse_query_options
from devmesh.registry.health import has_tags
from devmesh.registry.state import Store
from devmesh.registry.views import node_service, service_node
from devmesh.registry.web import Handler, bad_request, json_response, meta_headers


class CatalogEndpoints:
    def __init__(self, store: Store, acl: ACL) -> None:
        self.store = store
        self.acl = acl

    async def services(self, request: web.Request) -> web.StreamResponse:
        identity = self.acl.resolve_query(request, self.store.config.datacenter)

        def query() -> tuple[int, tuple[dict[str, list[str]], bool]]:
            names: dict[str, set[str]] = {}
            for service in self.store.services.values():
                names.setdefault(service.name, set()).update(service.tags)
            readable = {
                name: sorted(tags)
                for name, tags in sorted(names.items())
                if identity.can(SERVICE, READ, name)
            }
            return self.store.table_index("services"), (readable, len(readable) != len(names))

        index, (services, removed) = await blocking_query(self.store, request, query, filtered=True)
        return json_response(services, meta_headers(index) | identity.filtered(removed))

    async def service_nodes(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/catalog/service/")
        tags = request.query.getall("tag", [])
        if not name:
            parse_query_options(request, self.store.config.datacenter)
            raise bad_request("Missing service name")

        identity = self.acl.resolve_query(request, self.store.config.datacenter)
        node_name = self.store.config.node_name

        def query() -> tuple[int, tuple[list[dict[str, Any]], bool]]:
            node = self.store.node_json()
            matching = [s for s in self.store.instances(name) if has_tags(s, tags)]
            found = [
                service_node(s, node)
                for s in matching
                if identity.can(NODE, READ, node_name) and identity.can(SERVICE, READ, s.name)
            ]
            return self.store.service_index(name, with_checks=False), (found, len(found) != len(matching))

        index, (nodes, removed) = await blocking_query(self.store, request, query, filtered=True)
        return json_response(nodes, meta_headers(index) | identity.filtered(removed))

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        identity = self.acl.resolve_query(request, self.store.config.datacenter)
        readable = identity.can(NODE, READ, self.store.config.node_name)
        index, nodes = await blocking_query(
            self.store,
            request,
            lambda: (self.store.table_index("nodes"), [self.store.node_json()] if readable else []),
            filtered=True,
        )
        return json_response(nodes, meta_headers(index) | identity.filtered(not readable))

    async def node_services(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/catalog/node/")
        if not name:
            parse_query_options(request, self.store.config.datacenter)
            raise bad_request("Missing node name")

        identity = self.acl.resolve_query(request, self.store.config.datacenter)

        def query() -> tuple[int, tuple[dict[str, Any] | None, bool]]:
            index = self.store.table_index("nodes", "services")
            if name.lower() != self.store.config.node_name.lower():
                return index, (None, False)
            if not identity.can(NODE, READ, self.store.config.node_name):
                return index, (None, True)
            every = sorted(self.store.services.values(), key=lambda s: s.id)
            services = {s.id: node_service(s) for s in every if identity.can(SERVICE, READ, s.name)}
            return index, (
                {"Node": self.store.node_json(), "Services": services},
                len(services) != len(every),
            )

        index, (found, removed) = await blocking_query(self.store, request, query, filtered=True)
        return json_response(found, meta_headers(index) | identity.filtered(removed))

    async def datacenters(self, request: web.Request) -> web.StreamResponse:
        return json_response([self.store.config.datacenter])

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [
            ("/v1/catalog/services", ("GET",), self.services),
            ("/v1/catalog/service/", ("GET",), self.service_nodes),
            ("/v1/catalog/nodes", ("GET",), self.nodes),
            ("/v1/catalog/node/", ("GET",), self.node_services),
            ("/v1/catalog/datacenters", ("GET",), self.datacenters),
        ]
