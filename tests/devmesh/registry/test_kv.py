"""``/v1/kv/*``: values, CAS, locks, listings, raw values and blocking reads."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from epoxi.registry.client import Consul
from tests.devmesh.registry.support import call

pytestmark = pytest.mark.consul


async def test_put_get_json_shape(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    assert await consul.kv.put(f"{prefix}/a", "hello", flags=42) is True

    async with http.get(f"/v1/kv/{prefix}/a") as response:
        [entry] = await response.json()
        assert int(response.headers["X-Consul-Index"]) == entry["ModifyIndex"]

    assert entry == {
        "LockIndex": 0,
        "Key": f"{prefix}/a",
        "Flags": 42,
        "Value": base64.b64encode(b"hello").decode(),
        "CreateIndex": entry["CreateIndex"],
        "ModifyIndex": entry["CreateIndex"],
    }
    await consul.kv.put(f"{prefix}/a", "again")
    _, updated = await consul.kv.get(f"{prefix}/a")
    assert updated["Value"] == b"again"
    assert updated["Flags"] == 0
    assert updated["CreateIndex"] == entry["CreateIndex"] < updated["ModifyIndex"]


async def test_missing_key_is_404_with_empty_body(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    async with http.get(f"/v1/kv/{prefix}/missing") as response:
        assert response.status == 404
        assert await response.read() == b""
        assert int(response.headers["X-Consul-Index"]) > 0

    assert await consul.kv.get(f"{prefix}/missing") == (response.headers["X-Consul-Index"], None)


async def test_empty_value_is_null(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    await consul.kv.put(f"{prefix}/empty", "")

    async with http.get(f"/v1/kv/{prefix}/empty") as response:
        [entry] = await response.json()

    assert entry["Value"] is None


async def test_check_and_set(consul: Consul, prefix: str) -> None:
    key = f"{prefix}/cas"
    assert await consul.kv.put(key, "1", cas=0) is True
    assert await consul.kv.put(key, "2", cas=0) is False
    _, entry = await consul.kv.get(key)

    assert await consul.kv.put(key, "3", cas=entry["ModifyIndex"] + 1000) is False
    assert await consul.kv.put(key, "3", cas=entry["ModifyIndex"]) is True
    assert (await consul.kv.get(key))[1]["Value"] == b"3"

    _, entry = await consul.kv.get(key)
    assert await consul.kv.delete(key, cas=entry["ModifyIndex"] + 1000) is False
    assert await consul.kv.delete(key, cas=entry["ModifyIndex"]) is True
    assert (await consul.kv.get(key))[1] is None


async def test_acquire_and_release(consul: Consul, prefix: str) -> None:
    key = f"{prefix}/lock"
    first = await consul.session.create(name=f"{prefix}-1")
    second = await consul.session.create(name=f"{prefix}-2")

    assert await consul.kv.put(key, "leader-1", acquire=first) is True
    assert await consul.kv.put(key, "leader-2", acquire=second) is False
    _, held = await consul.kv.get(key)
    assert (held["Session"], held["LockIndex"], held["Value"]) == (first, 1, b"leader-1")

    assert await consul.kv.put(key, "bye", release=second) is False
    assert await consul.kv.put(key, "bye", release=first) is True
    _, released = await consul.kv.get(key)
    assert "Session" not in released
    assert released["LockIndex"] == 1

    assert await consul.kv.put(key, "leader-2", acquire=second) is True
    assert (await consul.kv.get(key))[1]["LockIndex"] == 2


async def test_lock_contention(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    key = f"{prefix}/contended"
    first = await consul.session.create(name=f"{prefix}-1")
    second = await consul.session.create(name=f"{prefix}-2")

    won = await asyncio.gather(
        consul.kv.put(key, "by-first", acquire=first), consul.kv.put(key, "by-second", acquire=second)
    )
    assert sorted(won) == [False, True]
    holder, other = (first, second) if won[0] else (second, first)
    _, held = await consul.kv.get(key)
    assert (held["Session"], held["LockIndex"], held["Flags"]) == (holder, 1, 0)
    assert held["Value"] == (b"by-first" if holder == first else b"by-second")

    # The holder acquiring again succeeds and writes value and flags; LockIndex stays.
    assert await consul.kv.put(key, "again", acquire=holder, flags=7) is True
    _, again = await consul.kv.get(key)
    assert (again["Session"], again["LockIndex"], again["Flags"], again["Value"]) == (holder, 1, 7, b"again")
    assert again["ModifyIndex"] > held["ModifyIndex"]
    assert await consul.kv.put(key, "again", acquire=holder, flags=7) is True
    assert (await consul.kv.get(key))[1] == again  # an unchanged entry keeps its ModifyIndex

    # The other session can neither take nor release it, and changes nothing.
    assert await consul.kv.put(key, "mine", acquire=other) is False
    assert await consul.kv.put(key, "mine", release=other) is False
    assert (await consul.kv.get(key))[1] == again
    # ?cas does not combine with ?acquire (nor ?release): 400 before anything is applied.
    assert await call(http, "PUT", f"/v1/kv/{key}", params={"acquire": other, "cas": "0"}) == (
        400,
        f"Conflicting flags: acquire={other}&cas=0\n",
    )
    assert (await consul.kv.get(key))[1] == again

    # A release writes the body and flags (0 when absent) and keeps LockIndex; the next lock bumps it.
    assert await consul.kv.put(key, "bye", release=holder) is True
    _, released = await consul.kv.get(key)
    assert (released["LockIndex"], released["Flags"], released["Value"], "Session" in released) == (
        1,
        0,
        b"bye",
        False,
    )
    assert await consul.kv.put(key, "mine", release=holder) is False  # nothing left to release
    assert await consul.kv.put(key, "mine", acquire=other) is True
    _, taken = await consul.kv.get(key)
    assert (taken["Session"], taken["LockIndex"], taken["Value"]) == (other, 2, b"mine")


async def test_lock_errors(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    key = f"{prefix}/lock"
    destroyed = await consul.session.create(name=prefix)
    await consul.session.destroy(destroyed)

    # kvsLockTxn's errors come back from KVS.Apply wrapped as "raft apply failed: ...".
    assert await call(http, "PUT", f"/v1/kv/{key}", params={"acquire": destroyed}) == (
        500,
        f'raft apply failed: invalid session "{destroyed}"',
    )
    assert await call(http, "PUT", f"/v1/kv/{key}", params={"acquire": ""}) == (
        500,
        "raft apply failed: missing session",
    )
    assert await call(http, "PUT", f"/v1/kv/{key}", params={"release": ""}) == (
        500,
        "raft apply failed: missing session",
    )
    # Unlocking needs no live session: an unknown one simply does not hold the key.
    assert await consul.kv.put(key, "x", release=destroyed) is False
    assert (await consul.kv.get(key))[1] is None


async def test_recurse_keys_separator_and_delete_tree(consul: Consul, prefix: str) -> None:
    for key in ("cfg/a", "cfg/b/x", "cfg/b/y", "other"):
        await consul.kv.put(f"{prefix}/{key}", key)

    _, entries = await consul.kv.get(f"{prefix}/cfg/", recurse=True)
    _, keys = await consul.kv.get(f"{prefix}/", keys=True)
    _, shallow = await consul.kv.get(f"{prefix}/cfg/", keys=True, separator="/")

    assert [e["Key"] for e in entries] == [f"{prefix}/cfg/a", f"{prefix}/cfg/b/x", f"{prefix}/cfg/b/y"]
    assert keys == [f"{prefix}/{k}" for k in ("cfg/a", "cfg/b/x", "cfg/b/y", "other")]
    assert shallow == [f"{prefix}/cfg/a", f"{prefix}/cfg/b/"]

    assert await consul.kv.delete(f"{prefix}/cfg/", recurse=True) is True
    _, left = await consul.kv.get(f"{prefix}/", keys=True)
    assert left == [f"{prefix}/other"]


async def test_raw_value(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    await consul.kv.put(f"{prefix}/raw", b"\x00binary\xff")

    async with http.get(f"/v1/kv/{prefix}/raw", params={"raw": ""}) as response:
        assert response.status == 200
        assert await response.read() == b"\x00binary\xff"
        assert response.headers["Content-Type"] == "text/plain"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_blocking_get_wakes_on_write_and_on_delete(consul: Consul, prefix: str) -> None:
    key = f"{prefix}/watched"
    await consul.kv.put(key, "v1")
    index, _ = await consul.kv.get(key)

    waiter = asyncio.create_task(consul.kv.get(key, index=index, wait="30s"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await consul.kv.put(key, "v2")
    new_index, entry = await asyncio.wait_for(waiter, 15)
    assert int(new_index) > int(index)
    assert entry["Value"] == b"v2"

    listing = asyncio.create_task(consul.kv.get(f"{prefix}/", recurse=True, index=new_index, wait="30s"))
    await asyncio.sleep(0.3)
    assert not listing.done()
    await consul.kv.delete(key)
    after_delete, entries = await asyncio.wait_for(listing, 15)
    assert int(after_delete) > int(new_index)
    assert entries is None


async def test_blocking_get_times_out_with_same_index(consul: Consul, prefix: str) -> None:
    await consul.kv.put(f"{prefix}/still", "x")
    index, _ = await consul.kv.get(f"{prefix}/still")

    same, entry = await consul.kv.get(f"{prefix}/still", index=index, wait="1s")

    assert same == index
    assert entry["Value"] == b"x"
