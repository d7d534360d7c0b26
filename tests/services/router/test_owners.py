"""The owner cache, the owner lookup against the dev registry's placement records, and the
placement tally's pruning (services/router/owners.py)."""

from __future__ import annotations

from epoxi.registry.client import Consul
from epoxi.registry.ownership import Owner
from epoxi.v1 import node_pb2
from services.router.discovery import ClusterSnapshot
from services.router.owners import NewKeys, OwnerCache, Owners
from tests.services.router.nodes import ContractNodes

IP = "127.0.0.2"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def node(id: str, pipelines: int = 0, load: int = 0) -> node_pb2.NodeInfo:
    return node_pb2.NodeInfo(
        id=id, address=f"{id}.test:1", egress_ips=[IP], pipeline_count=pipelines, load=load
    )


def snapshot(*nodes: node_pb2.NodeInfo) -> ClusterSnapshot:
    return ClusterSnapshot(
        nodes={n.id: n for n in nodes}, pipeline_counts={n.id: n.pipeline_count for n in nodes}
    )


def test_the_cache_keeps_the_most_recently_used_keys_up_to_its_bound() -> None:
    cache = OwnerCache(max_entries=3)
    a = Owner("a", "a.test:1")
    for key in ("k1", "k2", "k3"):
        cache.put(key, a)
    assert cache.get("k1") == a  # now the most recently used
    cache.put("k4", Owner("b", "b.test:1"))
    assert (len(cache), cache.get("k2"), cache.get("k1")) == (3, None, a)
    assert cache.get("k4") == Owner("b", "b.test:1")
    # Equal owners are one object, whatever the keys.
    cache.put("k5", Owner("a", "a.test:1"))
    assert cache.get("k5") is cache.get("k1")


def test_forgetting_an_entry_can_be_limited_to_the_node_it_names() -> None:
    cache = OwnerCache()
    cache.put("k", Owner("b", "b.test:1"))
    cache.forget("k", "a")  # a failed: the entry names b, so it stays
    assert cache.get("k") == Owner("b", "b.test:1")
    cache.forget("k", "b")
    assert cache.get("k") is None


async def test_a_lookup_reads_the_placement_record_once_and_then_answers_from_the_cache(
    consul: Consul, contract_nodes: ContractNodes
) -> None:
    a = await contract_nodes.start("a", IP)
    await contract_nodes.all_passing()
    assert await a.ownership.claim("k") is None
    owners = Owners(consul)
    snap = snapshot(a.info)
    assert await owners.lookup("k", snap) == a.info
    assert await owners.lookup("k", snap) == a.info
    assert owners.registry_reads == 1
    assert owners.cache.get("k") == Owner("a", a.info.address)
    # Nobody holds "free": nothing is cached, and the next lookup asks again.
    assert await owners.lookup("free", snap) is None
    assert await owners.lookup("free", snap) is None
    assert (owners.registry_reads, owners.cache.get("free")) == (3, None)


async def test_an_owner_that_is_not_passing_is_ignored_and_a_stale_entry_is_replaced(
    consul: Consul, contract_nodes: ContractNodes
) -> None:
    a = await contract_nodes.start("a", IP)
    await contract_nodes.all_passing()
    assert await a.ownership.claim("k") is None
    owners = Owners(consul)
    # The view does not show a passing: the record's owner is not used, and not cached.
    assert await owners.lookup("k", snapshot(node("b"))) is None
    assert owners.cache.get("k") is None
    # An entry naming a node the view does not show is not used: the record decides again.
    owners.learn("k", Owner("gone", "gone.test:1"))
    assert await owners.lookup("k", snapshot(a.info)) == a.info
    assert (owners.cache.get("k"), owners.registry_reads) == (Owner("a", a.info.address), 2)
    # The address is the view's: a node that came back on another port is dialed there.
    moved = node_pb2.NodeInfo()
    moved.CopyFrom(a.info)
    moved.address = "127.0.0.1:1"
    assert await owners.lookup("k", snapshot(moved)) == moved
    # A record freed meanwhile: the stale entry goes, and nothing replaces it.
    owners.learn("k", Owner("gone", "gone.test:1"))
    await a.release("k")
    assert await owners.lookup("k", snapshot(a.info)) is None
    assert owners.cache.get("k") is None


def test_a_placement_counts_at_once_and_spreads_the_next_keys() -> None:
    tally = NewKeys()
    snap = snapshot(node("a"), node("b", pipelines=1))
    placed = []
    for i in range(5):
        best = tally.rank(snap, IP)[0]
        tally.place(f"k{i}", best)
        placed.append(best.id)
    # b registered one already: a gets the first, then they alternate.
    assert placed == ["a", "a", "b", "a", "b"]
    assert (tally.pending("a"), tally.pending("b"), len(tally)) == (3, 2, 5)


def test_an_answered_placement_leaves_once_its_nodes_entry_changes() -> None:
    tally = NewKeys()
    a0 = node("a")
    tally.place("answered", a0)
    tally.place("in flight", a0)
    tally.answered("answered", "a")
    tally.prune(snapshot(a0))  # nothing new registered yet: both still count
    assert tally.pending("a") == 2
    # a registered again (its new pipeline count, or only its load): the answered key is in
    # its count now; the call still in flight keeps counting.
    tally.prune(snapshot(node("a", pipelines=1)))
    assert (tally.node_for("answered"), tally.node_for("in flight")) == (None, "a")
    tally.answered("in flight", "a")
    tally.prune(snapshot(node("a", pipelines=2, load=3)))
    assert len(tally) == 0


def test_a_placement_leaves_at_once_when_the_key_did_not_start_there() -> None:
    tally = NewKeys()
    tally.place("k", node("a"))
    tally.place("k", node("b"))  # tried b next: moved
    tally.forget("k", "a")  # a's refusal does not drop b's placement
    assert (tally.node_for("k"), tally.pending("a"), tally.pending("b")) == ("b", 0, 1)
    tally.forget("k", "b")
    assert len(tally) == 0


def test_a_placement_leaves_with_its_node_and_after_the_ttl() -> None:
    clock = Clock()
    tally = NewKeys(ttl=60, clock=clock)
    tally.place("on a", node("a"))
    tally.place("on b", node("b"))
    clock.now += 30
    tally.place("fresh on a", node("a"))
    tally.prune(snapshot(node("a")))  # b left the view
    assert (tally.node_for("on a"), tally.node_for("on b")) == ("a", None)
    clock.now += 31
    tally.prune(snapshot(node("a")))
    assert (len(tally), tally.node_for("fresh on a")) == (1, "a")
