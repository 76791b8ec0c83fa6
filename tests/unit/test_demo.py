"""The demo's pure parts: its options, the devices' roaming plans (every device roams within the
window, devices take turns), the live view's model fed with controller and device events, and
the end-of-run summary on the terminal."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from rich.console import Console

from fogmig.device_sim.events import (
    ContinuityCheck,
    RequestKind,
    RequestOutcome,
    RequestRecord,
    Roam,
)
from fogmig.platform.apps.demo.plan import DemoOptions, plan_devices, roam_window
from fogmig.platform.apps.demo.view import DemoModel
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.controller.actions import ControllerEvent, EventKind

GATEWAYS = ["gw1", "gw2", "gw3"]


def test_options_defaults_and_limits(tmp_path: Path) -> None:
    o = DemoOptions(out=tmp_path)
    assert (o.duration_s, o.devices, o.nodes, o.profile, o.state_mb) == (
        60.0,
        3,
        3,
        "orchestration",
        8,
    )
    assert o.probe_hz == 20.0
    assert DemoOptions(out=tmp_path, probe_hz=0).probe_hz == 0  # no probes
    for bad in (
        {"nodes": 1},
        {"devices": 0},
        {"duration_s": 5.0},
        {"state_mb": -1},
        {"probe_hz": -1.0},
        {"probe_hz": 1000.0},
    ):
        with pytest.raises(ConfigError):
            DemoOptions(out=tmp_path, **bad)


@pytest.mark.parametrize(
    ("devices", "gateways", "duration", "roams"),
    [(3, GATEWAYS, 60.0, 2), (2, GATEWAYS[:2], 20.0, 2), (2, GATEWAYS[:2], 15.0, 1)],
)
def test_schedule_every_device_roams_in_the_window_in_turns(
    devices: int, gateways: list[str], duration: float, roams: int
) -> None:
    plans = plan_devices(devices, gateways, duration)
    start, end = roam_window(duration)
    assert [(p.name, p.service, p.port) for p in plans] == [
        (f"d{i}", f"s{i}", 5700 + i) for i in range(devices)
    ]
    assert [p.start for p in plans] == [gateways[i % len(gateways)] for i in range(devices)]
    times = []
    for p in plans:
        hops = p.roaming.moves
        assert len(hops) == roams
        current = p.start
        for hop in hops:
            assert start <= hop.at_s < end
            assert hop.gateway != current  # every hop is a real move
            current = hop.gateway
        times += [h.at_s for h in hops]
    # Devices take turns: no two roams at once, so migrations do not pile up on a node.
    for a, b in itertools.pairwise(sorted(times)):
        assert b - a >= 2.0


def test_random_roaming_is_seeded_and_stays_in_the_window() -> None:
    a = plan_devices(3, GATEWAYS, 60.0, kind="random", seed=7, roams=3)
    b = plan_devices(3, GATEWAYS, 60.0, kind="random", seed=7, roams=3)
    c = plan_devices(3, GATEWAYS, 60.0, kind="random", seed=8, roams=3)
    assert a == b
    assert a != c
    start, end = roam_window(60.0)
    for p in a:
        assert len(p.roaming.moves) == 3
        assert all(start <= h.at_s < end for h in p.roaming.moves)


def test_plan_needs_two_gateways() -> None:
    with pytest.raises(ConfigError):
        plan_devices(1, ["gw1"], 60.0)


def _event(kind: EventKind, service: str = "s0", **data: object) -> ControllerEvent:
    return ControllerEvent(kind, 1.0, f"{kind.value} {service}", service, "gw1", dict(data))


def test_model_follows_a_migration_and_the_devices() -> None:
    model = DemoModel(devices={"d0": "s0"}, duration_s=20, location=lambda s: "gw1")
    decision = {"source": "gw1", "destination": "gw2", "technique": "precopy"}
    assert model.controller_event(_event(EventKind.DECISION, decision=decision)) is not None
    model.controller_event(_event(EventKind.ACCEPTED))
    model.controller_event(
        _event(
            EventKind.PROGRESS, phase="dump", bytes_done=2_000_000, bytes_total=4_000_000,
            rate_bytes_per_s=9e6,
        )
    )  # fmt: skip
    m = model.migrating["s0"]
    assert (m.destination, m.phase, m.bytes_done) == ("gw2", "dump", 2_000_000)
    model.fleet_event(
        RequestRecord(
            device="d0", request=RequestKind.POST, seq=1, attempt=1, service="s0", gateway="gw2",
            address="10.79.0.2", port=5700, sent_at=1.0, latency_s=0.006, outcome=RequestOutcome.OK,
            code="2.04",
        )
    )  # fmt: skip
    assert model.fleet_event(Roam("d0", "s0", 1.0, "gw1", "gw2", published=True)) is not None
    line = model.fleet_event(
        ContinuityCheck("d0", "s0", "gw2", 2.0, "final", verified=True, matches=True)
    )
    assert line is not None
    assert "ok" in line
    model.controller_event(_event(EventKind.DONE, outcome="completed"))
    assert model.migrating == {}
    assert (model.completed, model.failed) == (1, 0)
    d = model.devices["d0"]
    assert (d.gateway, d.ok) == ("gw2", 1)
    assert d.last_latency_ms == pytest.approx(6.0)
    console = Console(record=True, width=160)
    console.print(model.render())
    text = console.export_text()
    for needle in ("devices", "d0", "gw2", "migrations in progress", "1 completed"):
        assert needle in text
