"""The router's placement tally (epoxi.placement.Placements) and the metric it feeds."""

from __future__ import annotations

from epoxi import placement
from epoxi.v1 import node_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def node(
    id: str, pipelines: int = 0, load: int = 0, ips: tuple[str, ...] = ("10.0.0.1",)
) -> node_pb2.NodeInfo:
    return node_pb2.NodeInfo(id=id, egress_ips=list(ips), pipeline_count=pipelines, load=load)


def test_candidates_rank_by_pipelines_given_then_load_then_id() -> None:
    nodes = [
        node("a", pipelines=9, load=5),
        node("b", load=1),
        node("c", load=1),
        node("x", ips=("10.0.0.9",)),
    ]
    assert [n.id for n in placement.candidates(nodes, "10.0.0.1")] == ["b", "c", "a"]
    counts = {"a": 1, "b": 2, "c": 1}
    assert [n.id for n in placement.candidates(nodes, "10.0.0.1", counts)] == ["c", "a", "b"]
    assert placement.best_node(nodes, "10.0.0.1", counts) == nodes[2]


def test_keys_placed_in_a_row_spread_over_equal_nodes() -> None:
    nodes = [node("a"), node("b")]
    tally = placement.Placements()
    for i in range(20):
        best = placement.best_node(nodes, "10.0.0.1", tally.pipelines({}, ["a", "b"]))
        assert best is not None
        tally.place(f"k{i}", best.id)
    assert (tally.pending("a"), tally.pending("b"), len(tally)) == (10, 10, 20)


def test_placing_a_key_again_moves_it_and_forget_checks_the_node() -> None:
    tally = placement.Placements()
    tally.place("k", "a")
    tally.place("k", "b")
    assert (tally.node_for("k"), tally.pending("a"), tally.pending("b")) == ("b", 0, 1)
    tally.forget("k", "a")  # placed on b now: a's failure does not drop it
    assert tally.node_for("k") == "b"
    tally.forget("k", "b")
    assert (tally.node_for("k"), len(tally), tally.pending("b")) == (None, 0, 0)


def test_the_tally_keeps_only_what_the_view_does_not_show_yet() -> None:
    clock = Clock()
    tally = placement.Placements(ttl=60, clock=clock)
    tally.place("visible", "a")
    tally.place("on-a-gone-node", "gone")
    tally.place("old", "a")
    clock.now += 30
    tally.place("fresh", "a")
    clock.now += 31
    tally.prune(visible={"visible": []}, nodes={"a": node("a")})
    assert (len(tally), tally.node_for("fresh"), tally.pending("a"), tally.pending("gone")) == (1, "a", 1, 0)
    assert tally.pipelines({"a": 3, "b": 2}, ["a", "b", "c"]) == {"a": 4, "b": 2, "c": 0}
