"""Forwarding rules of a gateway: DNAT+SNAT to where each service runs, nothing when local."""

from __future__ import annotations

import logging

import pytest

from fogmig.platform.agent import forwarding
from fogmig.platform.agent.forwarding import Location, changed_ports, forwarding_rules
from fogmig.platform.base.proc import Completed


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


async def test_flows_not_dropped_after_a_change_are_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[list[str]] = []
    outcomes = iter(
        [
            (1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
            (0, "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been deleted."),
            (1, "conntrack v1.4.7 (conntrack-tools): Operation failed: Device or resource busy"),
            (1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
        ]
    )

    async def fake_run(argv: list[str], **kw: object) -> Completed:
        calls.append(list(argv))
        code, err = next(outcomes) if argv[0] == "conntrack" else (0, "")
        return Completed(list(argv), code, "", err)

    monkeypatch.setattr(forwarding, "run", fake_run)
    fwd = forwarding.Forwarder(node="gw1", data_ip="10.79.0.1", netns="fm-gw1")
    fwd._installed = True  # the chains are hooked: only the rules and the flows change
    caplog.set_level(logging.INFO, logger=forwarding.__name__)
    await fwd.update({"s": Location("s", "gw2", "10.79.0.2", 5702)})
    # Both directions: a flow first seen from the service has the port as its source.
    assert ["conntrack", "-D", "-p", "udp", "--orig-port-dst", "5702"] in calls
    assert ["conntrack", "-D", "-p", "udp", "--orig-port-src", "5702"] in calls
    assert "0 flow entries" in caplog.text
    assert "1 flow entries" in caplog.text
    assert "not dropped" not in caplog.text
    await fwd.update({"s": Location("s", "gw1", "10.79.0.1", 5702)})
    assert "the flows of UDP port 5702 (--orig-port-dst) were not dropped (exit 1)" in caplog.text
    assert "Device or resource busy" in caplog.text
