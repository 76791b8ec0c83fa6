"""The policy check end to end on the testbed: two points (one fitted on, one held out), two
techniques, one run each; then the constants it wrote drive the controller's configuration."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fogmig.platform.controller.config import load_cost_constants

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root")


def fogmig(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_policy_check_measures_fits_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "check"
    args = ["policy-check", "--quick", "--out", str(out), "--points", "C,D"]
    done = fogmig(*args, "--techniques", "cold,postcopy", timeout=170)
    assert "held-out points: policy within 10% of the best downtime" in done.stdout

    with (out / "measurements.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["point"], r["technique"]) for r in rows} == {
        (p, t) for p in ("C", "D") for t in ("cold", "postcopy")
    }
    assert all(r["outcome"] == "completed" for r in rows), rows
    assert all(float(r["total_s"]) > 0 and float(r["predicted_total_s"]) > 0 for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    held = next(v for v in summary["verdicts"] if v["role"] == "validate")
    assert held["points"] == 1
    assert held["downtime_error"]["n"] == 2
    points = {p["point"]["name"]: p for p in summary["points"]}
    assert points["D"]["best"] in ("cold", "postcopy")
    assert points["D"]["pick"] in ("cold", "postcopy", "precopy", "hybrid")

    # the constants were fitted on C alone and load as the controller loads them
    constants = load_cost_constants(out / "constants.json")
    assert constants.lazy_dump_bytes != 3 << 20  # fitted from C's post-copy dump
    assert "| D | validate |" in (out / "report.md").read_text()

    # a second run without --resume refuses to mix into the first; with it, nothing is re-run
    refused = fogmig(*args, "--techniques", "cold,postcopy", check=False)
    assert refused.returncode == 1
    assert "--resume" in refused.stderr
    again = fogmig(*args, "--techniques", "cold,postcopy", "--resume", timeout=60)
    assert "every migration of the plan is measured already" in again.stdout
