"""Blocking queries, as ``agent/blockingquery`` and ``Server.RPCQueryTimeout`` run them.

``?index=N`` with N > 0 blocks until the index of the result exceeds N or the wait ends; the
wait is ``?wait`` (default ``default_query_time``, 5m; capped at ``max_query_time``, 10m) plus a
random jitter of up to a sixteenth of it. When the wait ends the current result is returned,
with its unchanged index. ``?wait`` and ``?index`` that do not parse answer 400.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from devmesh.registry.codec import go_duration
from devmesh.registry.filtering import refuse_filter
from devmesh.registry.state import Store
from devmesh.registry.web import HTTPError, bad_request, param
from epoxi import durations

T = TypeVar("T")

JITTER_FRACTION = 16
_UINT = re.compile(r"^[0-9]+$")


def parse_query_options(request: web.Request, datacenter: str) -> tuple[int, int]:
    """``HTTPHandlers.parse``: datacenter, consistency, ``?wait`` and ``?index``."""
    dc = param(request, "dc")
    if dc and dc != datacenter:
        raise HTTPError(500, "No path to datacenter")
    if "stale" in request.query and "consistent" in request.query:
        raise bad_request("Cannot specify ?stale with ?consistent, conflicting semantics.")
    wait = 0
    if param(request, "wait"):
        try:
            wait = go_duration(param(request, "wait"))
        except ValueError:
            raise bad_request("Invalid wait time") from None
    index = 0
    if param(request, "index"):
        raw = param(request, "index")
        if not _UINT.match(raw) or int(raw) >= 2**64:
            raise bad_request("Invalid index")
        index = int(raw)
    return index, wait


async def blocking_query(
    store: Store, request: web.Request, query: Callable[[], tuple[int, T]], filtered: bool = False
) -> tuple[int, T]:
    """Run ``query`` (returning ``(index, result)``) under Consul's blocking-query rules.

    ``filtered`` endpoints (every catalog and health list) take ``?filter``, which is refused
    (``devmesh.registry.filtering``) after the query options parse, as the RPC would refuse it.
    """
    min_index, wait = parse_query_options(request, store.config.datacenter)
    if filtered:
        refuse_filter(request)
    changed = store.changed
    index, result = query()
    if min_index == 0 or index > min_index:
        return index, result
    timeout = wait
    if timeout > store.config.max_query_time:
        timeout = store.config.max_query_time
    elif timeout <= 0:
        timeout = store.config.default_query_time
    timeout += int(random.random() * (timeout // JITTER_FRACTION))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout / durations.SECOND
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return index, result
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            return index, result
        changed = store.changed
        index, result = query()
        if index > min_index:
            return index, result
