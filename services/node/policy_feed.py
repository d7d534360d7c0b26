"""Keeps the node's ``PolicyTable`` in step with the registry's KV store.

One Consul blocking query per prefix (``epoxi/policies/``, ``epoxi/policy-assignments/``, and
the shaping rules and sites, ``epoxi/shaping/rules/`` and ``epoxi/shaping/sites/``) re-reads it whenever its index moves, then hands the new table to ``run``'s ``on_change``. A
policy that does not validate is logged and ignored (its last valid version stays); a registry
that is down is retried with backoff (``epoxi.backoff``), and the node keeps the table it has.
``load`` reads the table once before the node is built, so its pipelines start with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from epoxi.backoff import Backoff
from epoxi.policy_store import ASSIGNMENTS, POLICIES, PolicyTable, read_assignments, read_policies
from epoxi.registry.client import Consul, RegistryError
from epoxi.shaping import RULES, SITES
from epoxi.shaping import read_table as read_shaping

log = logging.getLogger(__name__)

OnChange = Callable[[PolicyTable], Awaitable[object]]

# After n failures in a row, a watch waits between 0.1 x 2^n and 0.2 x 2^n seconds, 10 s at most.
RETRY = Backoff(base=0.4, cap=10.0, jitter=0.5)


class PolicyFeed:
    def __init__(self, consul: Consul, wait: str = "30s") -> None:
        self._consul = consul
        self._wait = wait
        self.table = PolicyTable()
        self._indexes = {POLICIES: 0, ASSIGNMENTS: 0, RULES: 0, SITES: 0}
        self._shaping_entries: dict[str, list[dict[str, Any]] | None] = {RULES: None, SITES: None}

    async def load(self) -> bool:
        """Read both prefixes now (not blocking); False when the registry could not be read."""
        try:
            for prefix in self._indexes:
                index, entries = await self._consul.kv.get(prefix, recurse=True)
                self._store(prefix, int(index), entries)
        except RegistryError as e:
            log.warning("cannot read policies from the registry yet: %s", e)
            return False
        return True

    async def run(self, on_change: OnChange) -> None:
        """Follow both prefixes until cancelled; ``on_change(table)`` after each change."""
        await asyncio.gather(*(self._watch(prefix, on_change) for prefix in self._indexes))

    def _store(self, prefix: str, index: int, entries: list[dict[str, Any]] | None) -> None:
        # An index that goes backwards means the store was reset: start over from 0 (as Consul says).
        self._indexes[prefix] = index if index >= self._indexes[prefix] else 0
        if prefix == POLICIES:
            policies, problems = read_policies(entries, self.table.policies)
            self.table = replace(self.table, policies=policies)
        elif prefix == ASSIGNMENTS:
            assignments, problems = read_assignments(entries)
            self.table = replace(self.table, assignments=assignments)
        else:
            self._shaping_entries[prefix] = entries
            shaping, problems = read_shaping(
                self._shaping_entries[RULES], self._shaping_entries[SITES], self.table.shaping
            )
            self.table = replace(self.table, shaping=shaping)
        for problem in problems:
            log.warning("stored policies: %s", problem)

    async def _watch(self, prefix: str, on_change: OnChange) -> None:
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
                delay = RETRY.delay(failures)
                log.warning("watching %s failed (%s); retrying in %.1fs", prefix, e, delay)
                await asyncio.sleep(delay)
                continue
            try:
                await on_change(self.table)
            except Exception:
                log.exception("applying changed policies failed")
