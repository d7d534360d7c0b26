"""Who owns a routing key: one KV record per key, held by the owning node's session.

The record is ``epoxi/placement/<routing_key>``, its value ``{"node": ..., "address": ...}``,
taken with ``?acquire=<session>``. Consul lets one session at a time hold a key, so at most one
node runs (and accepts mail for) a routing key, however many routers and monitors place it at
once. Each node's session names its own gRPC health check (``service:<node id>``) and
``serfHealth``: when the node dies, the check goes critical, Consul invalidates the session and
releases the node's records, and after ``LOCK_DELAY`` another node may take them.

``ConsulOwnership`` is the node's side (claim, release, notice a lost session);
``LocalOwnership`` is a node alone, with no registry, which owns every key it is asked for.
Readers (the router, the monitor) use ``owner_of``.

A second kind of record keeps the routing keys that share a shaping budget on one node: keys
with the same MX site and source IP (``epoxi.shaping``) are placed together, so the budget is
enforced where they all send. ``epoxi/site-placement/<source_ip>/<site>`` is held, in the same
session, by the node that runs any key of that (site, IP); another node asked to start such a
key refuses, naming the holder, exactly as it does for a key held elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from epoxi.registry.client import Consul, RegistryError

log = logging.getLogger(__name__)

PREFIX = "epoxi/placement/"
SITE_PREFIX = "epoxi/site-placement/"
LOCK_PREFIX = "epoxi/locks/"
# Seconds a record freed by a dead node's session stays untaken (Consul's default is 15 s): long
# enough for a node that only missed a check to notice, short enough to fail over within 10 s.
LOCK_DELAY = 1
SERF_HEALTH = "serfHealth"


@dataclass(frozen=True)
class Owner:
    node: str
    address: str


class ClaimError(Exception):
    """The key cannot be claimed now (registry unreachable, or within its lock-delay)."""


# A node's refusal, in its gRPC trailing metadata: the key's owner, and that nothing was spooled.
OWNER_NODE = "epoxi-owner-node"
OWNER_ADDRESS = "epoxi-owner-address"
REFUSED = "epoxi-refused"


def owner_metadata(owner: Owner | None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming ``owner`` (nothing for None)."""
    return () if owner is None else ((OWNER_NODE, owner.node), (OWNER_ADDRESS, owner.address))


def owner_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Owner | None:
    """The owner a refusal's trailing metadata names, if it names one."""
    found = dict(metadata or ())
    node, address = found.get(OWNER_NODE), found.get(OWNER_ADDRESS)
    if isinstance(node, str) and isinstance(address, str) and node and address:
        return Owner(node, address)
    return None


def record_key(routing_key: str) -> str:
    return PREFIX + routing_key


def site_record_key(site: str, source_ip: str) -> str:
    """The record of the node that runs (site, source IP)'s keys. A site's host names, commas and
    ports stay as they are; anything else (a "/" in a stored site's name) is %-quoted."""
    return f"{SITE_PREFIX}{source_ip}/{urllib.parse.quote(site, safe=':,')}"


def owner_from_entry(entry: dict[str, Any] | None) -> Owner | None:
    """The owner a KV entry names, when a session holds it; None for a free or missing record."""
    if not entry or not entry.get("Session") or not entry.get("Value"):
        return None
    try:
        value = json.loads(entry["Value"])
        return Owner(str(value["node"]), str(value["address"]))
    except (ValueError, KeyError, TypeError):
        log.warning("placement record %s is not {node, address}: %r", entry.get("Key"), entry["Value"])
        return None


async def owner_of(consul: Consul, routing_key: str) -> Owner | None:
    """The node that holds ``routing_key``'s record now, if any."""
    _, entry = await consul.kv.get(record_key(routing_key))
    return owner_from_entry(entry)


class Ownership(Protocol):
    """What a node needs to run a routing key alone in the cluster."""

    def holds(self, routing_key: str) -> bool: ...

    async def claim(self, routing_key: str) -> Owner | None:
        """Take ``routing_key`` for this node: None once it is ours, else the node that holds it.
        Raises ``ClaimError`` when that cannot be known now."""
        ...

    async def release(self, routing_key: str) -> None: ...

    async def claim_site(self, site: str, source_ip: str) -> Owner | None:
        """Take (site, source IP) for this node: None once it is ours, else the node that runs
        its keys. Raises ``ClaimError`` when that cannot be known now."""
        ...

    async def release_site(self, site: str, source_ip: str) -> None: ...

    async def owner(self, routing_key: str) -> Owner | None:
        """Who holds ``routing_key`` now; raises ``ClaimError`` when that cannot be known."""
        ...

    async def verify(self, running: Iterable[str]) -> list[str]:
        """Make sure this node still holds the ``running`` keys (after a lost session, take them
        again); the keys another node took meanwhile."""
        ...

    async def close(self) -> None: ...


class LocalOwnership:
    """A node without a registry: every key it claims is its own."""

    def __init__(self, node: str = "", address: str = "") -> None:
        self.me = Owner(node, address)
        self._held: set[str] = set()

    def holds(self, routing_key: str) -> bool:
        return routing_key in self._held

    async def claim(self, routing_key: str) -> Owner | None:
        self._held.add(routing_key)
        return None

    async def release(self, routing_key: str) -> None:
        self._held.discard(routing_key)

    async def claim_site(self, site: str, source_ip: str) -> Owner | None:
        return None

    async def release_site(self, site: str, source_ip: str) -> None:
        pass

    async def owner(self, routing_key: str) -> Owner | None:
        return self.me if routing_key in self._held else None

    async def verify(self, running: Iterable[str]) -> list[str]:
        return []

    async def close(self) -> None:
        self._held.clear()


