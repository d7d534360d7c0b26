"""The KV endpoint (``agent/kvs_endpoint.go``, ``agent/consul/kvs_endpoint.go``, ``state/kvs.go``).

* ``GET`` returns ``[DirEntry]`` (``?recurse`` for a prefix, ``?keys`` with ``?separator`` for
  key names, ``?raw`` for the bare value); nothing found is ``404`` with an empty body.
* ``PUT`` answers ``true``/``false``: ``?cas=0`` creates only, ``?cas=N`` needs ModifyIndex N,
  ``?acquire=<session>`` locks (refused during a lock-delay), ``?release=<session>`` unlocks.
  A plain ``PUT`` keeps the lock holder but, as in Consul, resets ``LockIndex`` to 0. An unknown or
  empty session is ``500 raft apply failed: invalid session "<id>"`` / ``missing session``.
* A ``PUT`` whose Content-Length is over ``KV_MAX_VALUE_SIZE`` (``kv_max_value_size``, 512 KiB)
  is ``413 Request body(N bytes) too large, ...``, before the body is read; a chunked body has
  no Content-Length (Go: -1) and is taken whole, as Consul takes it.
* ``DELETE`` answers ``true``; ``?cas=N`` answers whether it deleted (a missing key counts).
* The index of one key is its ModifyIndex, or the KV table's when it is missing; of a prefix,
  the highest ModifyIndex or tombstone under it. Deleted keys leave tombstones so that index
  never goes backwards.
"""

from __future__ import annotations

import urllib.parse

from aiohttp import web

from devmesh.registry.acl import ACL, KEY, READ, WRITE, Identity
from devmesh.registry.blocking import blocking_query, parse_query_options
from devmesh.registry.state import KVEntry, Store, StoreError
from devmesh.registry.views import kv_entry
from devmesh.registry.web import Handler, HTTPError, bad_request, json_response, meta_headers, param
from epoxi import durations

KV_MAX_VALUE_SIZE = 512 * 1024  # raft.SuggestedMaxDataSize


def _parse_uint(request: web.Request, name: str) -> int:
    raw = param(request, name)
    if not raw.isascii() or not raw.isdigit():
        raise HTTPError(500, f"strconv.ParseUint: parsing {durations.go_quote(raw)}: invalid syntax")
    value = int(raw)
    if value >= 2**64:
        raise HTTPError(500, f"strconv.ParseUint: parsing {durations.go_quote(raw)}: value out of range")
    return value


def _conflicting_flags(request: web.Request, *flags: str) -> None:
    if sum(1 for flag in flags if flag in request.query) > 1:
        pairs = sorted(request.query.items(), key=lambda pair: pair[0])
        raise bad_request(f"Conflicting flags: {urllib.parse.urlencode(pairs)}\n")


def _readable(identity: Identity, entries: list[KVEntry]) -> list[KVEntry]:
    """``FilterDirEnt``: the entries whose key the token may read."""
    return [e for e in entries if identity.can(KEY, READ, e.key)]


class KVEndpoints:
    def __init__(self, store: Store, acl: ACL) -> None:
        self.store = store
        self.acl = acl

    async def endpoint(self, request: web.Request) -> web.StreamResponse:
        parse_query_options(request, self.store.config.datacenter)
        key = request.path.removeprefix("/v1/kv/")
        if request.method == "GET":
            if "keys" in request.query:
                return await self.get_keys(request, key)
            return await self.get(request, key)
        if request.method == "PUT":
            return await self.put(request, key)
        return await self.delete(request, key)

    async def get(self, request: web.Request, key: str) -> web.StreamResponse:
        recurse = "recurse" in request.query
        if not recurse and key == "":
            raise bad_request("Missing key name")
        identity = self.acl.resolve(request)
        if not recurse:
            self.acl.require(identity, KEY, READ, key)

        def query() -> tuple[int, tuple[list[KVEntry], bool]]:
            if recurse:
                index, every = self.store.kv_list(key)
                readable = _readable(identity, every)
                return index, (readable, len(readable) != len(every))
            entry = self.store.kv.get(key)
            if entry is None:
                return self.store.kv_max_index(), ([], False)
            return entry.modify_index, ([entry], False)

        index, (entries, removed) = await blocking_query(self.store, request, query)
        headers = meta_headers(index) | identity.filtered(removed)
        if not entries:
            return web.Response(status=404, headers=headers)
        if "raw" in request.query and not recurse:
            body = entries[0].value or b""
            headers |= {
                "Content-Type": "text/plain",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "sandbox",
            }
            return web.Response(status=200, body=body, headers=headers)
        return json_response([kv_entry(e) for e in entries], headers)

    async def get_keys(self, request: web.Request, prefix: str) -> web.StreamResponse:
        separator = param(request, "seperator") if "seperator" in request.query else ""
        if "separator" in request.query:
            separator = param(request, "separator")

        identity = self.acl.resolve(request)

        def query() -> tuple[int, tuple[list[str], bool]]:
            index, every = self.store.kv_list(prefix)
            entries = _readable(identity, every)
            keys: list[str] = []
            for entry in entries:
                cut = entry.key.find(separator, len(prefix)) if separator else -1
                name = entry.key[: cut + len(separator)] if cut >= 0 else entry.key
                if not keys or keys[-1] != name:
                    keys.append(name)
            return index, (keys, len(entries) != len(every))

        index, (keys, removed) = await blocking_query(self.store, request, query)
        headers = meta_headers(index) | identity.filtered(removed)
        if not keys and prefix != "":
            return web.Response(status=404, headers=headers)
        return json_response(keys, headers)

    async def put(self, request: web.Request, key: str) -> web.StreamResponse:
        if key == "":
            raise bad_request("Missing key name")
        _conflicting_flags(request, "cas", "acquire", "release")
        flags = _parse_uint(request, "flags") if "flags" in request.query else 0
        cas = _parse_uint(request, "cas") if "cas" in request.query else None
        length = request.content_length or 0
        if length > KV_MAX_VALUE_SIZE:
            raise HTTPError(
                413,
                f"Request body({length} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. "
                "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
            )
        value = await request.read() or None
        self.acl.require(self.acl.resolve(request), KEY, WRITE, key)  # KVS.Apply, before the lock-delay
        try:
            if "acquire" in request.query:
                if self.store.kv_lock_delay_active(key):
                    return json_response(False)
                return json_response(self.store.kv_lock(key, value, flags, param(request, "acquire")))
            if "release" in request.query:
                return json_response(self.store.kv_unlock(key, value, flags, param(request, "release")))
        except StoreError as exc:
            raise HTTPError(500, f"raft apply failed: {exc}") from None  # KVS.Apply wraps FSM errors
        if cas is not None:
            return json_response(self.store.kv_cas(key, value, flags, cas))
        self.store.kv_set(key, value, flags)
        return json_response(True)

    async def delete(self, request: web.Request, key: str) -> web.StreamResponse:
        _conflicting_flags(request, "recurse", "cas")
        recurse = "recurse" in request.query
        if not recurse and key == "":
            raise bad_request("Missing key name")
        # KeyWritePrefix for a tree (reported as key:write on the prefix), KeyWrite otherwise.
        self.acl.require(self.acl.resolve(request), KEY, WRITE, key)
        if "cas" in request.query:
            return json_response(self.store.kv_delete_cas(key, _parse_uint(request, "cas")))
        if recurse:
            self.store.kv_delete_tree(key)
        else:
            self.store.kv_delete(key)
        return json_response(True)

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [("/v1/kv/", ("GET", "PUT", "DELETE"), self.endpoint)]
