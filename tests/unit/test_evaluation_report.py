"""The evaluation's figures and report, built from recorded runs, agree with the raw CSV."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from fogmig.experiments import doc
from fogmig.experiments.claims import CLAIMS
from fogmig.experiments.figures import FIGURES, build
from fogmig.experiments.grid import GridSpec
from fogmig.experiments.report import write_report
from fogmig.experiments.stats import Summary
from fogmig.experiments.store import RunRecord, read_csv, save_run, write_grid
from fogmig.platform.base.vocabulary import Outcome


@pytest.fixture
def grid_out(tmp_path: Path, evaluation_runs: list[RunRecord]) -> Path:
    write_grid(tmp_path, GridSpec(configurations=("A", "C", "D"), runs=2, control=()))
    for run in evaluation_runs:
        save_run(tmp_path, run)
    return tmp_path


def test_the_report_has_a_verdict_for_every_claim_and_the_csv_means(grid_out: Path) -> None:
    files = write_report(
        grid_out, spec=GridSpec(configurations=("A", "C", "D"), runs=2, control=()), png=False
    )
    md = files.markdown.read_text()
    for verdict in files.verdicts:
        assert f"| {verdict.claim.id} |" in md
        assert f"{verdict.claim.id} ({verdict.status.value})" in md
    assert len(files.verdicts) == len(CLAIMS)
    rows = [r for r in read_csv(grid_out) if r["configuration"] == "C" and r["technique"] == "cold"]
    mean_total = statistics.fmean(float(r["total_time_s"]) for r in rows)
    line = next(x for x in md.splitlines() if x.startswith("| C | cold |"))
    assert f"| {mean_total:.2f} ± " in line
    # The floor at the asked rate, beside the measured time.
    floor = statistics.fmean(float(r["transferred_bytes"]) * 8 / 72.41e6 for r in rows)
    assert f"| {floor:.2f} ± " in line


def test_the_html_report_carries_every_figure_inline(grid_out: Path) -> None:
    files = write_report(grid_out, png=False)
    page = files.html.read_text()
    assert page.count('class="plotly-graph-div"') == len(FIGURES)
    assert '<script src="figures/plotly.min.js"></script>' in page
    for spec in FIGURES:
        assert (grid_out / "figures" / f"{spec.name}.html").is_file()
    assert (grid_out / "figures" / "plotly.min.js").is_file()
    assert files.png_problem is None


def test_a_failing_claim_is_reported_with_its_likely_reason(grid_out: Path) -> None:
    md = write_report(grid_out, png=False).markdown.read_text()
    hybrid = next(c for c in CLAIMS if c.id == "T4-hybrid-time")
    assert "T4-hybrid-time (partly)" in md
    assert f"Likely reason for the difference: {hybrid.differs}." in md


def test_figure_seven_stacks_the_components_to_the_total(evaluation_runs: list[RunRecord]) -> None:
    summary = Summary(evaluation_runs)
    spec = next(f for f in FIGURES if f.name == "fig7-total-time")
    fig = build(spec, summary, ["C"])
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == [label for _m, label in spec.components]
    totals = next(t for t in fig.data if t.name == "total (95% CI)")
    assert list(totals.x) == ["cold", "precopy", "postcopy", "hybrid"]
    for i, technique in enumerate(totals.x):
        stacked = sum(b.y[i] for b in bars)
        assert stacked == pytest.approx(totals.y[i])
        assert totals.y[i] == pytest.approx(summary.mean("total_time_s", "fogmig", "C", technique))
        assert totals.error_y.array[i] == pytest.approx(
            summary.get("total_time_s", "fogmig", "C", technique).half_width
        )


def test_a_baseline_engine_gets_its_own_bars(evaluation_runs: list[RunRecord]) -> None:
    baseline = [r.model_copy(update={"engine": "runc-rsync"}) for r in evaluation_runs]
    summary = Summary([*evaluation_runs, *baseline])
    fig = build(FIGURES[0], summary, ["C"])
    assert "cold<br>runc-rsync" in list(fig.data[0].x)
    assert len(fig.data[0].x) == 8


def test_markdown_and_html_render_the_same_table() -> None:
    d = doc.Document(title="t")
    d.add(doc.TableBlock(headers=["a", "b|c"], rows=[["1", "<2>"]]))
    assert "| a | b\\|c |" in doc.to_markdown(d)
    assert "<td>&lt;2&gt;</td>" in doc.to_html(d)


def test_the_report_compares_fogmig_with_the_papers_toolchain(
    tmp_path: Path, evaluation_runs: list[RunRecord]
) -> None:
    theirs = []
    for run in evaluation_runs:
        if run.configuration != "C" or run.technique not in ("cold", "precopy"):
            continue
        record = run.record.model_copy(
            update={"migration_id": f"baseline-{run.record.migration_id}"}
        )
        if run.technique == "cold":
            record.dump_transfer_time_s += 5.0  # the baseline's copy is slower
        else:
            record.outcome = Outcome.ROLLED_BACK
            record.error = "pre-dump: CRIU is missing features"
        theirs.append(run.model_copy(update={"engine": "runc-rsync", "record": record}))
    for run in [*evaluation_runs, *theirs]:
        save_run(tmp_path, run)
    md = write_report(tmp_path, png=False).markdown.read_text()
    assert "# Against the paper's toolchain" in md
    ours = [r.record for r in evaluation_runs if r.configuration == "C" and r.technique == "cold"]
    slower = [r.record for r in theirs if r.record.outcome is Outcome.COMPLETED]
    total = statistics.fmean(r.total_time_s for r in ours) / statistics.fmean(
        r.total_time_s for r in slower
    )
    section = md.split("# Against the paper's toolchain", 1)[1].splitlines()
    cold = next(x for x in section if x.startswith("| C | cold |"))
    assert cold.startswith(f"| C | cold | {total:.2f} |")
    assert total < 1
    assert cold.endswith("| 1.00 |  |")
    assert any(
        x.startswith("| C | precopy | - |") and "missing features" in x for x in md.splitlines()
    )


def test_a_baseline_error_in_the_table_keeps_its_cause() -> None:
    from fogmig.experiments.report import short_reason

    why = (
        "runc checkpoint --pre-dump failed: `nsenter --net=/var/run/netns/fm-gw1 -- runc --root "
        "/run/fogmig/nodes/gw1/runc --criu criu checkpoint --image-path /var/lib/x/pre "
        '--pre-dump bench` exited 1: level=error msg="CRIU is missing features"; '
        "`criu check --feature mem_dirty_track`: Warn (criu/cr-check.c:824): Dirty tracking is "
        "OFF. Memory snapshot will not work."
    )
    cell = short_reason(why)
    assert cell.startswith("runc checkpoint --pre-dump failed: (command) exited 1")
    assert cell.endswith("Dirty tracking is OFF. Memory snapshot will not work.")
    assert len(cell) <= 240
    assert short_reason("x" * 500).count("...") == 1
    assert len(short_reason("x" * 500)) == 240
