"""How two measured estimates are compared when a claim is checked, and the checks' results.

"Comparable" means the 95% intervals overlap or the means differ by at most a relative margin
(or an absolute one, for small values); "higher"/"lower" mean different means that are not
comparable; "significantly" higher means not comparable and at least a quarter higher.
docs/evaluation.md states the same rules with the margins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fogmig.experiments.stats import Estimate, Summary

REL_MARGIN: Final = 0.15
"""Means within 15% of the larger are comparable."""
ABS_MARGIN: Final = {"s": 0.25, "MB": 1.0}
"""Means this close are comparable whatever their ratio (timer and page granularity)."""
SIGNIFICANT: Final = 1.25
"""A significant increase is at least a quarter."""


def unit_of(metric: str) -> str:
    return "MB" if metric.endswith("_mb") else "s"


def comparable(a: Estimate, b: Estimate, metric: str) -> bool:
    if a.n == 0 or b.n == 0:
        return False
    diff = abs(a.mean - b.mean)
    if diff <= ABS_MARGIN[unit_of(metric)]:
        return True
    if diff <= REL_MARGIN * max(abs(a.mean), abs(b.mean)):
        return True
    return a.n > 1 and b.n > 1 and a.overlaps(b)


def higher(a: Estimate, b: Estimate, metric: str) -> bool:
    return a.mean > b.mean and not comparable(a, b, metric)


def significantly_higher(a: Estimate, b: Estimate, metric: str) -> bool:
    return higher(a, b, metric) and a.mean >= SIGNIFICANT * b.mean


class Status(StrEnum):
    HOLDS = "holds"
    PARTLY = "partly"
    FAILS = "does not hold"
    NO_DATA = "no data"


@dataclass(frozen=True, slots=True)
class Check:
    """One comparison behind a verdict, in one configuration, with its numbers."""

    configuration: str
    ok: bool
    detail: str


def aggregate(checks: list[Check]) -> Status:
    if not checks:
        return Status.NO_DATA
    passed = sum(c.ok for c in checks)
    if passed == len(checks):
        return Status.HOLDS
    return Status.FAILS if passed == 0 else Status.PARTLY


class View:
    """One engine's estimates, as the claims read them."""

    def __init__(self, summary: Summary, engine: str = "fogmig") -> None:
        self.summary = summary
        self.engine = engine

    def has(self, configuration: str, technique: str) -> bool:
        return bool(self.summary.completed(self.engine, configuration, technique))

    def configurations(self, *wanted: str) -> list[str]:
        """The configurations among ``wanted`` (all of A-D if none) that have data."""
        present = self.summary.configurations(self.engine)
        names = wanted or ("A", "B", "C", "D")
        return [c for c in names if c in present]

    def state_mb(self, configuration: str) -> float:
        """The service's configured state in ``configuration`` (0: no run)."""
        runs = [r for r in self.summary.runs if r.engine == self.engine]
        return max((r.state_mb for r in runs if r.configuration == configuration), default=0.0)

    def est(self, metric: str, configuration: str, technique: str) -> Estimate:
        return self.summary.get(metric, self.engine, configuration, technique)

    def num(self, metric: str, configuration: str, technique: str) -> str:
        e = self.est(metric, configuration, technique)
        if e.n == 0 or math.isnan(e.mean):
            return f"{technique} -"
        return f"{technique} {e.text(digits=2)} {unit_of(metric)}"


Evaluate = Callable[[View], list[Check]]


@dataclass(frozen=True, slots=True)
class Claim:
    """One finding of the paper, to be checked."""

    id: str
    source: str
    """Where the paper states it: ``Table 4 / cold / downtime`` or ``5.2.2``."""
    statement: str
    evaluate: Evaluate
    differs: str = ""
    """The likely reason when the measurement disagrees (shown only then)."""