class ConsulOwnership:
    """A node's records in Consul, held by one session tied to the node's health check."""

    def __init__(self, consul: Consul, node: str, address: str, check_id: str) -> None:
        self.consul = consul
        self.me = Owner(node, address)
        self.check_id = check_id
        self.session: str | None = None
        self._value = json.dumps({"node": node, "address": address})
        self._held: set[str] = set()
        self._session_lock = asyncio.Lock()

    def holds(self, routing_key: str) -> bool:
        return record_key(routing_key) in self._held

    async def _session(self) -> str:
        async with self._session_lock:
            if self.session is None:
                try:
                    self.session = await self.consul.session.create(
                        name=f"epoxi-node {self.me.node}",
                        checks=[SERF_HEALTH, self.check_id],
                        lock_delay=LOCK_DELAY,
                        behavior="release",
                    )
                except RegistryError as e:
                    raise ClaimError(f"cannot open a registry session: {e}") from e
                log.info("node %s holds registry session %s", self.me.node, self.session)
                await self._end_earlier_sessions(self.session)
            return self.session

    async def _end_earlier_sessions(self, current: str) -> None:
        """End the sessions an earlier run of this node left (killed, and back before its check
        went critical): their records are free after the lock-delay."""
        try:
            _, sessions = await self.consul.session.list()
            for s in sessions or []:
                if s.get("Name") == f"epoxi-node {self.me.node}" and s.get("ID") != current:
                    log.info("ending session %s of an earlier run of node %s", s["ID"], self.me.node)
                    await self.consul.session.destroy(s["ID"])
        except RegistryError as e:
            log.warning("cannot end earlier sessions of node %s: %s", self.me.node, e)

    async def claim(self, routing_key: str) -> Owner | None:
        return await self._acquire(record_key(routing_key), f"routing key {routing_key!r}")

    async def claim_site(self, site: str, source_ip: str) -> Owner | None:
        return await self._acquire(site_record_key(site, source_ip), f"site {site!r} from {source_ip}")

    async def release(self, routing_key: str) -> None:
        await self._release(record_key(routing_key))

    async def release_site(self, site: str, source_ip: str) -> None:
        await self._release(site_record_key(site, source_ip))

    async def _acquire(self, record: str, what: str, *, wait_out_lock_delay: bool = True) -> Owner | None:
        if record in self._held:
            return None
        session = await self._session()
        try:
            taken = await self.consul.kv.put(record, self._value, acquire=session)
            if taken:
                self._held.add(record)
                return None
            _, entry = await self.consul.kv.get(record)
        except RegistryError as e:
            if "invalid session" in str(e):
                self._lost(session)
            raise ClaimError(f"cannot claim {what}: registry: {e}") from e
        holder = owner_from_entry(entry)
        if holder is None:
            if wait_out_lock_delay:
                # Free, but a session that held it ended moments ago (a crashed node's, or ours
                # after a missed check). Every node's sessions have this lock-delay, so it has
                # passed after one wait: the caller is served instead of refused.
                await asyncio.sleep(LOCK_DELAY)
                return await self._acquire(record, what, wait_out_lock_delay=False)
            raise ClaimError(f"{what} was released moments ago and is in its lock-delay")
        if holder == self.me:  # an earlier session of ours (the registry restarted, or we did)
            self._held.discard(record)
            raise ClaimError(f"{what} is held by a previous session of this node")
        return holder

    async def _release(self, record: str) -> None:
        self._held.discard(record)
        if self.session is None:
            return
        try:
            await self.consul.kv.put(record, self._value, release=self.session)
        except RegistryError as e:
            log.warning("releasing %s failed: %s", record, e)

    async def owner(self, routing_key: str) -> Owner | None:
        if self.holds(routing_key):
            return self.me
        try:
            return await owner_of(self.consul, routing_key)
        except RegistryError as e:
            raise ClaimError(f"cannot read routing key {routing_key!r}'s owner: {e}") from e

    def _lost(self, session: str) -> None:
        if self.session == session:
            log.warning("registry session %s of node %s is gone; its keys are free", session, self.me.node)
            self.session = None
            self._held.clear()

    async def verify(self, running: Iterable[str]) -> list[str]:
        session = self.session
        if session is not None:
            try:
                _, found = await self.consul.session.info(session)
            except RegistryError as e:
                log.warning("cannot verify registry session %s: %s", session, e)
                return []
            if found:
                return []
            self._lost(session)
        lost = []
        for key in sorted(running):
            try:
                if await self.claim(key) is not None:
                    lost.append(key)
            except ClaimError as e:
                log.warning("routing key %s: %s", key, e)
        return lost

    async def close(self) -> None:
        """Release every record, then end the session (releasing first arms no lock-delay)."""
        for record in sorted(self._held):
            await self._release(record)
        session, self.session = self.session, None
        if session is not None:
            try:
                await self.consul.session.destroy(session)
            except RegistryError as e:
                log.warning("ending registry session %s failed: %s", session, e)
