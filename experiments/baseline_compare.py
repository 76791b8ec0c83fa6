"""fogmig's engine against the paper's toolchain: ratios of means per technique.

Given records of both engines for one configuration (``engine_of`` tells them apart), each
technique gets the mean total time, downtime and bytes moved of the completed migrations of
each engine, and the ratios fogmig / baseline (below 1: fogmig did better). A technique the
baseline could not run on this machine gets its failure instead of ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fogmig.experiments.baseline import ENGINE, engine_of
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord, load_record


@dataclass(frozen=True, slots=True)
class Means:
    runs: int
    total_s: float
    downtime_s: float
    bytes: float


@dataclass(frozen=True, slots=True)
class Comparison:
    technique: Technique
    fogmig: Means | None
    baseline: Means | None
    baseline_error: str | None = None

    def ratio(self, metric: str) -> float | None:
        """fogmig's mean over the baseline's for ``total_s``, ``downtime_s`` or ``bytes``."""
        if self.fogmig is None or self.baseline is None:
            return None
        base = float(getattr(self.baseline, metric))
        return float(getattr(self.fogmig, metric)) / base if base > 0 else None


def _means(records: Sequence[MigrationRecord]) -> Means | None:
    done = [r for r in records if r.outcome is Outcome.COMPLETED]
    if not done:
        return None
    return Means(
        runs=len(done),
        total_s=statistics.fmean(r.total_time_s for r in done),
        downtime_s=statistics.fmean(r.downtime_s for r in done),
        bytes=statistics.fmean(r.transferred_bytes for r in done),
    )


def compare(records: Iterable[MigrationRecord]) -> list[Comparison]:
    """One comparison per technique that either engine ran, in the vocabulary's order."""
    by: dict[tuple[str, Technique], list[MigrationRecord]] = {}
    for r in records:
        by.setdefault((engine_of(r), r.technique), []).append(r)
    out = []
    for t in Technique:
        ours, theirs = by.get(("fogmig", t), []), by.get((ENGINE, t), [])
        if not ours and not theirs:
            continue
        failed = [r.error for r in theirs if r.outcome is not Outcome.COMPLETED and r.error]
        base = _means(theirs)
        out.append(Comparison(t, _means(ours), base, failed[0] if failed and not base else None))
    return out


def load_records(*directories: Path) -> list[MigrationRecord]:
    return [load_record(p) for d in directories for p in sorted(d.glob("*.json"))]


def markdown(rows: Sequence[Comparison]) -> str:
    """A table: means of both engines and the ratios fogmig / baseline."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| technique | fogmig total s | baseline total s | total | fogmig downtime s "
        "| baseline downtime s | downtime | fogmig MB | baseline MB | bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in rows:

        def of(m: Means | None, metric: str, scale: float = 1.0) -> float | None:
            return None if m is None else float(getattr(m, metric)) / scale

        f, b = c.fogmig, c.baseline
        lines.append(
            f"| {c.technique} | {num(of(f, 'total_s'), '.2f')} | {num(of(b, 'total_s'), '.2f')} "
            f"| {num(c.ratio('total_s'), '.2f')} | {num(of(f, 'downtime_s'), '.2f')} "
            f"| {num(of(b, 'downtime_s'), '.2f')} | {num(c.ratio('downtime_s'), '.2f')} "
            f"| {num(of(f, 'bytes', 1e6), '.1f')} | {num(of(b, 'bytes', 1e6), '.1f')} "
            f"| {num(c.ratio('bytes'), '.2f')} |"
        )
    return "\n".join(lines)
