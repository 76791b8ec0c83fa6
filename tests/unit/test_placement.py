"""Placement: follow the device, load balancing with hysteresis, draining a node."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from fogmig.policies.conditions import InvalidConditionsError
from fogmig.policies.placement import (
    Hold,
    LoadPolicy,
    MoveReason,
    MoveRequest,
    NodeSnapshot,
    ServicePlacement,
    balance_load,
    drain,
    follow_device,
    mark_draining,
)

MIB = 1 << 20
GIB = 1 << 30


def node(
    name: str,
    load: float,
    mem_gib: float = 2,
    *,
    services: tuple[str, ...] = (),
    online: bool = True,
    accepting: bool = True,
) -> NodeSnapshot:
    return NodeSnapshot(
        name=name,
        load=load,
        mem_free_bytes=int(mem_gib * GIB),
        services=services,
        online=online,
        accepting=accepting,
    )


def svc(
    name: str, where: str, mem_mib: int = 100, load: float | None = None, device: str | None = None
) -> ServicePlacement:
    return ServicePlacement(
        service=name, node=where, mem_bytes=mem_mib * MIB, load=load, device=device
    )


def moves(out: Sequence[MoveRequest | Hold]) -> list[MoveRequest]:
    return [m for m in out if isinstance(m, MoveRequest)]


def holds(out: Sequence[MoveRequest | Hold]) -> list[Hold]:
    return [h for h in out if isinstance(h, Hold)]


def apply(
    nodes: list[NodeSnapshot], placements: list[ServicePlacement], ms: Sequence[MoveRequest]
) -> tuple[list[NodeSnapshot], list[ServicePlacement]]:
    """What the agents would report once the moves are done."""
    by_name = {n.name: n for n in nodes}
    places = {p.service: p for p in placements}
    for m in ms:
        p = places[m.service]
        share = p.load or 0.0
        src, dst = by_name[m.source], by_name[m.target]
        by_name[m.source] = NodeSnapshot(
            src.name, max(0.0, src.load - share), src.mem_free_bytes + p.mem_bytes
        )
        by_name[m.target] = NodeSnapshot(
            dst.name, dst.load + share, dst.mem_free_bytes - p.mem_bytes
        )
        places[m.service] = ServicePlacement(p.service, m.target, p.mem_bytes, p.load, p.device)
    return list(by_name.values()), list(places.values())


# --- follow the device -----------------------------------------------------------------------


def test_follow_device_moves_to_the_new_gateway() -> None:
    nodes = [node("gw1", 0.2), node("gw2", 0.9)]
    out = follow_device(svc("s", "gw1", device="dev1"), "gw2", nodes)
    assert isinstance(out, MoveRequest)
    assert (out.service, out.source, out.target, out.reason) == (
        "s",
        "gw1",
        "gw2",
        MoveReason.FOLLOW_DEVICE,
    )
    assert "dev1" in out.detail
    assert json.loads(json.dumps(out.to_dict()))["reason"] == "follow_device"


def test_follow_device_already_there() -> None:
    out = follow_device(svc("s", "gw1"), "gw1", [node("gw1", 0.2)])
    assert isinstance(out, Hold)
    assert "already" in out.detail


@pytest.mark.parametrize(
    ("gw", "expect"),
    [
        (node("gw2", 0.1, online=False), "offline"),
        (node("gw2", 0.1, accepting=False), "draining"),
        (node("gw2", 0.1, mem_gib=0.1), "MiB free"),
    ],
)
def test_follow_device_needs_an_able_gateway(gw: NodeSnapshot, expect: str) -> None:
    out = follow_device(svc("s", "gw1", mem_mib=100), "gw2", [node("gw1", 0.1), gw])
    assert isinstance(out, Hold)
    assert expect in out.detail
    assert out.node == "gw1"


def test_follow_device_unknown_gateway_and_busy_service() -> None:
    out = follow_device(svc("s", "gw1"), "gw9", [node("gw1", 0.1)])
    assert isinstance(out, Hold)
    assert "not a known node" in out.detail
    busy = follow_device(
        svc("s", "gw1"), "gw2", [node("gw1", 0.1), node("gw2", 0.1)], busy=frozenset({"s"})
    )
    assert isinstance(busy, Hold)
    assert "in progress" in busy.detail


# --- load balancing --------------------------------------------------------------------------


def test_no_overload_no_moves() -> None:
    nodes = [node("a", 0.79), node("b", 0.1)]
    assert balance_load(nodes, [svc("s", "a", load=0.5)]) == []


def test_overloaded_node_sheds_its_smallest_sufficient_service_to_the_least_loaded() -> None:
    nodes = [node("a", 0.95), node("b", 0.30), node("c", 0.10)]
    places = [
        svc("big", "a", mem_mib=800, load=0.30),
        svc("small", "a", mem_mib=50, load=0.20),
        svc("tiny", "a", mem_mib=10, load=0.05),  # not enough on its own
    ]
    out = balance_load(nodes, places)
    assert len(out) == 1
    m = out[0]
    assert isinstance(m, MoveRequest)
    assert (m.service, m.source, m.target, m.reason) == ("small", "a", "c", MoveReason.LOAD_BALANCE)


def test_largest_shedder_when_no_single_service_suffices() -> None:
    nodes = [node("a", 1.0), node("b", 0.0)]
    places = [svc("x", "a", load=0.05), svc("y", "a", load=0.1), svc("z", "a", load=0.08)]
    (m,) = moves(
        balance_load(nodes, places, policy=LoadPolicy(high_watermark=0.7, low_watermark=0.5))
    )
    assert m.service == "y"


def test_hysteresis_targets_must_stay_under_the_low_watermark() -> None:
    policy = LoadPolicy(high_watermark=0.8, low_watermark=0.6)
    nodes = [node("a", 0.9), node("b", 0.45)]
    # b is not overloaded, but taking 0.2 would put it at 0.65 > 0.6: no move
    out = balance_load(nodes, [svc("s", "a", load=0.2)], policy=policy)
    assert moves(out) == []
    (h,) = holds(out)
    assert h.service is None
    assert h.node == "a"
    assert "0.65" in h.detail
    # a lighter target takes it
    out = balance_load([*nodes, node("c", 0.35)], [svc("s", "a", load=0.2)], policy=policy)
    assert [m.target for m in moves(out)] == ["c"]


def test_balancing_does_not_flap() -> None:
    nodes = [node("a", 0.95), node("b", 0.2)]
    places = [svc("s1", "a", load=0.3), svc("s2", "a", load=0.3), svc("s3", "b", load=0.2)]
    first = moves(balance_load(nodes, places))
    assert len(first) == 1
    nodes2, places2 = apply(nodes, places, first)
    for _ in range(3):
        assert balance_load(nodes2, places2) == []


def test_two_overloaded_nodes_do_not_pile_onto_one_target() -> None:
    policy = LoadPolicy(high_watermark=0.8, low_watermark=0.6)
    nodes = [node("a", 0.9), node("b", 0.9), node("c", 0.2)]
    places = [svc("sa", "a", load=0.3), svc("sb", "b", load=0.3)]
    out = balance_load(nodes, places, policy=policy)
    ms = moves(out)
    # c can take one service (0.5) but not both (0.8 > 0.6)
    assert len(ms) == 1
    assert ms[0].target == "c"
    assert len(holds(out)) == 1


def test_busy_services_unknown_share_and_memory() -> None:
    nodes = [node("a", 0.9, services=("s1", "s2")), node("b", 0.1, mem_gib=0.1), node("c", 0.1)]
    places = [svc("s1", "a", mem_mib=50), svc("s2", "a", mem_mib=20)]
    out = balance_load(nodes, places, busy=frozenset({"s2"}))
    (m,) = moves(out)
    # share unknown: 0.9 / 2 services; b lacks memory for the reserve, so c
    assert (m.service, m.target) == ("s1", "c")
    assert "0.45" in m.detail


def test_overloaded_node_without_movable_services_holds() -> None:
    out = balance_load(
        [node("a", 0.99), node("b", 0.1)], [svc("s", "a", load=0.5)], busy=frozenset({"s"})
    )
    (h,) = out
    assert isinstance(h, Hold)
    assert "no service that can be moved" in h.detail


def test_offline_and_draining_nodes_are_not_targets() -> None:
    nodes = [node("a", 0.95), node("b", 0.0, online=False), node("c", 0.0, accepting=False)]
    out = balance_load(nodes, [svc("s", "a", load=0.3)])
    assert moves(out) == []
    (h,) = holds(out)
    assert "offline" in h.detail
    assert "draining" in h.detail


def test_invalid_policies_and_snapshots() -> None:
    with pytest.raises(InvalidConditionsError):
        LoadPolicy(high_watermark=0.5, low_watermark=0.6)
    with pytest.raises(InvalidConditionsError):
        LoadPolicy(moves_per_node=0)
    with pytest.raises(InvalidConditionsError):
        NodeSnapshot("a", load=-0.1, mem_free_bytes=0)
    with pytest.raises(InvalidConditionsError):
        balance_load([node("a", 0.1), node("a", 0.2)], [])


# --- drain -----------------------------------------------------------------------------------


def test_drain_moves_every_service_to_the_least_loaded_with_room() -> None:
    nodes = [node("x", 0.5), node("b", 0.3), node("c", 0.1)]
    places = [
        svc("s1", "x", mem_mib=300, load=0.1),
        svc("s2", "x", mem_mib=100, load=0.1),
        svc("s3", "x", mem_mib=200, load=0.1),
        svc("other", "b", load=0.3),
    ]
    out = drain("x", nodes, places)
    ms = moves(out)
    assert [m.service for m in ms] == ["s1", "s3", "s2"]  # largest first
    assert all(m.source == "x" and m.reason is MoveReason.DRAIN for m in ms)
    # c: 0.1 -> s1 (0.2) -> s3 (0.3), now tied with b at 0.3; b has more free memory -> s2 to b
    assert [m.target for m in ms] == ["c", "c", "b"]
    assert holds(out) == []


def test_drain_spreads_as_loads_change() -> None:
    nodes = [node("x", 0.6), node("b", 0.2), node("c", 0.2, mem_gib=1)]
    places = [svc(f"s{i}", "x", mem_mib=100, load=0.15) for i in range(4)]
    targets = [m.target for m in moves(drain("x", nodes, places))]
    assert sorted(targets) == ["b", "b", "c", "c"]


def test_drain_holds_what_does_not_fit() -> None:
    nodes = [node("x", 0.5), node("b", 0.2, mem_gib=0.5)]
    places = [svc("huge", "x", mem_mib=2000, load=0.1), svc("ok", "x", mem_mib=100, load=0.1)]
    out = drain("x", nodes, places)
    assert [m.service for m in moves(out)] == ["ok"]
    (h,) = holds(out)
    assert h.service == "huge"
    assert "MiB free" in h.detail


def test_drain_respects_the_high_watermark_and_busy_services() -> None:
    nodes = [node("x", 0.9), node("b", 0.7)]
    out = drain(
        "x", nodes, [svc("s", "x", load=0.2), svc("t", "x", load=0.05)], busy=frozenset({"t"})
    )
    assert moves(out) == []
    assert {h.service for h in holds(out)} == {"s", "t"}


def test_drain_with_no_other_node_and_unknown_node() -> None:
    out = drain("x", [node("x", 0.1)], [svc("s", "x")])
    (h,) = out
    assert isinstance(h, Hold)
    assert "no other node" in h.detail
    with pytest.raises(InvalidConditionsError):
        drain("nope", [node("x", 0.1)], [])


def test_a_draining_node_takes_nothing_from_balancing() -> None:
    nodes = mark_draining([node("a", 0.95), node("x", 0.0)], "x")
    assert not next(n for n in nodes if n.name == "x").accepting
    out = balance_load(nodes, [svc("s", "a", load=0.3)])
    assert moves(out) == []
