"""The policy check's outputs: a CSV of every measurement, a JSON summary, a Markdown report
and the fitted constants in the file format the controller loads (``--constants``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fogmig.experiments.policycheck_fit import Calibration
from fogmig.experiments.policycheck_score import HIT_SLACK, PointResult, Verdict
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.controller.config import save_cost_constants
from fogmig.platform.migration.record import MigrationRecord

CSV_COLUMNS = (
    "point",
    "role",
    "file",
    "technique",
    "outcome",
    "state_bytes",
    "rate_mbit",
    "rtt_ms",
    "dirty_kbps",
    "total_s",
    "downtime_s",
    "pre_dump_time_s",
    "pre_dump_transfer_time_s",
    "dump_time_s",
    "dump_transfer_time_s",
    "resume_time_s",
    "faulted_pages_transfer_time_s",
    "pre_dump_bytes",
    "dump_bytes",
    "faulted_pages_bytes",
    "rounds",
    "predicted_total_s",
    "predicted_downtime_s",
    "total_error",
    "downtime_error",
    "error",
)


def measurement_rows(
    saved: Mapping[str, Sequence[tuple[Path, MigrationRecord]]],
    results: Sequence[PointResult],
    out: Path,
) -> list[dict[str, Any]]:
    """One row per migration measured, with the prediction for its point and technique."""
    rows: list[dict[str, Any]] = []
    for res in results:
        p = res.point
        for path, r in saved.get(p.name, ()):
            tr = res.techniques.get(r.technique)
            pred_total = tr.predicted_total_s if tr else None
            pred_down = tr.predicted_downtime_s if tr else None
            done = r.outcome.value == "completed"
            rows.append(
                {
                    "point": p.name,
                    "role": p.role.value,
                    "file": str(path.relative_to(out)) if path.is_relative_to(out) else str(path),
                    "technique": r.technique.value,
                    "outcome": r.outcome.value,
                    "state_bytes": r.state_bytes,
                    "rate_mbit": p.rate_mbit,
                    "rtt_ms": p.rtt_ms,
                    "dirty_kbps": p.dirty_kbps,
                    "total_s": _r(r.total_time_s),
                    "downtime_s": _r(r.downtime_s),
                    "pre_dump_time_s": _r(r.pre_dump_time_s),
                    "pre_dump_transfer_time_s": _r(r.pre_dump_transfer_time_s),
                    "dump_time_s": _r(r.dump_time_s),
                    "dump_transfer_time_s": _r(r.dump_transfer_time_s),
                    "resume_time_s": _r(r.resume_time_s),
                    "faulted_pages_transfer_time_s": _r(r.faulted_pages_transfer_time_s),
                    "pre_dump_bytes": r.pre_dump_bytes,
                    "dump_bytes": r.dump_bytes,
                    "faulted_pages_bytes": r.faulted_pages_bytes,
                    "rounds": len([x for x in r.rounds if not x.final]),
                    "predicted_total_s": _r(pred_total),
                    "predicted_downtime_s": _r(pred_down),
                    "total_error": _r(_err(pred_total, r.total_time_s) if done else None),
                    "downtime_error": _r(_err(pred_down, r.downtime_s) if done else None),
                    "error": r.error or "",
                }
            )
    return rows


def _err(pred: float | None, meas: float) -> float | None:
    if pred is None or meas <= 0:
        return None
    return abs(pred - meas) / meas


def _r(x: float | None, digits: int = 4) -> float | str:
    return "" if x is None else round(x, digits)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(
    results: Sequence[PointResult],
    verdicts: Sequence[Verdict],
    calibration: Calibration,
    caps: NodeCapabilities,
) -> str:
    """The report: the goals first, then each point, then the constants."""
    lines = ["# Policy validation", "", "## Summary", ""]
    lines += [f"- {line}" for v in verdicts for line in v.lines()]
    lines += [
        "",
        f"Hit: the picked technique's measured downtime (paper's definition: dump + dump "
        f"transfer + resume, median of the runs) is at most {HIT_SLACK:.0%} above the best "
        f"technique's. Error: |predicted - measured| / measured per point and technique. "
        f"Source nodes: lazy restore {'yes' if caps.postcopy else 'no'}, soft-dirty pre-dump "
        f"{'yes' if caps.native_predump else 'no'}.",
        "",
        "## Points",
        "",
        "| point | role | S MB | B Mbit/s | RTT ms | D KB/s | D/B | pick | best | within 10% "
        "| pick/best downtime |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        p = r.point
        ratio = r.pick_over_best
        lines.append(
            f"| {p.name} | {p.role.value} | {r.state_bytes / 1e6:.1f} | {p.rate_mbit:g} "
            f"| {p.rtt_ms:g} | {p.dirty_kbps:g} | {p.dirty_to_link:.3f} | {r.pick.value} "
            f"| {r.best.value if r.best else '-'} | {'yes' if r.hit else 'no'} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    for r in results:
        p = r.point
        lines += [
            "",
            f"### {p.name} ({p.role.value}): {p.note}",
            "",
            f"Policy: {r.reason}",
            "",
            "| technique | runs | failed | total s meas. | total s pred. | error "
            "| downtime s meas. | downtime s pred. | error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in r.techniques.values():
            mark = " (pick)" if t.technique is r.pick else ""
            mark += " (best)" if t.technique is r.best else ""
            lines.append(
                f"| {t.technique.value}{mark} | {t.runs} | {t.failed} | {_s(t.measured_total_s)} "
                f"| {_s(t.predicted_total_s)} | {_pct(t.total_error)} "
                f"| {_s(t.measured_downtime_s)} | {_s(t.predicted_downtime_s)} "
                f"| {_pct(t.downtime_error)} |"
            )
    lines += [
        "",
        "## Constants fitted on the fit points",
        "",
        "| constant | default | fitted |",
        "| --- | --- | --- |",
    ]
    base = calibration.base.to_dict()
    for name, value in calibration.constants.to_dict().items():
        lines.append(f"| {name} | {base[name]:g} | {value:g} |")
    if calibration.left_out:
        lines += ["", f"{len(calibration.left_out)} fit record(s) left out:", ""]
        lines += [f"- {path}: {why}" for path, why in calibration.left_out]
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path,
    *,
    plan: dict[str, Any],
    caps: NodeCapabilities,
    calibration: Calibration,
    saved: Mapping[str, Sequence[tuple[Path, MigrationRecord]]],
    results: Sequence[PointResult],
    verdicts: Sequence[Verdict],
) -> dict[str, Path]:
    """Write measurements.csv, summary.json, report.md and constants.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": out / "measurements.csv",
        "summary": out / "summary.json",
        "report": out / "report.md",
        "constants": out / "constants.json",
    }
    with files["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(measurement_rows(saved, results, out))
    summary = {
        "lines": [line for v in verdicts for line in v.lines()],
        "verdicts": [v.to_dict() for v in verdicts],
        "plan": plan,
        "capabilities": caps.to_dict(),
        "constants": calibration.constants.to_dict(),
        "fit_records": len(calibration.residuals),
        "points": [r.to_dict() for r in results],
    }
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    files["report"].write_text(markdown(results, verdicts, calibration, caps))
    fit_points = [p["name"] for p in plan["points"] if p["role"] == "fit"]
    save_cost_constants(
        files["constants"],
        calibration.constants,
        about={
            "fitted_by": "fogmig policy-check",
            "points": fit_points,
            "records": len(calibration.residuals),
            "native_predump": caps.native_predump,
        },
    )
    return files
