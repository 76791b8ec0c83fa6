"""Forwarding rules of a gateway: DNAT+SNAT to where each service runs, nothing when local."""

from __future__ import annotations

from fogmig.platform.agent.forwarding import Location, changed_ports, forwarding_rules


def test_services_elsewhere_are_forwarded_local_ones_are_not() -> None:
    rules = forwarding_rules(
        "gw1",
        "10.79.0.1",
        [
            Location("s1", "gw1", "10.79.0.1", 5701),
            Location("s2", "gw2", "10.79.0.2", 5702),
        ],
    )
    assert rules[0] == "*nat"
    assert rules[-1] == "COMMIT"
    text = "\n".join(rules)
    assert "--dport 5701" not in text
    assert (
        "-A FOGMIG-FWD-PRE -d 10.79.0.1/32 -p udp -m udp --dport 5702 -m comment --comment s2 "
        "-j DNAT --to-destination 10.79.0.2:5702"
    ) in rules
    assert (
        "-A FOGMIG-FWD-POST -d 10.79.0.2/32 -p udp -m udp --dport 5702 -m comment --comment s2 "
        "-j SNAT --to-source 10.79.0.1"
    ) in rules


def test_no_services_gives_empty_chains() -> None:
    assert forwarding_rules("gw1", "10.79.0.1", []) == [
        "*nat",
        ":FOGMIG-FWD-PRE - [0:0]",
        ":FOGMIG-FWD-POST - [0:0]",
        "COMMIT",
    ]


def test_changed_ports_cover_moves_arrivals_and_departures() -> None:
    a = Location("s1", "gw1", "10.79.0.1", 5701)
    b = Location("s1", "gw2", "10.79.0.2", 5701)
    c = Location("s2", "gw2", "10.79.0.2", 5702)
    d = Location("s3", "gw3", "10.79.0.3", 5703)
    assert changed_ports({"s1": a, "s3": d}, {"s1": b, "s2": c, "s3": d}) == {5701, 5702}
    assert changed_ports({"s1": a}, {}) == {5701}
    assert changed_ports({"s1": a}, {"s1": a}) == set()
