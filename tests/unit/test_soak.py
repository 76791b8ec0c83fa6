"""``fogmig soak`` without the testbed: its options, its seeded plan (services, devices,
migrations, restarts), its figures from the devices' records and checks, its verdict and the
reading of a process's memory and descriptors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fogmig.device_sim.events import ContinuityCheck, RequestKind, RequestOutcome, RequestRecord
from fogmig.platform.apps.soak.figures import (
    MigrationTotals,
    ProcessUsage,
    continuity_figures,
    growth,
    problems,
    request_figures,
    usage,
)
from fogmig.platform.apps.soak.plan import SoakOptions, plan_soak
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Technique

GATEWAYS = ["gw1", "gw2"]


def options(**kw: object) -> SoakOptions:
    return SoakOptions(out=Path("/tmp/soak"), **kw)  # type: ignore[arg-type]


def test_the_plan_is_seeded_and_moves_each_service_back_and_forth() -> None:
    o = options(migrations=12, devices=4, broker_restarts=2, agent_restarts=1, seed=7)
    plan = plan_soak(o, GATEWAYS, list(Technique))
    assert plan == plan_soak(o, GATEWAYS, list(Technique))
    assert plan != plan_soak(options(migrations=12, devices=4, seed=8), GATEWAYS, list(Technique))
    assert [s.name for s in plan.services] == ["k0", "k1"]
    assert {d.service for d in plan.devices} == {"k0", "k1"}
    where = {s.name: s.start for s in plan.services}
    for step in plan.steps:
        assert step.destination != where[step.service]
        where[step.service] = step.destination
    kinds = [s.disruption for s in plan.steps if s.disruption is not None]
    assert sorted(kinds) == ["agent", "broker", "broker"]
    assert plan.steps[0].disruption is None  # the first migration warms up
    [agent] = [s for s in plan.steps if s.disruption == "agent"]
    assert agent.target in GATEWAYS
    assert all(0 <= s.delay_s <= 3 for s in plan.steps)


def test_techniques_are_drawn_only_from_those_the_nodes_can_do() -> None:
    o = options(migrations=40, broker_restarts=0, agent_restarts=0)
    plan = plan_soak(o, GATEWAYS, [Technique.COLD, Technique.PRECOPY])
    assert {s.technique for s in plan.steps} == {Technique.COLD, Technique.PRECOPY}
    every = plan_soak(o, GATEWAYS, list(Technique))
    assert {s.technique for s in every.steps} == set(Technique)


@pytest.mark.parametrize(
    "bad",
    [
        {"migrations": 0},
        {"devices": 0},
        {"nodes": 1},
        {"migrations": 2, "broker_restarts": 2, "agent_restarts": 1},
        {"services": 5, "devices": 3},
        {"interval_s": 0.0},
    ],
)
def test_options_out_of_range_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        options(**bad)


def _post(device: str, seq: int, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        device=device,
        request=RequestKind.POST,
        seq=seq,
        attempt=1,
        service="k0",
        gateway="gw1",
        address="10.0.0.1",
        port=5800,
        sent_at=float(seq),
        latency_s=0.01,
        outcome=RequestOutcome.OK if ok else RequestOutcome.TIMEOUT,
    )


def _check(device: str, at: float, **kw: object) -> ContinuityCheck:
    return ContinuityCheck(device, "k0", "gw1", at, "periodic", **kw)  # type: ignore[arg-type]


def test_figures_count_requests_losses_and_mismatches_per_device() -> None:
    records = [_post("d0", 1), _post("d0", 2, ok=False), _post("d1", 1)]
    checks = [
        _check("d0", 1.0, verified=True, matches=True),
        _check("d0", 2.0, verified=True, matches=False, lost=2, doubled=1, detail="gap"),
        _check("d0", 3.0, verified=True, matches=False, lost=1),
        _check("d1", 3.0, verified=False),
    ]
    r = request_figures(records, checks)
    assert (r.sent, r.acknowledged, r.failed, r.lost, r.doubled) == (3, 2, 1, 2, 1)
    c = continuity_figures(checks, ["d0", "d1"])
    assert (c.checks, c.passed, c.mismatched, c.unverified) == (4, 1, 2, 1)
    assert c.final_unverified == ["d1"]
    found = problems(MigrationTotals(asked=2, completed=1, failed=1), r, c, ["boom"])
    assert found[0] == "boom"
    assert any("failed" in p for p in found)
    assert any("lost" in p for p in found)
    assert any("twice" in p for p in found)
    assert any("d1" in p for p in found)


def test_a_clean_run_with_a_rollback_passes() -> None:
    records = [_post("d0", 1)]
    checks = [_check("d0", 1.0, verified=True, matches=True)]
    totals = MigrationTotals(asked=2, completed=1, rolled_back=1)
    found = problems(
        totals, request_figures(records, checks), continuity_figures(checks, ["d0"]), []
    )
    assert found == []


def test_usage_reads_this_process_and_growth_compares_start_and_end() -> None:
    me = usage(os.getpid())
    assert me.rss_bytes is not None
    assert me.rss_bytes > 0
    assert me.open_fds is not None
    assert me.open_fds >= 3
    gone = usage(2**22 + 17)  # beyond pid_max: no such process
    assert (gone.rss_bytes, gone.open_fds) == (None, None)
    later = me.model_copy(update={"rss_bytes": me.rss_bytes + 4096, "open_fds": me.open_fds + 1})
    assert growth({"x": ProcessUsage(start=me, end=later)}) == {
        "x": {"rss_bytes": 4096, "open_fds": 1}
    }
