"""Which node runs a routing key, as this router knows it, and where a key nobody runs goes.

``Owners`` answers from a bounded LRU cache (``OwnerCache``: routing key -> ``Owner``, at most
``DEFAULT_MAX_ENTRIES`` by default), and on a miss from the key's placement record in KV
(``epoxi.registry.ownership.owner_of``: one GET). An owner is used only while its node is passing
in the router's view; the cache learns an owner from that GET, from every accepted batch, and
from a node's FAILED_PRECONDITION naming the owner. Entries are never swept when a node goes: an
entry naming a node that is not passing is ignored, and replaced by the next lookup.

``NewKeys`` is the placement tally for keys nobody runs: each key this router placed on a node
(``epoxi.placement.Placements``) counts toward that node's pipelines on top of the count the node
registered, so the new keys of one request (or of requests close together) spread over the nodes
that own their IP. A node registers its new pipeline count before its EnqueueBatch answers, so
a placement leaves the tally (``prune``) once its call has been answered and the view's entry
for its node differs from the one it was placed against (the node registered again since: its
count includes the key now). It also leaves when its node leaves the view, after
``PLACEMENT_TTL`` (60 s), and at once when its call shows the key was not started there
(refused, owned elsewhere, or the pipeline already ran). So the tally holds only keys placed in
the last minute, and fewer as the nodes register.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epoxi import placement
from epoxi.registry.client import Consul, RegistryError
from epoxi.registry.ownership import Owner, owner_of
from epoxi.v1 import node_pb2
from services.router.discovery import ClusterSnapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 100_000
# A KV GET that takes longer is given up: the key is placed as if nobody ran it, and the node
# it goes to names the owner if there is one.
LOOKUP_TIMEOUT = 2.0
# KV GETs in flight at once for one router.
CONCURRENT_LOOKUPS = 32
# Distinct Owner values kept for sharing between entries (nodes x addresses; more only after
# many restarts on new ports, and then it starts over).
_MAX_INTERNED = 1024


class OwnerCache:
    """Routing key -> Owner, least recently used first out beyond ``max_entries``."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Owner] = OrderedDict()
        # One Owner object per (node, address), shared by all its keys.
        self._interned: dict[Owner, Owner] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Owner | None:
        owner = self._entries.get(key)
        if owner is not None:
            self._entries.move_to_end(key)
        return owner

    def put(self, key: str, owner: Owner) -> None:
        if len(self._interned) >= _MAX_INTERNED and owner not in self._interned:
            self._interned.clear()
        owner = self._interned.setdefault(owner, owner)
        self._entries[key] = owner
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: str, node: str | None = None) -> None:
        """Drop ``key``'s entry (only if it names ``node``, when given)."""
        owner = self._entries.get(key)
        if owner is not None and (node is None or owner.node == node):
            del self._entries[key]


class Owners:
    """The owner of a routing key among the passing nodes: from the cache, else from KV."""

    def __init__(
        self, consul: Consul, cache: OwnerCache | None = None, lookup_timeout: float = LOOKUP_TIMEOUT
    ) -> None:
        self._consul = consul
        self.cache = cache if cache is not None else OwnerCache()
        self._lookup_timeout = lookup_timeout
        self._lookups = asyncio.Semaphore(CONCURRENT_LOOKUPS)
        # KV GETs made: what a warm cache saves.
        self.registry_reads = 0

    def cached(self, key: str, snap: ClusterSnapshot) -> node_pb2.NodeInfo | None:
        """The cached owner's node, when it is passing in ``snap`` (as ``snap`` shows it)."""
        owner = self.cache.get(key)
        return snap.nodes.get(owner.node) if owner is not None else None

    async def lookup(self, key: str, snap: ClusterSnapshot) -> node_pb2.NodeInfo | None:
        """The node that runs ``key`` and is passing: cached, else read from its placement
        record and cached. None when nobody runs it, its owner is not passing, or the registry
        did not answer (the node the key is sent to then names the owner, if any)."""
        node = self.cached(key, snap)
        if node is not None:
            return node
        async with self._lookups:
            self.registry_reads += 1
            try:
                async with asyncio.timeout(self._lookup_timeout):
                    owner = await owner_of(self._consul, key)
            except RegistryError as e:
                log.warning("cannot read the owner of routing key %s: %s", key, e)
                return None
        node = snap.nodes.get(owner.node) if owner is not None else None
        if owner is None or node is None:
            self.cache.forget(key)  # a stale entry, if any: nothing better to put there
            return None
        self.cache.put(key, owner)
        return node

    async def lookup_all(self, keys: Iterable[str], snap: ClusterSnapshot) -> None:
        """``lookup`` every key not cached, concurrently (up to ``CONCURRENT_LOOKUPS`` at once)."""
        missing = [key for key in keys if self.cached(key, snap) is None]
        await asyncio.gather(*(self.lookup(key, snap) for key in missing))

    def learn(self, key: str, owner: Owner) -> None:
        self.cache.put(key, owner)

    def forget(self, key: str, node: str) -> None:
        self.cache.forget(key, node)


@dataclass
class _Placed:
    # The node's entry in the view the key was placed against.
    before: node_pb2.NodeInfo
    answered: bool = False


class NewKeys:
    """The placement tally: keys placed on a node that its registered count may not show yet."""

    def __init__(
        self, ttl: float = placement.PLACEMENT_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._placements = placement.Placements(ttl, clock)
        self._placed: dict[str, _Placed] = {}

    def __len__(self) -> int:
        return len(self._placements)

    def rank(self, snap: ClusterSnapshot, source_ip: str) -> list[node_pb2.NodeInfo]:
        """The passing nodes that send from ``source_ip``, best first by epoxi.placement's metric
        (registered pipelines plus those placed here and not yet registered)."""
        counts = self._placements.pipelines(snap.pipeline_counts, snap.nodes)
        return placement.candidates(snap.nodes.values(), source_ip, counts)

    def node_for(self, key: str) -> str | None:
        return self._placements.node_for(key)

    def pending(self, node: str) -> int:
        return self._placements.pending(node)

    def place(self, key: str, node: node_pb2.NodeInfo) -> None:
        """``key`` goes to ``node`` (as the view shows it now); counted at once."""
        if self._placements.node_for(key) == node.id:
            return
        self._placements.place(key, node.id)
        self._placed[key] = _Placed(node)

    def answered(self, key: str, node: str) -> None:
        """The call that placed ``key`` on ``node`` is over and may have started its pipeline:
        it counts until the node's entry in the view changes (or the TTL)."""
        placed = self._placed.get(key)
        if placed is not None and self._placements.node_for(key) == node:
            placed.answered = True

    def forget(self, key: str, node: str) -> None:
        """``key`` was not started on ``node``."""
        if self._placements.node_for(key) == node:
            self._placements.forget(key, node)
            self._placed.pop(key, None)

    def prune(self, snap: ClusterSnapshot) -> None:
        """Drop what ``snap``'s registered counts include now, what sits on a node ``snap`` does
        not show, and what is older than the TTL. Costs O(keys in the tally)."""
        if not self._placed:
            return
        registered = {
            key for key, p in self._placed.items() if p.answered and snap.nodes.get(p.before.id) != p.before
        }
        self._placements.prune(registered, snap.nodes)
        for key in [key for key in self._placed if self._placements.node_for(key) is None]:
            del self._placed[key]
