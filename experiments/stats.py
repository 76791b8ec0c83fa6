"""Means with 95% confidence intervals (Student's t), per engine, configuration and technique.

Only completed migrations count: a failed run has no meaningful times. The metrics are the
paper's nine plus the derived totals, the device-observed downtime and the physical floor.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from fogmig.experiments.store import RunRecord

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95: Final = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95: Final = 1.96


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    return _T95[dof - 1] if dof <= len(_T95) else _Z95


@dataclass(frozen=True, slots=True)
class Estimate:
    """A sample's mean and its 95% confidence interval (half-width 0 with one value)."""

    n: int
    mean: float
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: Estimate) -> bool:
        return self.low <= other.high and other.low <= self.high

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def estimate(values: Iterable[float]) -> Estimate:
    """Mean and 95% CI half-width t(n-1) * s / sqrt(n) of ``values`` (NaN mean when empty)."""
    xs = [float(v) for v in values]
    if not xs:
        return Estimate(n=0, mean=math.nan, half_width=math.nan)
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Estimate(n=1, mean=mean, half_width=0.0)
    sd = statistics.stdev(xs)
    return Estimate(n=len(xs), mean=mean, half_width=t95(len(xs) - 1) * sd / math.sqrt(len(xs)))


def floor_s(run: RunRecord, *, measured: bool = False) -> float:
    """The physical floor of a run: the bytes it moved over the link's rate (asked, or
    measured when ``measured`` and known); 0 without a rate."""
    rate = run.link_rate_asked_mbit
    if measured and run.link_rate_measured_mbit:
        rate = run.link_rate_measured_mbit
    if rate <= 0:
        return 0.0
    return run.record.transferred_bytes * 8 / (rate * 1e6)


Metric = Callable[[RunRecord], float | None]

METRICS: Final[dict[str, Metric]] = {
    "pre_dump_time_s": lambda r: r.record.pre_dump_time_s,
    "pre_dump_transfer_time_s": lambda r: r.record.pre_dump_transfer_time_s,
    "dump_time_s": lambda r: r.record.dump_time_s,
    "dump_transfer_time_s": lambda r: r.record.dump_transfer_time_s,
    "resume_time_s": lambda r: r.record.resume_time_s,
    "faulted_pages_transfer_time_s": lambda r: r.record.faulted_pages_transfer_time_s,
    "pre_dump_mb": lambda r: r.record.pre_dump_bytes / 1e6,
    "dump_mb": lambda r: r.record.dump_bytes / 1e6,
    "faulted_pages_mb": lambda r: r.record.faulted_pages_bytes / 1e6,
    "total_time_s": lambda r: r.record.total_time_s,
    "downtime_s": lambda r: r.record.downtime_s,
    "transferred_mb": lambda r: r.record.transferred_bytes / 1e6,
    "device_downtime_s": lambda r: r.record.device_downtime_s,
    "floor_s": floor_s,
    "floor_measured_s": lambda r: floor_s(r, measured=True),
    "state_mb_seen": lambda r: r.record.state_bytes / 1e6,
    "wall_time_s": lambda r: r.record.wall_time_s,
}
"""Every metric the figures and verdicts use, by name (None: not measured in that run)."""


@dataclass(frozen=True, slots=True)
class Group:
    engine: str
    configuration: str
    technique: str


class Summary:
    """Estimates of every metric for every (engine, configuration, technique) group."""

    def __init__(self, runs: Sequence[RunRecord]) -> None:
        self.runs = list(runs)
        self._by_group: dict[Group, list[RunRecord]] = {}
        for r in self.runs:
            g = Group(engine=r.engine, configuration=r.configuration, technique=r.technique)
            self._by_group.setdefault(g, []).append(r)

    @property
    def groups(self) -> list[Group]:
        return list(self._by_group)

    def engines(self) -> list[str]:
        seen = dict.fromkeys(g.engine for g in self._by_group)
        return sorted(seen, key=lambda e: (e != "fogmig", e))

    def configurations(self, engine: str | None = None) -> list[str]:
        names = dict.fromkeys(
            g.configuration for g in self._by_group if engine is None or g.engine == engine
        )
        return sorted(names, key=lambda c: (len(c) > 1, c))

    def completed(self, engine: str, configuration: str, technique: str) -> list[RunRecord]:
        runs = self._by_group.get(Group(engine, configuration, technique), [])
        return [r for r in runs if r.completed]

    def attempted(self, engine: str, configuration: str, technique: str) -> int:
        return len(self._by_group.get(Group(engine, configuration, technique), []))

    def get(self, metric: str, engine: str, configuration: str, technique: str) -> Estimate:
        fn = METRICS[metric]
        values = [fn(r) for r in self.completed(engine, configuration, technique)]
        return estimate(v for v in values if v is not None)

    def mean(self, metric: str, engine: str, configuration: str, technique: str) -> float:
        return self.get(metric, engine, configuration, technique).mean
