"""``/v1/session/*``: defaults, renewal, destruction, validation against the node and its checks,
invalidation by TTL or by a critical check, lock-delay and the shapes of sessions with checks."""

from __future__ import annotations

import aiohttp
import pytest

from epoxi.registry.client import Consul
from tests.devmesh.registry.support import (
    call,
    create_session,
    debug_duration,
    synced,
    ttl_node_check,
    ttl_service,
)
from tests.support import eventually

pytestmark = pytest.mark.consul


async def test_session_defaults(consul: Consul, prefix: str) -> None:
    me = await consul.agent.self()
    session_id = await consul.session.create(name=prefix)

    index, info = await consul.session.info(session_id)

    assert int(index) >= info["ModifyIndex"]
    assert info == {
        "ID": session_id,
        "Name": prefix,
        "Node": me["Config"]["NodeName"],
        "LockDelay": 15_000_000_000,
        "Behavior": "release",
        "TTL": "",
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": None,
        "CreateIndex": info["CreateIndex"],
        "ModifyIndex": info["CreateIndex"],
    }
    _, sessions = await consul.session.list()
    assert session_id in [s["ID"] for s in sessions]


async def test_create_options_and_renew(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    body = {"name": prefix, "behavior": "delete", "lockdelay": "2s", "ttl": "60s", "NodeChecks": []}
    async with http.put("/v1/session/create", json=body) as response:
        session_id = (await response.json())["ID"]

    renewed = await consul.session.renew(session_id)

    assert (renewed["Behavior"], renewed["LockDelay"], renewed["TTL"]) == ("delete", 2_000_000_000, "60s")
    assert renewed["NodeChecks"] == []


async def test_destroy_releases_the_lock(consul: Consul, prefix: str) -> None:
    session_id = await consul.session.create(name=prefix, lock_delay=0)
    await consul.kv.put(f"{prefix}/lock", "me", acquire=session_id)

    assert await consul.session.destroy(session_id) is True

    assert (await consul.session.info(session_id))[1] is None
    _, entry = await consul.kv.get(f"{prefix}/lock")
    assert "Session" not in entry
    other = await consul.session.create(name=f"{prefix}-other")
    assert await consul.kv.put(f"{prefix}/lock", "you", acquire=other) is True


async def ttl_session(
    consul: Consul, http: aiohttp.ClientSession, prefix: str, behavior: str
) -> tuple[str, float]:
    """A session with the shortest TTL the agent allows (py-consul refuses TTLs under 10s)."""
    ttl = (await consul.agent.self())["DebugConfig"]["SessionTTLMin"]
    async with http.put(
        "/v1/session/create", json={"Name": prefix, "TTL": ttl, "Behavior": behavior}
    ) as response:
        assert response.status == 200, await response.text()
        session_id: str = (await response.json())["ID"]
    return session_id, await debug_duration(consul, "SessionTTLMin")


async def test_ttl_invalidation_releases_keys_and_arms_lock_delay(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    session_id, ttl = await ttl_session(consul, http, prefix, "release")
    key = f"{prefix}/leader"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    async def invalidated() -> bool:
        return (await consul.session.info(session_id))[1] is None

    await eventually(invalidated, seconds=2 * ttl + 15)

    _, entry = await consul.kv.get(key)
    assert entry is not None
    assert "Session" not in entry
    assert entry["Value"] == b"me"
    successor = await consul.session.create(name=f"{prefix}-next")
    assert await consul.kv.put(key, "next", acquire=successor) is False  # the 15s lock-delay


async def test_ttl_invalidation_deletes_keys(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    session_id, ttl = await ttl_session(consul, http, prefix, "delete")
    key = f"{prefix}/ephemeral"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    async def deleted() -> bool:
        _, entry = await consul.kv.get(key)
        return entry is None

    await eventually(deleted, seconds=2 * ttl + 15)
    assert (await consul.session.info(session_id))[1] is None


# --- validation against the node and its checks (sessionCreateTxn, validateSessionChecksTxn) ------


async def test_create_needs_a_registered_node(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    assert await call(http, "PUT", "/v1/session/create", json={"Name": prefix, "Node": f"{prefix}-gone"}) == (
        500,
        "apply failed: Missing node registration",
    )
    assert await call(http, "PUT", "/v1/session/create", json={"Name": prefix, "Node": ""}) == (
        500,
        "Must provide Node",
    )
    # The nodes table folds case; the session keeps the name as given.
    node = (await consul.agent.self())["Config"]["NodeName"]
    session_id = await create_session(http, {"Name": prefix, "Node": node.upper()})
    assert (await consul.session.info(session_id))[1]["Node"] == node.upper()
    _, on_node = await consul.session.node(node)
    assert session_id in [s["ID"] for s in on_node]


async def test_create_validates_node_checks(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    check_id = await ttl_node_check(http, consul, f"{prefix}-node", passing=False)
    missing = f"{prefix}-missing"

    assert await call(
        http, "PUT", "/v1/session/create", json={"Name": prefix, "NodeChecks": ["serfHealth", missing]}
    ) == (500, f"apply failed: Missing check '{missing}' registration")
    assert await call(http, "PUT", "/v1/session/create", json={"Name": prefix, "NodeChecks": [check_id]}) == (
        500,
        f"apply failed: Check '{check_id}' is in critical state",
    )

    await consul.agent.check.ttl_warn(check_id)  # only critical refuses
    await synced(consul, check_id, "warning")
    session_id = await create_session(http, {"Name": prefix, "NodeChecks": [check_id]})
    _, info = await consul.session.info(session_id)
    assert info["NodeChecks"] == [check_id]


def service_checks(*check_ids: str) -> list[dict[str, str]]:
    return [{"ID": check_id, "Namespace": ""} for check_id in check_ids]


async def test_create_validates_service_checks(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check_id = await ttl_service(consul, prefix, passing=False)
    missing = f"service:{prefix}-missing"

    for named, reason in (
        (missing, f"apply failed: Missing check '{missing}' registration"),
        (check_id, f"apply failed: Check '{check_id}' is in critical state"),
    ):
        body = {"Name": prefix, "ServiceChecks": service_checks(named)}
        assert await call(http, "PUT", "/v1/session/create", json=body) == (500, reason)

    await consul.agent.check.ttl_pass(check_id)
    await synced(consul, check_id, "passing")
    assert await create_session(http, {"Name": prefix, "ServiceChecks": service_checks(check_id)})


# --- shapes (structs.Session, fixupEmptySessionChecks) ------------------------------------------


async def test_shapes_of_sessions_with_service_checks(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    me = await consul.agent.self()
    node = me["Config"]["NodeName"]
    check_id = await ttl_service(consul, prefix)

    # Namespace left out decodes as ""; the default NodeChecks stay; the default Checks go.
    with_serf = await create_session(http, {"Name": f"{prefix}-a", "ServiceChecks": [{"ID": check_id}]})
    only_service = await create_session(
        http, {"Name": f"{prefix}-b", "NodeChecks": [], "ServiceChecks": service_checks(check_id)}
    )
    # The deprecated Checks field is kept (and shown) next to the default NodeChecks.
    deprecated = await create_session(http, {"Name": f"{prefix}-c", "Checks": [check_id]})

    _, a = await consul.session.info(with_serf)
    assert list(a) == [
        "ID",
        "Name",
        "Node",
        "LockDelay",
        "Behavior",
        "TTL",
        "NodeChecks",
        "ServiceChecks",
        "CreateIndex",
        "ModifyIndex",
    ]
    assert a == {
        "ID": with_serf,
        "Name": f"{prefix}-a",
        "Node": node,
        "LockDelay": 15_000_000_000,
        "Behavior": "release",
        "TTL": "",
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": [{"ID": check_id, "Namespace": ""}],
        "CreateIndex": a["CreateIndex"],
        "ModifyIndex": a["CreateIndex"],
    }
    _, b = await consul.session.info(only_service)
    assert (b["NodeChecks"], b["ServiceChecks"], "Checks" in b) == ([], service_checks(check_id), False)
    _, c = await consul.session.info(deprecated)
    assert list(c)[6:9] == ["NodeChecks", "ServiceChecks", "Checks"]
    assert (c["NodeChecks"], c["ServiceChecks"], c["Checks"]) == (["serfHealth"], None, [check_id])

    _, listed = await consul.session.list()
    assert [s for s in listed if s["ID"] in (with_serf, only_service, deprecated)] == sorted(
        [a, b, c], key=lambda s: s["ID"]
    )
    _, on_node = await consul.session.node(node)
    assert a in on_node and b in on_node and c in on_node


async def test_create_ignores_unknown_fields(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    # Session.UnmarshalJSON decodes with plain json.Unmarshal, without DisallowUnknownFields.
    session_id = await create_session(http, {"Name": prefix, "Colour": "red"})

    assert (await consul.session.info(session_id))[1]["Name"] == prefix


# --- invalidation by a check (ensureCheckTxn / deleteCheckTxn -> deleteSessionTxn) --------------


async def gone(consul: Consul, session_id: str) -> None:
    async def invalidated() -> bool:
        return (await consul.session.info(session_id))[1] is None

    await eventually(invalidated, seconds=15)


async def test_critical_node_check_ends_session_and_releases_its_keys(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check_id = await ttl_node_check(http, consul, f"{prefix}-node")
    session_id = await create_session(
        http, {"Name": prefix, "NodeChecks": ["serfHealth", check_id], "Behavior": "release"}
    )
    key = f"{prefix}/leader"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    await consul.agent.check.ttl_fail(check_id)
    await gone(consul, session_id)

    _, entry = await consul.kv.get(key)
    assert (entry["Value"], entry["LockIndex"], "Session" in entry) == (b"me", 1, False)


async def test_critical_service_check_ends_session_and_deletes_its_keys(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check_id = await ttl_service(consul, prefix)
    session_id = await create_session(
        http, {"Name": prefix, "ServiceChecks": service_checks(check_id), "Behavior": "delete"}
    )
    key = f"{prefix}/ephemeral"
    assert await consul.kv.put(key, "me", acquire=session_id) is True

    await consul.agent.check.ttl_fail(check_id)
    await gone(consul, session_id)

    assert (await consul.kv.get(key))[1] is None


async def test_deregistering_a_named_check_ends_the_session(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check_id = await ttl_service(consul, prefix)
    session_id = await create_session(http, {"Name": prefix, "ServiceChecks": service_checks(check_id)})
    untouched = await create_session(http, {"Name": f"{prefix}-serf"})

    await consul.agent.service.deregister(prefix)
    await gone(consul, session_id)

    assert (await consul.session.info(untouched))[1] is not None


# --- lock-delay (deleteSessionTxn arms it, kvsPreApply enforces it on ?acquire) ------------------


async def test_lock_delay_follows_invalidation_until_it_passes(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    check_id = await ttl_node_check(http, consul, f"{prefix}-node")
    holder = await create_session(http, {"Name": prefix, "NodeChecks": [check_id], "LockDelay": "1s"})
    successor = await create_session(http, {"Name": f"{prefix}-next", "LockDelay": "0s"})
    key = f"{prefix}/leader"
    assert await consul.kv.put(key, "holder", acquire=holder) is True

    await consul.agent.check.ttl_fail(check_id)
    await gone(consul, holder)

    assert await consul.kv.put(key, "successor", acquire=successor) is False
    assert await consul.kv.put(key, "plain") is True  # only ?acquire waits for the lock-delay

    async def acquired() -> bool:
        return bool(await consul.kv.put(key, "successor", acquire=successor))

    await eventually(acquired, seconds=15)
    _, entry = await consul.kv.get(key)
    assert (entry["Session"], entry["Value"]) == (successor, b"successor")


async def test_release_arms_no_lock_delay_but_destroy_does(
    consul: Consul, http: aiohttp.ClientSession, prefix: str
) -> None:
    holder = await create_session(http, {"Name": prefix})  # the default 15s lock-delay
    other = await create_session(http, {"Name": f"{prefix}-other"})
    released, destroyed = f"{prefix}/released", f"{prefix}/destroyed"
    assert await consul.kv.put(released, "h", acquire=holder) is True
    assert await consul.kv.put(destroyed, "h", acquire=holder) is True

    assert await consul.kv.put(released, "h", release=holder) is True
    assert await consul.kv.put(released, "o", acquire=other) is True

    assert await consul.session.destroy(holder) is True
    assert await consul.kv.put(destroyed, "o", acquire=other) is False


async def test_zero_lock_delay_disables_it(consul: Consul, http: aiohttp.ClientSession, prefix: str) -> None:
    holder = await create_session(http, {"Name": prefix, "LockDelay": "0s"})
    other = await create_session(http, {"Name": f"{prefix}-other"})
    key = f"{prefix}/lock"
    assert await consul.kv.put(key, "h", acquire=holder) is True

    assert await consul.session.destroy(holder) is True

    assert await consul.kv.put(key, "o", acquire=other) is True


@pytest.mark.parametrize(
    ("lock_delay", "nanoseconds"),
    [
        ("1s", 1_000_000_000),
        ("1500ms", 1_500_000_000),
        ("999ns", 999_000_000_000),  # any duration under 1000ns is taken as seconds
        ("0s", 0),
        ("120s", 120_000_000_000),  # stored as given; deleteSessionTxn caps the delay it applies at 60s
        (2, 2_000_000_000),
        (2.7, 2_000_000_000),  # time.Duration(2.7) is 2ns, then seconds
        (1_500_000_000, 1_500_000_000),
        (0, 0),
        (True, 0),  # neither string nor number: a zero duration
        (None, 15_000_000_000),  # null keeps the default
    ],
)
async def test_lock_delay_forms(
    consul: Consul, http: aiohttp.ClientSession, prefix: str, lock_delay: object, nanoseconds: int
) -> None:
    session_id = await create_session(http, {"Name": prefix, "LockDelay": lock_delay})

    assert (await consul.session.info(session_id))[1]["LockDelay"] == nanoseconds


async def test_bad_lock_delay_is_a_decode_error(http: aiohttp.ClientSession, prefix: str) -> None:
    assert await call(http, "PUT", "/v1/session/create", json={"Name": prefix, "LockDelay": "soon"}) == (
        400,
        'Request decode failed: time: invalid duration "soon"',
    )
