"""``fogmig calibrate`` and ``fogmig policy-check``: the cost model against measurements.

``calibrate`` fits the model's constants to saved migration records and writes the file the
controller loads with ``--constants``; ``policy-check`` measures a grid of points on the testbed,
fits on some and judges the policy and the model on the others (``fogmig.experiments.policycheck``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fogmig.experiments.policycheck_fit import Calibration, calibrate, load_records
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.controller.config import save_cost_constants

# The residuals table has eleven columns: keep it whole when the output is not a terminal.
console = Console(width=max(Console().width, 132))


def _pct(x: float) -> str:
    return f"{x:.0%}" if x != float("inf") else "inf"


def _constants_table(cal: Calibration) -> Table:
    table = Table(title="cost constants")
    for col in ("constant", "default", "fitted"):
        table.add_column(col)
    base = cal.base.to_dict()
    for name, value in cal.constants.to_dict().items():
        table.add_row(name, f"{base[name]:g}", f"{value:g}")
    return table


def _residuals_table(cal: Calibration) -> Table:
    table = Table(title="residuals: each record predicted again with the fitted constants")
    for col in (
        "technique",
        "S MB",
        "Mbit/s",
        "RTT ms",
        "D KB/s",
        "total s",
        "predicted",
        "error",
        "downtime s",
        "predicted",
        "error",
    ):
        table.add_column(col)
    for r in sorted(cal.residuals, key=lambda x: (x.record.technique.value, x.record.state_bytes)):
        rec = r.record
        table.add_row(
            rec.technique.value,
            f"{rec.state_bytes / 1e6:.1f}",
            f"{rec.link_rate_bit_per_s / 1e6:g}",
            f"{rec.link_rtt_s * 1000:g}",
            f"{rec.dirty_rate_bytes_per_s / 1024:g}",
            f"{rec.total_time_s:.2f}",
            f"{r.predicted_total_s:.2f}",
            _pct(r.total_error),
            f"{rec.downtime_s:.2f}",
            f"{r.predicted_downtime_s:.2f}",
            _pct(r.downtime_error),
        )
    return table


def _cmd_calibrate(args: argparse.Namespace) -> int:
    found = load_records([Path(d) for d in args.records])
    cal = calibrate(found.records, native_predump=args.native_predump)
    console.print(_constants_table(cal))
    console.print(_residuals_table(cal))
    console.print(
        f"fitted on {len(cal.residuals)} record(s); median error {_pct(cal.median_total_error)} "
        f"on total time, {_pct(cal.median_downtime_error)} on downtime; "
        f"{len(cal.left_out)} record(s) left out, {len(found.skipped)} other file(s) skipped"
    )
    for path, why in cal.left_out:
        console.print(f"  left out {path}: {why}", highlight=False)
    save_cost_constants(
        Path(args.out),
        cal.constants,
        about={
            "fitted_by": "fogmig calibrate",
            "records": len(cal.residuals),
            "from": [str(d) for d in args.records],
            "native_predump": args.native_predump,
        },
    )
    console.print(
        f"constants written to {args.out}; use them with `fogmig controller "
        f"--constants {args.out}`",
        highlight=False,
    )
    return 0


def _techniques(text: str) -> tuple[Technique, ...]:
    try:
        return tuple(Technique(name) for name in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a comma-separated list of {', '.join(Technique)}"
        ) from None


def _cmd_check(args: argparse.Namespace) -> int:
    from fogmig.experiments.policycheck import CheckPlan, run_check, summary_lines
    from fogmig.experiments.policycheck_points import grid, select

    if args.runs is not None and args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")
    plan = CheckPlan(
        out=Path(args.out),
        points=select(grid(quick=args.quick), args.points.split(",") if args.points else None),
        techniques=args.techniques,
        runs=args.runs if args.runs is not None else (1 if args.quick else 3),
        quick=args.quick,
        resume=args.resume,
        score_only=args.score_only,
    )
    result = run_async(lambda: run_check(plan, lambda m: console.print(m, highlight=False)))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    for name, path in result.files.items():
        console.print(f"{name}: {path}", highlight=False)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate", help="fit the cost model's constants to saved migration records"
    )
    p.add_argument("records", nargs="+", metavar="RECORDS_DIR", help="folders of record JSON")
    p.add_argument("--out", required=True, metavar="FILE", help="constants file to write")
    p.add_argument(
        "--native-predump",
        action="store_true",
        help="the records' source nodes had CRIU's soft-dirty pre-dump (default: page deltas)",
    )
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "policy-check",
        help="measure a grid of points on the testbed; validate the policy and the cost model",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="six points, one run each (about 6 min)")
    p.add_argument("--resume", action="store_true", help="keep the records already in --out")
    p.add_argument(
        "--score-only",
        action="store_true",
        help="judge the records already in --out without measuring (no testbed)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per technique and point")
    p.add_argument("--points", default=None, help="comma-separated point names (default: all)")
    p.add_argument("--techniques", type=_techniques, default=tuple(Technique))
    p.set_defaults(func=_cmd_check)
