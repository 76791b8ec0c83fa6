"""The policy check without a testbed: its grid, the fit/validate split, the hit rate and model
error on recorded numbers, and the constants file the controller loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fogmig.experiments.policycheck import CheckPlan, evaluate, missing_runs, prepare_out
from fogmig.experiments.policycheck_fit import calibrate, load_records, sample
from fogmig.experiments.policycheck_points import (
    FULL_POINTS,
    MOBILITY,
    ORCHESTRATION,
    QUICK_POINTS,
    Point,
    Role,
    grid,
    select,
    split,
)
from fogmig.experiments.policycheck_score import (
    ERROR_GOAL,
    error_stats,
    percentile,
    score_point,
    verdict,
)
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Technique
from fogmig.platform.controller.config import (
    ControllerConfig,
    load_cost_constants,
    save_cost_constants,
)
from fogmig.platform.migration.record import MigrationRecord, Round
from fogmig.policies.calibration import fit_constants
from fogmig.policies.conditions import ServiceConditions
from fogmig.policies.costmodel import CostConstants, predict

CAPS = NodeCapabilities(postcopy=True, native_predump=False)

TRUE = CostConstants(
    dump_fixed_s=0.3,
    freeze_s_per_gib=0.9,
    delta_s_per_gib=1.2,
    restore_fixed_s=0.5,
    restore_s_per_gib=3.0,
    rebuild_s_per_gib=0.8,
    image_overhead_bytes=40_000,
    lazy_dump_bytes=1_500_000,
    throughput_efficiency=0.8,
    transfer_round_trips=1.0,
    demand_faults=120,
)


def _record(
    point: Point, technique: Technique, k: CostConstants, scale: float = 1.0
) -> MigrationRecord:
    """What a migration at ``point`` measures if the platform follows the model with ``k``;
    ``scale`` stretches every time (a platform the model does not describe)."""
    state = (point.state_mb + 16) << 20
    svc = ServiceConditions(state_bytes=state, dirty_rate_bytes_per_s=point.dirty_rate_bytes_per_s)
    p = predict(technique, svc, point.link, source=CAPS, constants=k)
    c = p.components
    rounds = [
        Round(
            index=r.index,
            dump_time_s=0,
            freeze_time_s=0,
            transfer_time_s=0,
            bytes_dumped=0,
            bytes_sent=r.bytes,
        )
        for r in p.rounds
    ]
    return MigrationRecord(
        migration_id=f"{point.name}-{technique.value}",
        service="pcheck",
        source="gw1",
        destination="gw2",
        technique=technique,
        outcome=Outcome.COMPLETED,
        pre_dump_time_s=c.pre_dump_time * scale,
        pre_dump_transfer_time_s=c.pre_dump_transfer_time * scale,
        dump_time_s=c.dump_time * scale,
        dump_transfer_time_s=c.dump_transfer_time * scale,
        resume_time_s=c.resume_time * scale,
        faulted_pages_transfer_time_s=c.faulted_pages_transfer_time * scale,
        pre_dump_bytes=c.pre_dump_bytes,
        dump_bytes=c.dump_bytes,
        faulted_pages_bytes=c.faulted_pages_bytes,
        rounds=rounds,
        state_bytes=state,
        dirty_rate_bytes_per_s=point.dirty_rate_bytes_per_s,
        link_rate_bit_per_s=point.rate_mbit * 1e6,
        link_rtt_s=point.rtt_ms / 1000,
    )


def _timed(
    technique: Technique, total: float, downtime: float, state: int = 30 << 20
) -> MigrationRecord:
    return MigrationRecord(
        migration_id=f"x-{technique.value}-{total}",
        service="pcheck",
        source="gw1",
        destination="gw2",
        technique=technique,
        outcome=Outcome.COMPLETED,
        pre_dump_time_s=total - downtime,
        dump_time_s=downtime,
        state_bytes=state,
    )


# --- the grid --------------------------------------------------------------------------------


def test_grids_have_both_roles_unique_names_and_small_states() -> None:
    for quick in (True, False):
        points = grid(quick=quick)
        fit, held = split(points)
        assert fit
        assert held
        assert len({p.name for p in points}) == len(points)
        assert all(8 <= p.state_mb <= 32 for p in points)
    assert set(QUICK_POINTS) <= set(FULL_POINTS)


def test_full_grid_has_every_paper_configuration_on_its_link_and_dirty_rate() -> None:
    by_name = {p.name: p for p in FULL_POINTS}
    for name, link, kbps in (
        ("A", MOBILITY, 10),
        ("B", MOBILITY, 500),
        ("C", ORCHESTRATION, 10),
        ("D", ORCHESTRATION, 500),
    ):
        p = by_name[name]
        assert (p.rate_mbit, p.rtt_ms, p.dirty_kbps) == (*link, kbps)


def test_grid_spans_beyond_the_paper() -> None:
    quick, full = grid(quick=True), grid(quick=False)
    # a dirty rate close to the link rate in the quick grid, one above it in the full grid
    assert any(0.8 <= p.dirty_to_link < 1.0 for p in quick)
    assert any(p.dirty_to_link > 1.0 for p in full)
    assert max(p.rtt_ms for p in full) > MOBILITY[1]
    assert min(p.rtt_ms for p in full) < ORCHESTRATION[1]
    assert max(p.rate_mbit for p in full) > ORCHESTRATION[0]
    assert min(p.rate_mbit for p in full) < MOBILITY[0]
    # the fit points vary every column the fit needs: RTT, rate and state size
    fit, _ = split(quick)
    assert len({p.rtt_ms for p in fit}) >= 2
    assert len({p.state_mb for p in fit}) >= 2


def test_select_and_split_reject_what_cannot_be_validated() -> None:
    assert [p.name for p in select(QUICK_POINTS, ["D", "C"])] == ["C", "D"]
    with pytest.raises(ConfigError, match="no point Z"):
        select(QUICK_POINTS, ["Z"])
    with pytest.raises(ConfigError, match="one of each role"):
        split([p for p in QUICK_POINTS if p.role is Role.FIT])


def test_a_point_is_a_link_profile_and_round_trips() -> None:
    p = QUICK_POINTS[0]
    prof = p.profile()
    assert (prof.rate_mbit, prof.rtt_ms) == (p.rate_mbit, p.rtt_ms)
    assert Point.from_dict(p.to_dict()) == p


# --- fit and validate -------------------------------------------------------------------------


def _write(plan: CheckPlan, point: Point, technique: Technique, rec: MigrationRecord) -> None:
    path = plan.record_path(point, technique, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rec.to_json())


def test_constants_are_fitted_on_the_fit_points_only(tmp_path: Path) -> None:
    plan = CheckPlan(out=tmp_path, points=QUICK_POINTS, runs=1, quick=True)
    for p in QUICK_POINTS:
        # held-out points measure twice as slow: if the fit saw them, it would not find TRUE
        scale = 1.0 if p.role is Role.FIT else 2.0
        for t in Technique:
            _write(plan, p, t, _record(p, t, TRUE, scale))
    result = evaluate(plan, CAPS)
    fit_only = fit_constants(
        [
            sample(_record(p, t, TRUE), native_predump=False)
            for p in QUICK_POINTS
            if p.role is Role.FIT
            for t in Technique
        ]
    )
    got = result.calibration.constants.to_dict()
    for name, want in fit_only.to_dict().items():
        # the records' JSON round trip moves the last bits; a fault count by one
        assert got[name] == pytest.approx(want, rel=1e-6, abs=2 if name == "demand_faults" else 0)
        assert got[name] == pytest.approx(TRUE.to_dict()[name], rel=0.02, abs=3), name
    # in-sample the model is exact; on the held-out points it is half the measured times
    assert result.fitted_on.total is not None
    assert result.fitted_on.total.p90 < 0.02
    assert result.held_out.total is not None
    assert result.held_out.total.median == pytest.approx(0.5, abs=0.02)
    assert result.held_out.total.verdict == "not met"
    for name in ("csv", "summary", "report", "constants"):
        assert result.files[name].exists()
    summary = json.loads(result.files["summary"].read_text())
    assert summary["lines"][0].startswith("held-out points: policy within 10%")
    assert load_cost_constants(result.files["constants"]) == result.calibration.constants
    rows = result.files["csv"].read_text().splitlines()
    assert len(rows) == 1 + len(QUICK_POINTS) * len(Technique)
    assert "# Policy validation" in result.files["report"].read_text()


def test_an_unmeasured_point_is_left_out_not_counted_as_a_miss(tmp_path: Path) -> None:
    plan = CheckPlan(out=tmp_path, points=QUICK_POINTS, runs=1, score_only=True)
    prepare_out(plan)
    unmeasured = next(p for p in QUICK_POINTS if p.role is Role.VALIDATE)
    for p in QUICK_POINTS:
        if p is not unmeasured:
            for t in Technique:
                _write(plan, p, t, _record(p, t, TRUE))
    result = evaluate(plan, CAPS)
    assert unmeasured.name not in {r.point.name for r in result.results}
    held = len([p for p in QUICK_POINTS if p.role is Role.VALIDATE]) - 1
    assert result.held_out.points == held
    assert result.held_out.hits == held  # the model is exact here: every pick is the best


def test_resume_keeps_records_and_a_new_run_refuses_them(tmp_path: Path) -> None:
    plan = CheckPlan(out=tmp_path, points=QUICK_POINTS, runs=2)
    prepare_out(plan)
    p = QUICK_POINTS[0]
    _write(plan, p, Technique.COLD, _record(p, Technique.COLD, TRUE))
    assert (Technique.COLD, 1) not in missing_runs(plan, p)
    assert (Technique.COLD, 2) in missing_runs(plan, p)
    with pytest.raises(ConfigError, match="already holds 1 records"):
        prepare_out(CheckPlan(out=tmp_path, points=QUICK_POINTS, runs=2))
    prepare_out(CheckPlan(out=tmp_path, points=QUICK_POINTS, runs=2, resume=True))
    with pytest.raises(ConfigError, match="other points"):
        prepare_out(CheckPlan(out=tmp_path, points=FULL_POINTS, runs=2, resume=True))


def test_calibrate_leaves_out_unusable_records_and_loads_only_records(tmp_path: Path) -> None:
    p = QUICK_POINTS[0]
    good = _record(p, Technique.COLD, TRUE)
    bad = good.model_copy(update={"migration_id": "rolled", "outcome": Outcome.ROLLED_BACK})
    (tmp_path / "a.json").write_text(good.to_json())
    (tmp_path / "b.json").write_text(bad.to_json())
    (tmp_path / "plan.json").write_text('{"points": []}')
    found = load_records([tmp_path])
    assert len(found.records) == 2
    assert [p.name for p, _ in found.skipped] == ["plan.json"]
    cal = calibrate(found.records)
    assert len(cal.residuals) == 1
    assert "rolled_back" in cal.left_out[0][1]
    with pytest.raises(ConfigError, match="no usable"):
        calibrate([(None, bad)])


# --- hit rate and model error on recorded numbers ---------------------------------------------


POINT = Point(
    name="X", state_mb=8, rate_mbit=72.41, rtt_ms=6.94, dirty_kbps=10, role=Role.VALIDATE, note=""
)


def _score(downtimes: dict[Technique, list[float]], k: CostConstants | None = None):  # type: ignore[no-untyped-def]
    records = [_timed(t, total=d + 5.0, downtime=d) for t, ds in downtimes.items() for d in ds]
    return score_point(POINT, records, constants=k or CostConstants(), caps=CAPS)


def test_best_is_the_least_median_downtime_and_a_hit_is_within_ten_percent() -> None:
    res = _score(
        {
            Technique.COLD: [4.0],
            Technique.PRECOPY: [1.0, 9.0, 1.1],  # median 1.1
            Technique.POSTCOPY: [1.0],
            Technique.HYBRID: [2.0],
        }
    )
    assert res.best is Technique.POSTCOPY
    assert res.techniques[Technique.PRECOPY].measured_downtime_s == pytest.approx(1.1)
    assert res.techniques[Technique.PRECOPY].runs == 3
    # within 10%: pre-copy (1.1 = best + 10%) counts, hybrid (2.0) does not
    as_precopy = replace(res, pick=Technique.PRECOPY)
    assert as_precopy.hit
    assert as_precopy.pick_over_best == pytest.approx(1.1)
    as_hybrid = replace(res, pick=Technique.HYBRID)
    assert not as_hybrid.hit
    assert as_hybrid.pick_over_best == pytest.approx(2.0)
    assert replace(res, pick=Technique.POSTCOPY).hit


def test_a_pick_that_did_not_complete_is_a_miss() -> None:
    rolled = _timed(Technique.PRECOPY, 6.0, 1.0).model_copy(update={"outcome": Outcome.ROLLED_BACK})
    records = [_timed(Technique.COLD, 3.0, 3.0), rolled]
    res = score_point(
        POINT,
        records,
        constants=CostConstants(),
        caps=CAPS,
        techniques=(Technique.COLD, Technique.PRECOPY),
    )
    assert res.best is Technique.COLD
    assert res.techniques[Technique.PRECOPY].failed == 1
    assert res.techniques[Technique.PRECOPY].measured_downtime_s is None
    if res.pick is Technique.PRECOPY:
        assert not res.hit


def test_hit_rate_and_error_verdicts_from_recorded_numbers() -> None:
    res = _score({t: [1.0] for t in Technique})
    v = verdict([res, res, res], Role.VALIDATE)
    assert v.points == 3
    assert v.hits == 3
    assert v.hit_goal_met
    assert verdict([res], Role.FIT).points == 0
    # errors: each technique's predicted against measured
    t = res.techniques[Technique.COLD]
    assert t.downtime_error == pytest.approx(abs(t.predicted_downtime_s - 1.0) / 1.0)
    assert t.total_error == pytest.approx(abs(t.predicted_total_s - 6.0) / 6.0)
    assert v.downtime is not None
    assert v.downtime.n == 12


def test_percentiles_and_the_error_goal() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)
    assert percentile([5.0], 0.9) == 5.0
    ok = error_stats([0.1] * 9 + [0.2])
    assert ok is not None
    assert ok.verdict == "met"
    half = error_stats([0.1] * 6 + [0.5] * 4)
    assert half is not None
    assert half.median == pytest.approx(0.1)
    assert half.verdict == "median only"
    bad = error_stats([ERROR_GOAL + 0.01] * 3)
    assert bad is not None
    assert bad.verdict == "not met"
    assert error_stats([]) is None


def test_hit_goal_needs_ninety_percent() -> None:
    hit = _score({t: [1.0] for t in Technique})
    miss_records = {t: [1.0] for t in Technique}
    # make the policy's own pick measure far worse than the others
    miss_records[hit.pick] = [50.0]
    miss = _score(miss_records)
    assert not miss.hit
    v = verdict([hit] * 8 + [miss], Role.VALIDATE)
    assert v.hit_rate == pytest.approx(8 / 9)
    assert not v.hit_goal_met
    assert "not met" in v.lines()[0]
    v = verdict([hit] * 9 + [miss], Role.VALIDATE)
    assert v.hit_rate == pytest.approx(0.9)
    assert v.hit_goal_met


# --- the constants file -----------------------------------------------------------------------


def test_constants_file_round_trip(tmp_path: Path) -> None:
    path = save_cost_constants(tmp_path / "k.json", TRUE, about={"records": 3})
    assert load_cost_constants(path) == TRUE
    assert json.loads(path.read_text())["about"] == {"records": 3}
    assert ControllerConfig(cost_constants=load_cost_constants(path)).cost_constants == TRUE


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"kind": "something", "version": 1, "constants": {}}', "not a cost constants file"),
        ('{"kind": "fogmig-cost-constants", "version": 9, "constants": {}}', "version 9"),
        ('{"kind": "fogmig-cost-constants", "version": 1}', "no 'constants'"),
        (
            '{"kind": "fogmig-cost-constants", "version": 1, "constants": {"dump_fixd_s": 1}}',
            "unknown constants: dump_fixd_s",
        ),
        (
            '{"kind": "fogmig-cost-constants", "version": 1, "constants": {"dump_fixed_s": "1"}}',
            "must be a number",
        ),
        (
            '{"kind": "fogmig-cost-constants", "version": 1, "constants": {"demand_faults": 1.5}}',
            "whole number",
        ),
        (
            '{"kind": "fogmig-cost-constants", "version": 1, "constants": {"dump_fixed_s": -1}}',
            "must be >= 0",
        ),
    ],
)
def test_a_bad_constants_file_is_a_config_error_naming_it(
    tmp_path: Path, content: str, match: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_cost_constants(path)
    assert str(path) in str(info.value)
    assert info.value.hint


def test_a_missing_constants_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_cost_constants(tmp_path / "none.json")


def test_a_partial_constants_file_keeps_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(
        '{"kind": "fogmig-cost-constants", "version": 1, "constants": {"demand_faults": 7}}'
    )
    assert load_cost_constants(path) == CostConstants(demand_faults=7)


def test_the_documentation_lists_every_point_as_the_grid_defines_it() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "policy-validation.md").read_text()
    for p in FULL_POINTS:
        quick = "yes" if p in QUICK_POINTS else "no"
        row = (
            f"| {p.name} | {p.role.value} | {quick} | {p.state_mb} | {p.rate_mbit:g} "
            f"| {p.rtt_ms:g} | {p.dirty_kbps:g} | {p.dirty_to_link:.3f} |"
        )
        assert row in doc, row
