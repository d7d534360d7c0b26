"""Named policies in Consul KV: their stored form, which one a pipeline takes, the round trip."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format

from epoxi import policy_store
from epoxi.policy import Policy
from epoxi.policy_store import PolicyError, PolicyTable
from epoxi.registry.client import Consul
from epoxi.v1 import pipeline_pb2
from tests.support import stored_policy as stored

KEY = "example.com_127_0_0_2"
OTHER = "example.org_127_0_0_2"


# The stored form, without a registry.


def test_a_stored_policy_is_protobuf_json_named_by_its_key() -> None:
    raw = b'{"maxConnections": 3, "batch_size": 7, "batchTimeout": "0.5s", "maxRetries": 0}'
    assert policy_store.decode("bulk", raw) == Policy(
        name="bulk", max_connections=3, batch_size=7, batch_timeout=0.5, max_retries=0
    )
    assert policy_store.decode("bulk", policy_store.encode(stored(name="bulk"))).batch_timeout == 0.02


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("bulk", b"", "policy 'bulk' is empty"),
        ("bulk", b"{not json", "policy 'bulk' is not a PipelinePolicy in JSON"),
        ("bulk", b'{"maxConnection": 3}', "policy 'bulk' is not a PipelinePolicy in JSON"),
        ("bulk", b'{"name": "other"}', "policy 'bulk' carries the name 'other'"),
        (
            "bulk",
            b'{"batchTimeout": "-1s"}',
            "policy 'bulk': policy.batch_timeout must be a positive duration",
        ),
        ("no/slash", b"{}", "policy name 'no/slash' must be"),
    ],
)
def test_a_bad_stored_policy_says_why(name: str, raw: bytes, problem: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_store.decode(name, raw)
    assert str(err.value).startswith(problem)


def test_a_policy_that_turns_bad_keeps_its_last_good_version() -> None:
    good = policy_store.decode("bulk", b'{"batchSize": 7}')
    entries: list[dict[str, Any]] = [
        {"Key": "epoxi/policies/bulk", "Value": b"{broken"},
        {"Key": "epoxi/policies/fresh", "Value": b"{broken"},
        {"Key": "epoxi/policies/", "Value": None},
    ]
    found, problems = policy_store.read_policies(entries, {"bulk": good})
    assert found == {"bulk": good}
    assert [p.split(":")[0] for p in problems] == [
        "policy 'bulk' is not a PipelinePolicy in JSON",
        "policy 'fresh' is not a PipelinePolicy in JSON",
    ]
    assert problems[0].endswith("(keeping the previous version)") and problems[1].endswith("(ignored)")


def test_which_policy_a_pipeline_takes() -> None:
    bulk, default, slow = (Policy(name=n, batch_size=i) for i, n in enumerate(["bulk", "default", "slow"], 1))
    table = PolicyTable({"bulk": bulk, "default": default, "slow": slow}, {KEY: "bulk", OTHER: "missing"})
    assert table.for_new_pipeline(KEY) == bulk
    assert table.for_new_pipeline(OTHER) == default  # its assigned policy is not stored
    assert PolicyTable().for_new_pipeline(KEY) is None  # built-in defaults
    assert table.for_running_pipeline(KEY, Policy(name="slow")) == bulk  # the assignment wins
    assert table.for_running_pipeline(OTHER, Policy(name="slow")) == slow  # it follows its name
    inline = Policy(name="inline", batch_size=99)
    assert table.for_running_pipeline(OTHER, inline) is inline


# Against the development registry.


async def test_policies_and_assignments_round_trip_through_kv(consul: Consul) -> None:
    await policy_store.put_policy(consul, "bulk", stored(name="ignored", max_connections=4))
    await policy_store.assign(consul, KEY, "bulk")
    _, raw = await consul.kv.get("epoxi/policies/bulk")
    assert json_format.Parse(raw["Value"], pipeline_pb2.PipelinePolicy()).name == ""  # the key names it
    table, problems = await policy_store.read_table(consul)
    assert problems == [] and table.assignments == {KEY: "bulk"}
    assert table.policies["bulk"] == Policy(name="bulk", max_connections=4, batch_timeout=0.02)

    with pytest.raises(PolicyError):
        await policy_store.put_policy(
            consul, "bad", stored(message_interval=duration_pb2.Duration(seconds=-5))
        )
    assert (await consul.kv.get("epoxi/policies/bad"))[1] is None
    await policy_store.unassign(consul, KEY)
    await policy_store.delete_policy(consul, "bulk")
    assert await policy_store.read_table(consul) == (PolicyTable(), [])
