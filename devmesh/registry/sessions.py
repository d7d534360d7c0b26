"""The session endpoints and TTL timers (``agent/session_endpoint.go``, ``agent/consul/session_*.go``).

A session is created for this node with the ``serfHealth`` check, a 15s lock-delay and the
``release`` behaviour unless the body says otherwise. The body is decoded by
``Session.UnmarshalJSON``, which ignores unknown keys. A TTL must lie within
[``session_ttl_min``, 24h]; the session is invalidated when it has not been renewed for
**twice** its TTL (``structs.SessionTTLMultiplier``), or when a check it names turns critical or
is deregistered, which releases or deletes the keys it holds and arms their lock-delay.

Errors of the Raft apply (unknown node, missing or critical check) come back from
``Session.Apply`` as ``apply failed: <state store error>``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from devmesh.registry.acl import ACL, READ, WRITE
from devmesh.registry.acl import SESSION as SESSION_RESOURCE
from devmesh.registry.blocking import blocking_query
from devmesh.registry.codec import (
    DecodeError,
    ListOf,
    Struct,
    decode_body,
    float64_of,
    go_duration,
    go_int64,
    wrap_int64,
)
from devmesh.registry.state import SERF_CHECK_ID, Session, Store, StoreError
from devmesh.registry.views import session as session_view
from devmesh.registry.web import Handler, HTTPError, bad_request, json_response, meta_headers
from epoxi import durations

SESSION_TTL_MULTIPLIER = 2
SESSION_TTL_MAX = 24 * durations.HOUR
LOCK_DELAY_MIN_THRESHOLD = 1000  # nanoseconds: smaller values are taken as seconds

SESSION = Struct(
    "Session",
    (
        ("ID", "str"),
        ("Name", "str"),
        ("Node", "str"),
        ("LockDelay", "any"),
        ("Behavior", "str"),
        ("TTL", "str"),
        ("NodeChecks", ListOf("str")),
        ("ServiceChecks", ListOf(Struct("ServiceCheck", (("ID", "str"), ("Namespace", "str"))))),
        ("Checks", ListOf("str")),
        ("CreateIndex", "uint"),
        ("ModifyIndex", "uint"),
    ),
)


def lock_delay_of(value: Any) -> int:
    """``Session.UnmarshalJSON`` for a non-null ``LockDelay``: a duration string or nanoseconds
    (a float64, truncated), any other JSON value 0; a result below 1000 (ns) is taken as seconds,
    in int64 arithmetic."""
    if isinstance(value, str):
        delay = go_duration(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        delay = go_int64(float64_of(value, "LockDelay"))
    else:
        delay = 0
    return wrap_int64(delay * durations.SECOND) if delay < LOCK_DELAY_MIN_THRESHOLD else delay


def check_ids_of(ids: list[str | None] | None) -> list[str] | None:
    """``[]string`` as Go fills it: a ``null`` element is ``""``."""
    return None if ids is None else [i or "" for i in ids]


def service_checks_of(checks: list[dict[str, Any] | None] | None) -> list[dict[str, Any]] | None:
    """``[]structs.ServiceCheck`` as Go fills it: both fields, zero values for absent keys."""
    if checks is None:
        return None
    return [{"ID": (c or {}).get("ID") or "", "Namespace": (c or {}).get("Namespace") or ""} for c in checks]


def ttl_of(ttl: str) -> int:
    if ttl in ("", "0", "0s", "0m", "0h"):
        return 0
    return go_duration(ttl)


class SessionTimers:
    """``Server.sessionTimers``: invalidate a TTL session after TTL x 2 without renewal."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._timers: dict[str, asyncio.TimerHandle] = {}
        store.on_session_destroyed.append(self.clear)

    def reset(self, session_id: str, ttl: int) -> None:
        self.clear(session_id)
        if ttl <= 0:
            return
        delay = ttl * SESSION_TTL_MULTIPLIER / durations.SECOND
        self._timers[session_id] = asyncio.get_running_loop().call_later(delay, self._expire, session_id)

    def clear(self, session_id: str) -> None:
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, session_id: str) -> None:
        self._timers.pop(session_id, None)
        self.store.session_destroy(session_id)

    def close(self) -> None:
        for session_id in list(self._timers):
            self.clear(session_id)


