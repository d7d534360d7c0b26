"""Keeps the node's ``PolicyTable`` in step with the registry's KV store.

One Consul blocking query per prefix (``epoxi/policies/``, ``epoxi/policy-assignments/``)
re-reads it whenever its index moves, then hands the new table to ``on_change``. A policy that
does not validate is logged and ignored (its last valid version stays); a registry that is down
is retried with backoff, and the node keeps the table it has.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from epoxi.policy_store import ASSIGNMENTS, POLICIES, PolicyTable, read_assignments, read_policies
from epoxi.registry.client import Consul
from services.node.registration import RegistryError

log = logging.getLogger(__name__)

OnChange = Callable[[PolicyTable], Awaitable[object]]


class PolicyWatch:
    def __init__(self, consul: Consul, on_change: OnChange, wait: str = "30s") -> None:
        self._consul = consul
        self._on_change = on_change
        self._wait = wait
        self.table = PolicyTable()
        self._indexes = {POLICIES: 0, ASSIGNMENTS: 0}

    async def load(self) -> bool:
        """Read both prefixes now (not blocking); False when the registry could not be read."""
        try:
            for prefix in (POLICIES, ASSIGNMENTS):
                index, entries = await self._consul.kv.get(prefix, recurse=True)
                self._store(prefix, int(index), entries)
        except RegistryError as e:
            log.warning("cannot read policies from the registry yet: %s", e)
            return False
        return True

    async def run(self) -> None:
        """Follow both prefixes until cancelled."""
        await asyncio.gather(*(self._watch(prefix) for prefix in self._indexes))

    def _store(self, prefix: str, index: int, entries: list[dict[str, Any]] | None) -> None:
        # An index that goes backwards means the store was reset: start over from 0 (as Consul says).
        self._indexes[prefix] = index if index >= self._indexes[prefix] else 0
        if prefix == POLICIES:
            policies, problems = read_policies(entries, self.table.policies)
            self.table = replace(self.table, policies=policies)
        else:
            assignments, problems = read_assignments(entries)
            self.table = replace(self.table, assignments=assignments)
        for problem in problems:
            log.warning("stored policies: %s", problem)

    async def _watch(self, prefix: str) -> None:
        failures = 0
        while True:
            try:
                known = self._indexes[prefix]
                index, entries = await self._consul.kv.get(
                    prefix, recurse=True, index=known or None, wait=self._wait
                )
                failures = 0
                if int(index) == known:
                    continue  # the wait ended with no change
                before = self.table
                self._store(prefix, int(index), entries)
                if self.table == before:
                    continue  # e.g. an empty prefix's index follows every KV write
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                delay = min(10.0, 0.2 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("watching %s failed (%s); retrying in %.1fs", prefix, e, delay)
                await asyncio.sleep(delay)
                continue
            try:
                await self._on_change(self.table)
            except Exception:
                log.exception("applying changed policies failed")
