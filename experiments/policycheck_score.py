"""Judging the policy and the cost model against measured migrations (no I/O).

Per point: the technique the policy picks from the conditions the controller would see, the
technique that measured best in hindsight (least median downtime, then total time), whether the
pick's downtime is within 10% of the best, and per technique the predicted against the measured
total time and downtime. The summary holds the goals: a hit rate of at least 90% and a model
error of at most 25%, each decided here from the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fogmig.experiments.policycheck_fit import relative_error
from fogmig.experiments.policycheck_points import Point, Role
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.choice import choose_technique
from fogmig.policies.conditions import Objective, PrecopyStopRules, ServiceConditions
from fogmig.policies.costmodel import CostConstants

HIT_SLACK = 0.10
"""A pick is a hit when its measured downtime is at most this much above the best's."""
HIT_RATE_GOAL = 0.90
ERROR_GOAL = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class TechniqueResult:
    """One technique at one point: measured (median of completed runs) and predicted."""

    technique: Technique
    runs: int
    failed: int
    measured_total_s: float | None
    measured_downtime_s: float | None
    predicted_total_s: float
    predicted_downtime_s: float

    @property
    def total_error(self) -> float | None:
        if self.measured_total_s is None:
            return None
        return relative_error(self.predicted_total_s, self.measured_total_s)

    @property
    def downtime_error(self) -> float | None:
        if self.measured_downtime_s is None:
            return None
        return relative_error(self.predicted_downtime_s, self.measured_downtime_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique.value,
            "runs": self.runs,
            "failed": self.failed,
            "measured_total_s": self.measured_total_s,
            "measured_downtime_s": self.measured_downtime_s,
            "predicted_total_s": self.predicted_total_s,
            "predicted_downtime_s": self.predicted_downtime_s,
            "total_error": _finite_or_none(self.total_error),
            "downtime_error": _finite_or_none(self.downtime_error),
        }


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PointResult:
    """The policy's pick at one point against the best in hindsight."""

    point: Point
    state_bytes: int
    """The state size the policy was given: the median the source reported over the runs."""
    techniques: dict[Technique, TechniqueResult]
    pick: Technique
    model_pick: Technique
    """The least predicted downtime (then total time), without the policy's tie tolerances."""
    best: Technique | None
    """Least measured downtime, then total time; ``None``: no technique completed."""
    reason: str

    def _within(self, t: Technique) -> bool:
        if self.best is None:
            return False
        got = self.techniques[t].measured_downtime_s
        best = self.techniques[self.best].measured_downtime_s
        return got is not None and best is not None and got <= best * (1 + HIT_SLACK)

    @property
    def hit(self) -> bool:
        """The pick's measured downtime is within 10% of the best's."""
        return self._within(self.pick)

    @property
    def model_hit(self) -> bool:
        return self._within(self.model_pick)

    @property
    def pick_over_best(self) -> float | None:
        """The pick's measured downtime over the best's (1.0: the pick is the best)."""
        if self.best is None:
            return None
        got = self.techniques[self.pick].measured_downtime_s
        best = self.techniques[self.best].measured_downtime_s
        if got is None or best is None or best <= 0:
            return None
        return got / best

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point.to_dict(),
            "state_bytes": self.state_bytes,
            "pick": self.pick.value,
            "model_pick": self.model_pick.value,
            "best": None if self.best is None else self.best.value,
            "hit": self.hit,
            "model_hit": self.model_hit,
            "pick_over_best": self.pick_over_best,
            "reason": self.reason,
            "techniques": [r.to_dict() for r in self.techniques.values()],
        }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def score_point(
    point: Point,
    records: Sequence[MigrationRecord],
    *,
    constants: CostConstants,
    caps: NodeCapabilities,
    techniques: Sequence[Technique] = tuple(Technique),
    stop_rules: PrecopyStopRules | None = None,
) -> PointResult:
    """Judge the policy and the model at ``point`` from its measured ``records``."""
    done = [r for r in records if r.outcome is Outcome.COMPLETED]
    sizes = [r.state_bytes for r in done if r.state_bytes > 0]
    state = round(statistics.median(sizes)) if sizes else point.state_mb << 20
    service = ServiceConditions(
        state_bytes=state, dirty_rate_bytes_per_s=point.dirty_rate_bytes_per_s
    )
    decision = choose_technique(
        service,
        point.link,
        caps,
        caps,
        Objective.least_downtime(),
        stop_rules,
        constants=constants,
    )
    results: dict[Technique, TechniqueResult] = {}
    for t in techniques:
        mine = [r for r in records if r.technique is t]
        ok = [r for r in mine if r.outcome is Outcome.COMPLETED]
        p = decision.predictions.get(t)
        if p is None:  # the nodes cannot do it: no prediction, nothing to compare
            continue
        results[t] = TechniqueResult(
            technique=t,
            runs=len(ok),
            failed=len(mine) - len(ok),
            measured_total_s=_median([r.total_time_s for r in ok]),
            measured_downtime_s=_median([r.downtime_s for r in ok]),
            predicted_total_s=p.total_time,
            predicted_downtime_s=p.downtime,
        )
    measured = [r for r in results.values() if r.measured_downtime_s is not None]
    best = (
        min(measured, key=lambda r: (r.measured_downtime_s, r.measured_total_s)).technique
        if measured
        else None
    )
    model_pick = min(
        results.values(), key=lambda r: (r.predicted_downtime_s, r.predicted_total_s)
    ).technique
    # measured on a subset of the techniques: the policy's best among those
    pick = next(t for t in decision.ranking if t in results)
    return PointResult(
        point=point,
        state_bytes=state,
        techniques=results,
        pick=pick,
        model_pick=model_pick,
        best=best,
        reason=decision.reason,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between the sorted values."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorStats:
    """The model's relative error over (point, technique) pairs."""

    n: int
    median: float
    p90: float

    @property
    def verdict(self) -> str:
        """``met`` when even the 90th percentile is within the goal, ``median only`` when half
        the predictions are, ``not met`` otherwise."""
        if self.p90 <= ERROR_GOAL:
            return "met"
        if self.median <= ERROR_GOAL:
            return "median only"
        return "not met"

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "median": _finite_or_none(self.median),
            "p90": _finite_or_none(self.p90),
            "goal": ERROR_GOAL,
            "verdict": self.verdict,
        }


