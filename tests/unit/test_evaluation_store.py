"""The grid's record store and resuming an interrupted grid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from fogmig.experiments.eta import Eta
from fogmig.experiments.grid import Cell, GridSpec, base_configuration
from fogmig.experiments.run import GridResult, run_grid
from fogmig.experiments.store import (
    RUNS_CSV,
    RunRecord,
    done_cells,
    load_runs,
    read_csv,
    read_grid,
    run_path,
    save_run,
    write_grid,
)
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.testbed.profiles import LinkProfile


def _as(run: RunRecord, cell: Cell, engine: str = "fogmig") -> RunRecord:
    return run.model_copy(
        update={
            "engine": engine,
            "configuration": cell.configuration,
            "paper_configuration": base_configuration(cell.configuration),
            "technique": cell.technique,
            "run": cell.run,
        }
    )


def test_runs_come_back_with_their_configuration_run_and_link(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    run = evaluation_runs[0].model_copy(
        update={"link_rate_measured_mbit": 11.1, "link_rtt_measured_ms": 124.0}
    )
    save_run(tmp_path, run)
    (back,) = load_runs(tmp_path)
    assert back == run
    (row,) = read_csv(tmp_path)
    assert (row["engine"], row["configuration"], row["technique"], row["run"]) == (
        "fogmig", "A", "cold", "1",
    )  # fmt: skip
    assert float(row["link_rate_asked_mbit"]) == 11.34
    assert float(row["link_rate_measured_mbit"]) == 11.1
    assert float(row["link_rtt_measured_ms"]) == 124.0
    assert float(row["total_time_s"]) == pytest.approx(run.record.total_time_s)


def test_csv_and_json_hold_every_run_of_every_engine(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    for run in evaluation_runs:
        save_run(tmp_path, run)
    baseline = _as(evaluation_runs[0], Cell("A", "cold", 1), engine="runc-rsync")
    save_run(tmp_path, baseline)
    rows = read_csv(tmp_path)
    doc = json.loads((tmp_path / "runs.json").read_text())
    assert len(rows) == len(doc) == len(evaluation_runs) + 1
    assert [r["engine"] for r in rows].count("runc-rsync") == 1
    assert [(r["configuration"], r["technique"], r["run"]) for r in rows] == [
        (d["configuration"], d["technique"], str(d["run"])) for d in doc
    ]
    assert done_cells(tmp_path, "runc-rsync") == {Cell("A", "cold", 1)}
    assert len(done_cells(tmp_path, "fogmig")) == len(evaluation_runs)


def test_a_half_written_run_does_not_count_as_done(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    save_run(tmp_path, evaluation_runs[0])
    cell = Cell("A", "hybrid", 1)
    partial = run_path(tmp_path, "fogmig", cell).with_suffix(".json.tmp")
    partial.write_text('{"engine": "fog')
    assert done_cells(tmp_path, "fogmig") == {evaluation_runs[0].cell}


def test_a_corrupt_run_file_is_an_error_not_a_skip(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    save_run(tmp_path, evaluation_runs[0])
    run_path(tmp_path, "fogmig", Cell("A", "hybrid", 1)).write_text("{}")
    with pytest.raises(ConfigError, match="not a run record"):
        load_runs(tmp_path)


def test_resume_needs_the_grid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not the output of a grid"):
        read_grid(tmp_path)
    spec = GridSpec.quick_grid(configurations=("C",), control=())
    write_grid(tmp_path, spec)
    assert read_grid(tmp_path) == spec


class FakeLink:
    """Stands in for the testbed: stores a run per cell, and can be interrupted."""

    def __init__(self, template: RunRecord, *, stop_after: int | None = None) -> None:
        self.template = template
        self.stop_after = stop_after
        self.ran: list[Cell] = []
        self.links: list[tuple[str, int | None]] = []

    async def __call__(
        self,
        spec: GridSpec,
        out: Path,
        *,
        link: LinkProfile,
        mtu: int | None,
        cells: Sequence[Cell],
        eta: Eta,
        result: GridResult,
        say: object,
    ) -> None:
        self.links.append((link.name, mtu))
        for cell in cells:
            if self.stop_after is not None and len(self.ran) == self.stop_after:
                raise KeyboardInterrupt
            run = _as(self.template, cell).model_copy(update={"mtu": mtu, "wall_s": 3.0})
            save_run(out, run)
            self.ran.append(cell)
            result.ran.append(run)
            eta.finished(cell, run.wall_s)


async def test_an_interrupted_grid_resumes_where_it_stopped(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    spec = GridSpec(configurations=("A", "C"), techniques=("cold", "postcopy"), runs=2)
    write_grid(tmp_path, spec)
    first = FakeLink(evaluation_runs[0], stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        await run_grid(spec, tmp_path, say=lambda _m: None, link_runner=first)
    assert first.ran == spec.cells()[:5]
    second = FakeLink(evaluation_runs[0])
    result = await run_grid(read_grid(tmp_path), tmp_path, say=lambda _m: None, link_runner=second)
    assert result.skipped == 5
    assert second.ran == spec.cells()[5:]
    assert not set(first.ran) & set(second.ran)
    assert done_cells(tmp_path, "fogmig") == set(spec.cells())
    assert len(read_csv(tmp_path)) == len(spec.cells()) == 12
    # The first run had finished the mobility link; the resumed one starts at the fast link.
    assert second.links == [("orchestration", None), ("orchestration", 1500)]
    assert (tmp_path / RUNS_CSV).is_file()


async def test_a_finished_grid_runs_nothing_again(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    spec = GridSpec(configurations=("C",), techniques=("cold",), runs=1, control=())
    await run_grid(spec, tmp_path, say=lambda _m: None, link_runner=FakeLink(evaluation_runs[0]))
    again = FakeLink(evaluation_runs[0])
    result = await run_grid(spec, tmp_path, say=lambda _m: None, link_runner=again)
    assert (again.ran, again.links, result.skipped) == ([], [], 1)


async def test_with_the_baseline_a_cell_is_done_only_when_both_engines_ran_it(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    spec = GridSpec(configurations=("C",), techniques=("cold",), runs=2, control=(), baseline=True)
    assert GridSpec.from_json(spec.to_json()) == spec
    # fogmig ran both cells, the baseline only the first: the second is still to do.
    for cell in spec.cells():
        save_run(tmp_path, _as(evaluation_runs[0], cell))
    first = spec.cells()[0]
    save_run(tmp_path, _as(evaluation_runs[0], first).model_copy(update={"engine": "runc-rsync"}))
    again = FakeLink(evaluation_runs[0])
    result = await run_grid(spec, tmp_path, say=lambda _m: None, link_runner=again)
    assert again.ran == spec.cells()[1:]
    assert result.skipped == 1
