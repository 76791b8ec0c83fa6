"""Statistics of the evaluation: Student's t intervals, the physical floor, the summary."""

from __future__ import annotations

import math

import pytest

from fogmig.experiments.stats import Summary, estimate, floor_s, t95
from fogmig.experiments.store import RunRecord
from fogmig.platform.base.vocabulary import Outcome


def test_t_quantiles_for_small_samples_and_the_normal_limit() -> None:
    assert t95(1) == pytest.approx(12.706)
    assert t95(4) == pytest.approx(2.776)
    assert t95(30) == pytest.approx(2.042)
    assert t95(200) == pytest.approx(1.96)
    with pytest.raises(ValueError, match="degree"):
        t95(0)


def test_the_interval_of_five_runs_is_t4_times_the_standard_error() -> None:
    e = estimate([10.0, 11.0, 12.0, 13.0, 14.0])
    assert e.n == 5
    assert e.mean == pytest.approx(12.0)
    sd = math.sqrt(2.5)  # sample variance of 10..14 is 2.5
    assert e.half_width == pytest.approx(2.776 * sd / math.sqrt(5))
    assert (e.low, e.high) == pytest.approx((12.0 - e.half_width, 12.0 + e.half_width))
    assert e.text() == f"12.00 ± {e.half_width:.2f}"


def test_one_value_has_no_interval_and_none_has_no_mean() -> None:
    one = estimate([3.0])
    assert (one.n, one.mean, one.half_width) == (1, 3.0, 0.0)
    assert one.text() == "3.00"
    none = estimate([])
    assert none.n == 0
    assert math.isnan(none.mean)
    assert none.text() == "-"


def test_the_floor_is_bytes_over_the_asked_or_the_measured_rate(
    evaluation_runs: list[RunRecord],
) -> None:
    run = next(r for r in evaluation_runs if r.configuration == "C" and r.technique == "cold")
    moved = run.record.transferred_bytes
    assert floor_s(run) == pytest.approx(moved * 8 / 72.41e6)
    measured = run.model_copy(update={"link_rate_measured_mbit": 36.2})
    assert floor_s(measured, measured=True) == pytest.approx(moved * 8 / 36.2e6)
    assert floor_s(run, measured=True) == floor_s(run)  # nothing measured: the asked rate


def test_the_summary_counts_only_completed_runs(evaluation_runs: list[RunRecord]) -> None:
    cold_c = [r for r in evaluation_runs if r.configuration == "C" and r.technique == "cold"]
    failed = cold_c[0].model_copy(
        update={
            "run": 9,
            "record": cold_c[0].record.model_copy(
                update={"outcome": Outcome.ROLLED_BACK, "dump_transfer_time_s": 500.0}
            ),
        }
    )
    summary = Summary([*evaluation_runs, failed])
    assert summary.attempted("fogmig", "C", "cold") == 3
    total = summary.get("total_time_s", "fogmig", "C", "cold")
    assert total.n == 2
    assert total.mean == pytest.approx(sum(r.record.total_time_s for r in cold_c) / 2)
    assert summary.configurations() == ["A", "C", "D"]
    assert summary.engines() == ["fogmig"]


def test_the_device_downtime_is_left_out_where_no_probe_ran(
    evaluation_runs: list[RunRecord],
) -> None:
    runs = [r for r in evaluation_runs if r.configuration == "D" and r.technique == "hybrid"]
    unprobed = runs[0].model_copy(
        update={"record": runs[0].record.model_copy(update={"device_downtime_s": None})}
    )
    summary = Summary([unprobed, runs[1]])
    seen = summary.get("device_downtime_s", "fogmig", "D", "hybrid")
    assert seen.n == 1
    assert seen.mean == runs[1].record.device_downtime_s