class SessionEndpoints:
    def __init__(self, store: Store, timers: SessionTimers, acl: ACL) -> None:
        self.store = store
        self.timers = timers
        self.acl = acl

    async def create(self, request: web.Request) -> web.StreamResponse:
        config = self.store.config
        entry = Session(
            id="",
            node=config.node_name,
            node_checks=[SERF_CHECK_ID],
            checks=[SERF_CHECK_ID],
        )
        body = await request.read()
        if body:
            try:
                args = decode_body(body, SESSION, allow_unknown=True)
                if "LockDelay" in args:
                    entry.lock_delay = lock_delay_of(args["LockDelay"])
            except (DecodeError, ValueError) as exc:
                raise bad_request(f"Request decode failed: {exc}") from None
            entry.name = args.get("Name", entry.name)
            entry.node = args.get("Node", entry.node)
            entry.behavior = args.get("Behavior", entry.behavior)
            entry.ttl = args.get("TTL", entry.ttl)
            if "NodeChecks" in args:
                entry.node_checks = check_ids_of(args["NodeChecks"])
            if "ServiceChecks" in args:
                entry.service_checks = service_checks_of(args["ServiceChecks"])
            if "Checks" in args:
                entry.checks = check_ids_of(args["Checks"])
        # fixupEmptySessionChecks
        if not entry.checks:
            entry.node_checks = []
        elif entry.checks == [SERF_CHECK_ID]:
            entry.checks = None
        elif not entry.node_checks:
            entry.checks = None
        if entry.node == "":
            raise HTTPError(500, "Must provide Node")
        self.acl.require(self.acl.resolve(request), SESSION_RESOURCE, WRITE, entry.node)  # Session.Apply
        if entry.behavior == "":
            entry.behavior = "release"
        if entry.behavior not in ("release", "delete"):
            raise HTTPError(500, f"Invalid Behavior setting '{entry.behavior}'")
        ttl = 0
        if entry.ttl != "":
            try:
                ttl = go_duration(entry.ttl)
            except ValueError as exc:
                raise HTTPError(500, f"Session TTL '{entry.ttl}' invalid: {exc}") from None
            if ttl != 0 and (ttl < config.session_ttl_min or ttl > SESSION_TTL_MAX):
                raise HTTPError(
                    500,
                    f"Invalid Session TTL '{ttl}', must be between "
                    f"[{durations.format(config.session_ttl_min)}={durations.format(SESSION_TTL_MAX)}]",
                )
        entry.id = str(uuid.uuid4())
        try:
            self.store.session_create(entry)
        except StoreError as exc:
            raise HTTPError(500, f"apply failed: {exc}") from None
        self.timers.reset(entry.id, ttl_of(entry.ttl))
        return json_response({"ID": entry.id})

    async def destroy(self, request: web.Request) -> web.StreamResponse:
        session_id = request.path.removeprefix("/v1/session/destroy/")
        if not session_id:
            raise bad_request("Missing session")
        identity = self.acl.resolve(request)
        existing = self.store.sessions.get(session_id)
        if existing is not None:
            self.acl.require(identity, SESSION_RESOURCE, WRITE, existing.node)
        self.store.session_destroy(session_id)
        return json_response(True)

    async def renew(self, request: web.Request) -> web.StreamResponse:
        session_id = request.path.removeprefix("/v1/session/renew/")
        if not session_id:
            raise bad_request("Missing session")
        identity = self.acl.resolve(request)
        entry = self.store.sessions.get(session_id)
        if entry is None:
            raise HTTPError(404, f"Session id '{session_id}' not found")
        self.acl.require(identity, SESSION_RESOURCE, WRITE, entry.node)
        self.timers.reset(session_id, ttl_of(entry.ttl))
        return json_response([session_view(entry)])

    async def _list(self, request: web.Request, select: Any) -> web.StreamResponse:
        identity = self.acl.resolve_query(request, self.store.config.datacenter)

        def query() -> tuple[int, tuple[list[dict[str, Any]], bool]]:
            chosen = sorted((s for s in self.store.sessions.values() if select(s)), key=lambda s: s.id)
            readable = [s for s in chosen if identity.can(SESSION_RESOURCE, READ, s.node)]
            return self.store.table_index("sessions"), (
                [session_view(s) for s in readable],
                len(readable) != len(chosen),
            )

        index, (found, removed) = await blocking_query(self.store, request, query)
        return json_response(found, meta_headers(index) | identity.filtered(removed))

    async def info(self, request: web.Request) -> web.StreamResponse:
        session_id = request.path.removeprefix("/v1/session/info/")
        if not session_id:
            raise bad_request("Missing session")
        return await self._list(request, lambda s: s.id == session_id)

    async def list_all(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, lambda s: True)

    async def node(self, request: web.Request) -> web.StreamResponse:
        node = request.path.removeprefix("/v1/session/node/")
        if not node:
            raise bad_request("Missing node name")
        return await self._list(request, lambda s: s.node.lower() == node.lower())

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [
            ("/v1/session/create", ("PUT",), self.create),
            ("/v1/session/destroy/", ("PUT",), self.destroy),
            ("/v1/session/renew/", ("PUT",), self.renew),
            ("/v1/session/info/", ("GET",), self.info),
            ("/v1/session/list", ("GET",), self.list_all),
            ("/v1/session/node/", ("GET",), self.node),
        ]
