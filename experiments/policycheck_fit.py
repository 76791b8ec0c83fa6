"""Calibrating the cost model from saved migration records, and the fit's residuals.

``load_records`` reads every MigrationRecord JSON under some folders; ``calibrate`` turns the
usable ones into calibration samples, fits the constants and predicts each record again with
them, so the residuals show how well the fitted model explains what it was fitted on.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.calibration import CalibrationSample, fit_constants
from fogmig.policies.conditions import LinkConditions, PrecopyStopRules, ServiceConditions
from fogmig.policies.costmodel import CostConstants, MigrationComponents, predict


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedRecords:
    """The records found under some folders, and the files skipped with why."""

    records: list[tuple[Path, MigrationRecord]]
    skipped: list[tuple[Path, str]]


def load_records(folders: Sequence[Path]) -> LoadedRecords:
    """Every migration record (``*.json``) under ``folders``, recursively, in path order.

    JSON files that are not records (plans, summaries, probe data) are skipped with why.
    """
    records: list[tuple[Path, MigrationRecord]] = []
    skipped: list[tuple[Path, str]] = []
    for folder in folders:
        if not folder.exists():
            raise ConfigError(f"no folder {folder}", hint="give folders that hold saved records")
        files = [folder] if folder.is_file() else sorted(folder.rglob("*.json"))
        for path in files:
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or "migration_id" not in data:
                    skipped.append((path, "not a migration record"))
                    continue
                records.append((path, MigrationRecord.model_validate(data)))
            except (OSError, json.JSONDecodeError, ValidationError) as exc:
                skipped.append((path, f"unreadable: {str(exc).splitlines()[0]}"))
    return LoadedRecords(records=records, skipped=skipped)


def unusable(record: MigrationRecord) -> str | None:
    """Why a record cannot calibrate the model (``None``: it can)."""
    if record.outcome is not Outcome.COMPLETED:
        return f"outcome {record.outcome.value}"
    if record.state_bytes <= 0:
        return "no state size"
    if record.link_rate_bit_per_s <= 0:
        return "no link rate"
    if record.total_time_s <= 0:
        return "no measured times"
    return None


def conditions(record: MigrationRecord) -> tuple[ServiceConditions, LinkConditions]:
    """The conditions a record was measured under, as the cost model takes them."""
    service = ServiceConditions(
        state_bytes=record.state_bytes, dirty_rate_bytes_per_s=record.dirty_rate_bytes_per_s
    )
    link = LinkConditions(
        throughput_bytes_per_s=record.link_rate_bit_per_s / 8, rtt_s=record.link_rtt_s
    )
    return service, link


def measured(record: MigrationRecord) -> MigrationComponents:
    """A record's nine metrics as the cost model's components."""
    return MigrationComponents(
        pre_dump_time=record.pre_dump_time_s,
        pre_dump_transfer_time=record.pre_dump_transfer_time_s,
        dump_time=record.dump_time_s,
        dump_transfer_time=record.dump_transfer_time_s,
        resume_time=record.resume_time_s,
        faulted_pages_transfer_time=record.faulted_pages_transfer_time_s,
        pre_dump_bytes=record.pre_dump_bytes,
        dump_bytes=record.dump_bytes,
        faulted_pages_bytes=record.faulted_pages_bytes,
    )


def sample(record: MigrationRecord, *, native_predump: bool) -> CalibrationSample:
    """One record as a calibration sample. ``native_predump``: whether the source node had
    CRIU's soft-dirty pre-dump (a record does not say)."""
    service, link = conditions(record)
    return CalibrationSample(
        technique=record.technique,
        service=service,
        link=link,
        measured=measured(record),
        native_predump=native_predump,
        precopy_rounds=max(1, len([r for r in record.rounds if not r.final])),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Residual:
    """One record predicted again with the fitted constants."""

    path: Path | None
    record: MigrationRecord
    predicted_total_s: float
    predicted_downtime_s: float

    @property
    def total_error(self) -> float:
        return relative_error(self.predicted_total_s, self.record.total_time_s)

    @property
    def downtime_error(self) -> float:
        return relative_error(self.predicted_downtime_s, self.record.downtime_s)


def relative_error(predicted: float, measured: float) -> float:
    """|predicted - measured| / measured; infinite when only the prediction is non-zero."""
    if measured <= 0:
        return 0.0 if predicted <= 0 else float("inf")
    return abs(predicted - measured) / measured


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Fitted constants, the records they came from, those left out, and the residuals."""

    constants: CostConstants
    base: CostConstants
    residuals: list[Residual]
    left_out: list[tuple[Path | None, str]]

    @property
    def median_total_error(self) -> float:
        return statistics.median(r.total_error for r in self.residuals)

    @property
    def median_downtime_error(self) -> float:
        return statistics.median(r.downtime_error for r in self.residuals)


def calibrate(
    records: Iterable[tuple[Path | None, MigrationRecord]],
    *,
    native_predump: bool = False,
    base: CostConstants | None = None,
    stop_rules: PrecopyStopRules | None = None,
) -> Calibration:
    """Fit the constants on the usable records and predict each of them again."""
    k0 = base if base is not None else CostConstants()
    usable: list[tuple[Path | None, MigrationRecord]] = []
    left_out: list[tuple[Path | None, str]] = []
    for path, rec in records:
        why = unusable(rec)
        if why is None:
            usable.append((path, rec))
        else:
            left_out.append((path, why))
    if not usable:
        raise ConfigError(
            f"no usable migration record ({len(left_out)} left out)",
            hint="records need a completed migration with state size and link conditions",
        )
    fitted = fit_constants((sample(r, native_predump=native_predump) for _, r in usable), base=k0)
    caps = NodeCapabilities(postcopy=True, native_predump=native_predump)
    residuals = []
    for path, rec in usable:
        service, link = conditions(rec)
        p = predict(
            rec.technique, service, link, source=caps, stop_rules=stop_rules, constants=fitted
        )
        residuals.append(
            Residual(
                path=path,
                record=rec,
                predicted_total_s=p.total_time,
                predicted_downtime_s=p.downtime,
            )
        )
    return Calibration(constants=fitted, base=k0, residuals=residuals, left_out=left_out)
