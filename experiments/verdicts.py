"""The paper's findings as statements checked against the measurements.

Every claim (a row cell of the paper's summary table, or a statement of its results section)
is written here in this project's words with a function that decides it from the estimates:
each function yields one :class:`Check` per configuration (or pair of configurations) with
the numbers behind it, and the verdict is ``holds`` when every check passes, ``does not hold``
when none does, ``partly`` otherwise. When a verdict is not ``holds`` the report prints the
claim's likely reason for the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fogmig.experiments.claims import CLAIMS
from fogmig.experiments.compare import Check, Claim, Status, View, aggregate
from fogmig.experiments.stats import Summary


@dataclass(frozen=True, slots=True)
class Verdict:
    claim: Claim
    status: Status
    checks: list[Check] = field(default_factory=list)


def decide(claim: Claim, view: View) -> Verdict:
    checks = claim.evaluate(view)
    return Verdict(claim=claim, status=aggregate(checks), checks=checks)


def decide_all(
    summary: Summary, *, engine: str = "fogmig", claims: Sequence[Claim] | None = None
) -> list[Verdict]:
    view = View(summary, engine)
    return [decide(c, view) for c in (CLAIMS if claims is None else claims)]


def tally(verdicts: Sequence[Verdict]) -> dict[Status, int]:
    out = dict.fromkeys(Status, 0)
    for v in verdicts:
        out[v.status] += 1
    return out
