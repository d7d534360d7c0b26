"""The cluster-wide rebalance lock: a KV key held by a session of the monitor that rebalances.

The key is ``epoxi/locks/rebalance`` (``epoxi.registry.ownership.LOCK_PREFIX``), taken with
``?acquire=<session>``; Consul lets one session at a time hold a key, so one rebalance runs at a
time however many monitors there are. Its value names the holder (``{"monitor": ..., "address":
...}``), so a refused caller can say who holds it. The session has a TTL, renewed while the lock
is held, and ``behavior=release``: a monitor that dies mid-rebalance frees the lock within twice
the TTL (then a ``LOCK_DELAY`` second lock-delay). The lock is released, and its session
destroyed, when the ``held`` block ends, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import consul

from epoxi.registry.client import Consul, RegistryError
from epoxi.registry.ownership import LOCK_DELAY, LOCK_PREFIX
from epoxi.tasks import cancel_and_wait, every

log = logging.getLogger(__name__)

REBALANCE = LOCK_PREFIX + "rebalance"
# Seconds; Consul invalidates an unrenewed session after twice this.
SESSION_TTL = 30


class LockHeld(Exception):
    """Another session holds the lock; the message names its holder."""


@dataclass
class Lock:
    key: str
    session: str
    # Set when the session was found gone (the registry lost it): the lock is no longer ours.
    lost: bool = False


def holder_of(entry: dict[str, object] | None) -> str:
    """Who a lock's KV entry names, for a message: "monitor X at Y (session S)"."""
    if not entry or not entry.get("Session"):
        return "nobody (it was released meanwhile)"
    raw = entry.get("Value")
    try:
        value = json.loads(raw) if isinstance(raw, bytes | str) else {}
        who = f"monitor {value['monitor']} at {value['address']}"
    except (ValueError, KeyError, TypeError):
        who = f"{raw!r}"
    return f"{who} (session {entry['Session']})"


@asynccontextmanager
async def held(
    registry: Consul, key: str, monitor: str, address: str, ttl: int = SESSION_TTL
) -> AsyncIterator[Lock]:
    """Hold ``key`` for the block; ``LockHeld`` when another session holds it. Registry errors
    (``RegistryError``) while taking it propagate; while releasing it they are logged."""
    session: str = await registry.session.create(
        name=f"epoxi-monitor {monitor} {key}", behavior="release", lock_delay=LOCK_DELAY, ttl=ttl
    )
    lock = Lock(key, session)
    value = json.dumps({"monitor": monitor, "address": address})
    acquired = False
    renewing: asyncio.Task[None] | None = None

    async def renew() -> None:
        try:
            await registry.session.renew(session)
        except consul.NotFound:
            log.warning("lock %s: session %s is gone; the lock is no longer held", key, session)
            lock.lost = True
        except RegistryError as e:
            log.warning("lock %s: renewing session %s failed: %s", key, session, e)

    try:
        acquired = bool(await registry.kv.put(key, value, acquire=session))
        if not acquired:
            _, entry = await registry.kv.get(key)
            raise LockHeld(f"{key} is held by {holder_of(entry)}")
        log.info("lock %s taken by session %s", key, session)
        renewing = asyncio.create_task(every(ttl / 3, renew, f"renewing {key}"), name=f"renew {key}")
        yield lock
    finally:
        await cancel_and_wait(renewing)
        try:
            if acquired:
                await registry.kv.put(key, value, release=session)
        except RegistryError as e:
            log.warning("lock %s: releasing it (session %s) failed: %s", key, session, e)
        try:
            await registry.session.destroy(session)
        except RegistryError as e:
            log.warning("lock %s: destroying session %s failed: %s", key, session, e)
