"""A tiny evaluation grid end to end: runs on the testbed, CSV, figures and report agree.

One link profile (orchestration), a small state, two techniques, one run each, plus the same
cells on a 1500-byte MTU; about two minutes. The command brings the testbed up and down itself.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fogmig.platform.testbed.state import exclusive_use

pytestmark = pytest.mark.system


def fogmig(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (``-P``: the checkout never shadows the stdlib)."""
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_a_tiny_grid_writes_consistent_runs_figures_and_report(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    out = tmp_path / "grid"
    with exclusive_use(timeout=900):
        fogmig("testbed", "down")  # leftovers of a crashed run
    # The command takes the testbed's lease itself, once per link.
    done = fogmig(
        "experiment", "--quick", "--configurations", "C", "--techniques", "cold,postcopy",
        "--runs", "1", "--state-mb", "4", "--control", "C", "--no-baseline", "--out", str(out),
        timeout=600,
    )  # fmt: skip
    assert "verdicts:" in done.stdout
    with (out / "runs.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    runs = json.loads((out / "runs.json").read_text())
    cells = {(r["configuration"], r["technique"], r["run"]) for r in rows}
    assert cells == {(c, t, "1") for c in ("C", "C-mtu1500") for t in ("cold", "postcopy")}
    assert len(runs) == len(rows) == 4
    for row in rows:
        assert row["outcome"] == "completed", row["error"]
        assert row["leftover_images"] == "0"
        assert float(row["link_rate_asked_mbit"]) == 72.41
        # The link was measured before the runs, and was near what was asked.
        assert 0.5 * 72.41 < float(row["link_rate_measured_mbit"]) < 1.1 * 72.41
        assert float(row["link_rtt_measured_ms"]) > 0
        assert float(row["link_rate_bit_per_s"]) > 0
    assert {r["mtu"] for r in rows if r["configuration"] == "C-mtu1500"} == {"1500"}
    assert {r["mtu"] for r in rows if r["configuration"] == "C"} != {"1500"}
    for doc in runs:
        row = next(
            r
            for r in rows
            if (r["configuration"], r["technique"]) == (doc["configuration"], doc["technique"])
        )
        assert float(row["total_time_s"]) == pytest.approx(doc["record"]["total_time_s"])

    figures = out / "figures"
    for name in ("fig7-total-time", "fig8-downtime", "fig9-dump-time", "fig10-resume-time",
                 "fig11-transferred", "fig12-device-downtime"):  # fmt: skip
        assert (figures / f"{name}.html").is_file()
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert html.count('class="plotly-graph-div"') == 6
    if "PNG figures not written" not in md:
        assert (figures / "fig7-total-time.png").stat().st_size > 1000
    # The report's numbers are the CSV's.
    cold = [
        float(r["total_time_s"])
        for r in rows
        if (r["configuration"], r["technique"]) == ("C", "cold")
    ]
    line = next(x for x in md.splitlines() if x.startswith("| C | cold |"))
    assert f"| {statistics.fmean(cold):.2f} |" in line
    assert "| T4-cold-time |" in md
    assert "Control: the same configurations on a 1500-byte MTU" in md
