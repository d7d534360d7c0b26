"""The catalog endpoints (``agent/catalog_endpoint.go``), all blocking queries.

The catalog holds the dev node, the ``consul`` service the server registers for itself, and
every service the agent synced. Service names match case-insensitively; ``?tag`` may repeat.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devmesh.registry.blocking import blocking_query, parse_query_options
from devmesh.registry.health import has_tags
from devmesh.registry.state import Store
from devmesh.registry.views import node_service, service_node
from devmesh.registry.web import Handler, bad_request, json_response, meta_headers


class CatalogEndpoints:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def services(self, request: web.Request) -> web.StreamResponse:
        def query() -> tuple[int, dict[str, list[str]]]:
            names: dict[str, set[str]] = {}
            for service in self.store.services.values():
                names.setdefault(service.name, set()).update(service.tags)
            return self.store.table_index("services"), {
                name: sorted(tags) for name, tags in sorted(names.items())
            }

        index, services = await blocking_query(self.store, request, query, filtered=True)
        return json_response(services, meta_headers(index))

    async def service_nodes(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/catalog/service/")
        tags = request.query.getall("tag", [])
        if not name:
            parse_query_options(request, self.store.config.datacenter)
            raise bad_request("Missing service name")

        def query() -> tuple[int, list[dict[str, Any]]]:
            node = self.store.node_json()
            found = [service_node(s, node) for s in self.store.instances(name) if has_tags(s, tags)]
            return self.store.service_index(name, with_checks=False), found

        index, nodes = await blocking_query(self.store, request, query, filtered=True)
        return json_response(nodes, meta_headers(index))

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        index, nodes = await blocking_query(
            self.store,
            request,
            lambda: (self.store.table_index("nodes"), [self.store.node_json()]),
            filtered=True,
        )
        return json_response(nodes, meta_headers(index))

    async def node_services(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/v1/catalog/node/")
        if not name:
            parse_query_options(request, self.store.config.datacenter)
            raise bad_request("Missing node name")

        def query() -> tuple[int, dict[str, Any] | None]:
            index = self.store.table_index("nodes", "services")
            if name.lower() != self.store.config.node_name.lower():
                return index, None
            services = {
                s.id: node_service(s) for s in sorted(self.store.services.values(), key=lambda s: s.id)
            }
            return index, {"Node": self.store.node_json(), "Services": services}

        index, found = await blocking_query(self.store, request, query, filtered=True)
        return json_response(found, meta_headers(index))

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
