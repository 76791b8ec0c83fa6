"""``fogmig experiment``: its options become the grid, and ``--report`` works without a testbed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.experiments.grid import GridSpec
from fogmig.experiments.store import RunRecord, save_run, write_grid
from fogmig.platform.cli.experiment import _spec
from fogmig.platform.cli.main import build_parser


def test_the_default_is_the_full_grid_with_its_control() -> None:
    args = build_parser().parse_args(["experiment"])
    assert _spec(args) == GridSpec()
    assert args.out == "results/evaluation"


def test_quick_scales_down_and_options_narrow_the_grid() -> None:
    args = build_parser().parse_args(
        ["experiment", "--quick", "--configurations", "C", "--techniques", "cold,hybrid",
         "--control", "none", "--runs", "1"]
    )  # fmt: skip
    spec = _spec(args)
    assert spec == GridSpec.quick_grid(
        configurations=("C",), techniques=("cold", "hybrid"), control=(), runs=1
    )
    assert spec.baseline, "--quick runs the paper's toolchain beside fogmig"
    args = build_parser().parse_args(["experiment", "--quick", "--no-baseline"])
    assert not _spec(args).baseline
    args = build_parser().parse_args(["experiment", "--baseline"])
    assert _spec(args) == GridSpec(baseline=True)


def test_unknown_names_and_both_resume_and_report_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "--configurations", "A,E"])
    assert "unknown configuration E" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "--resume", "x", "--report", "y"])


def test_report_rebuilds_from_stored_runs(tmp_path: Path, evaluation_runs: list[RunRecord]) -> None:
    write_grid(tmp_path, GridSpec(configurations=("A", "C", "D"), runs=2, control=()))
    for run in evaluation_runs:
        save_run(tmp_path, run)
    args = build_parser().parse_args(["experiment", "--report", str(tmp_path), "--no-png"])
    assert args.func(args) == 0
    assert "T4-cold-time" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").is_file()