def error_stats(errors: Sequence[float]) -> ErrorStats | None:
    if not errors:
        return None
    return ErrorStats(n=len(errors), median=percentile(errors, 0.5), p90=percentile(errors, 0.9))


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The goals over one set of points (the held-out ones, or those fitted on)."""

    role: Role
    points: int
    hits: int
    model_hits: int
    total: ErrorStats | None
    downtime: ErrorStats | None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.points if self.points else 0.0

    @property
    def model_hit_rate(self) -> float:
        return self.model_hits / self.points if self.points else 0.0

    @property
    def hit_goal_met(self) -> bool:
        return self.points > 0 and self.hit_rate >= HIT_RATE_GOAL

    @property
    def error_goal_met(self) -> bool:
        return all(s is not None and s.verdict == "met" for s in (self.total, self.downtime))

    def lines(self) -> list[str]:
        """The summary lines: each goal with its number and whether it is met."""
        where = "held-out" if self.role is Role.VALIDATE else "fitted-on (in-sample)"
        out = [
            f"{where} points: policy within {HIT_SLACK:.0%} of the best downtime at "
            f"{self.hits}/{self.points} = {self.hit_rate:.0%} (goal >= {HIT_RATE_GOAL:.0%}: "
            f"{'met' if self.hit_goal_met else 'not met'}); least predicted downtime alone "
            f"{self.model_hits}/{self.points} = {self.model_hit_rate:.0%}"
        ]
        for name, s in (("downtime", self.downtime), ("total time", self.total)):
            if s is None:
                out.append(f"{where} points: model error on {name}: no measurement")
                continue
            out.append(
                f"{where} points: model error on {name}: median {_pct(s.median)}, 90th "
                f"percentile {_pct(s.p90)} over {s.n} (goal <= {ERROR_GOAL:.0%}: {s.verdict})"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "points": self.points,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "hit_rate_goal": HIT_RATE_GOAL,
            "hit_goal_met": self.hit_goal_met,
            "model_hits": self.model_hits,
            "model_hit_rate": self.model_hit_rate,
            "total_time_error": None if self.total is None else self.total.to_dict(),
            "downtime_error": None if self.downtime is None else self.downtime.to_dict(),
            "error_goal_met": self.error_goal_met,
            "lines": self.lines(),
        }


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "inf"


def verdict(results: Sequence[PointResult], role: Role) -> Verdict:
    """The goals over the points of ``role``."""
    mine = [r for r in results if r.point.role is role]
    totals = [e for r in mine for t in r.techniques.values() if (e := t.total_error) is not None]
    downs = [e for r in mine for t in r.techniques.values() if (e := t.downtime_error) is not None]
    return Verdict(
        role=role,
        points=len(mine),
        hits=sum(r.hit for r in mine),
        model_hits=sum(r.model_hit for r in mine),
        total=error_stats(totals),
        downtime=error_stats(downs),
    )


def score_all(
    points: Sequence[Point],
    records: Mapping[str, Sequence[MigrationRecord]],
    *,
    constants: CostConstants,
    caps: NodeCapabilities,
    techniques: Sequence[Technique] = tuple(Technique),
) -> list[PointResult]:
    """Every point judged with the same constants (those fitted on the fit points)."""
    return [
        score_point(
            p, records.get(p.name, ()), constants=constants, caps=caps, techniques=techniques
        )
        for p in points
    ]
