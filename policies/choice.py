"""Chooses the migration technique: feasible candidates, predicted costs, an objective.

The cost model ranks what the nodes can do; near-ties on every metric of the objective are
settled toward the paper's rule. The decision keeps every prediction, every exclusion and the
rule's advice, so it can be logged, published and later held against the measured migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fogmig.platform.base import fmt
from fogmig.platform.base.vocabulary import NodeCapabilities, Technique
from fogmig.policies.conditions import (
    LinkConditions,
    Metric,
    Objective,
    PrecopyStopRules,
    ServiceConditions,
)
from fogmig.policies.costmodel import CostConstants, Prediction, predict_all
from fogmig.policies.rules import Recommendation, RuleThresholds, recommend

# When neither the metrics nor the rule separate candidates: the paper's overall preference
# (section 6: pre-copy and post-copy are the best options; hybrid is slowest; cold is last).
_PAPER_ORDER = (Technique.PRECOPY, Technique.POSTCOPY, Technique.HYBRID, Technique.COLD)


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen technique and everything that led to it."""

    technique: Technique
    reason: str
    objective: Objective
    predictions: dict[Technique, Prediction]
    """Predictions for every feasible technique."""
    excluded: dict[Technique, str]
    """Techniques the nodes cannot perform, each with why."""
    recommendation: Recommendation
    """What the paper's rules alone advise (used to settle ties)."""
    ranking: tuple[Technique, ...]
    """Feasible techniques, best first under the objective."""
    source: NodeCapabilities
    destination: NodeCapabilities

    @property
    def prediction(self) -> Prediction:
        return self.predictions[self.technique]

    @property
    def agrees_with_paper(self) -> bool:
        return self.technique is self.recommendation.technique

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique.value,
            "reason": self.reason,
            "objective": self.objective.to_dict(),
            "ranking": [t.value for t in self.ranking],
            "agrees_with_paper": self.agrees_with_paper,
            "recommendation": self.recommendation.to_dict(),
            "predictions": {t.value: p.to_dict() for t, p in self.predictions.items()},
            "excluded": {t.value: why for t, why in self.excluded.items()},
            "source": self.source.to_dict(),
            "destination": self.destination.to_dict(),
        }


def feasible_techniques(
    source: NodeCapabilities, destination: NodeCapabilities
) -> tuple[list[Technique], dict[Technique, str]]:
    """What the two nodes can do. Cold and pre-copy always work (pre-copy falls back to page
    deltas without soft-dirty tracking); post-copy and hybrid need lazy restore on both ends:
    userfaultfd at the destination and CRIU's lazy page server at the source."""
    missing = [
        name
        for name, caps in (("source", source), ("destination", destination))
        if not caps.postcopy
    ]
    excluded: dict[Technique, str] = {}
    if missing:
        why = f"needs userfaultfd lazy pages on both nodes; missing on the {' and '.join(missing)}"
        excluded = {t: why for t in Technique if t.lazy}
    return [t for t in Technique if t not in excluded], excluded


def _metric(p: Prediction, m: Metric) -> float:
    if m is Metric.DOWNTIME:
        return p.downtime
    if m is Metric.TOTAL_TIME:
        return p.total_time
    return float(p.transferred_bytes)


def _rank(
    predictions: dict[Technique, Prediction], objective: Objective, preferred: Technique
) -> tuple[list[Technique], list[Technique]]:
    """Returns (ranking, the set still tied after every metric of the objective)."""
    tied = list(predictions)
    for m in objective.order:
        best = min(_metric(predictions[t], m) for t in tied)
        tol = objective.tolerance(m)
        tied = [t for t in tied if tol.ties(_metric(predictions[t], m), best)]

    def key(t: Technique) -> tuple[float, ...]:
        return tuple(_metric(predictions[t], m) for m in objective.order)

    def tie_break(t: Technique) -> int:
        return 0 if t is preferred else 1 + _PAPER_ORDER.index(t)

    head = sorted(tied, key=tie_break)
    tail = sorted((t for t in predictions if t not in tied), key=key)
    return head + tail, tied


def _summary(p: Prediction) -> str:
    return (
        f"{p.technique.value}: downtime {fmt.duration(p.downtime, digits=1)}, "
        f"total {fmt.duration(p.total_time, digits=1)}, {fmt.megabytes(p.transferred_bytes)}"
    )


def choose_technique(  # noqa: PLR0917 - the documented call order of the policy
    service: ServiceConditions,
    link: LinkConditions,
    src_caps: NodeCapabilities,
    dst_caps: NodeCapabilities,
    objective: Objective | None = None,
    stop_rules: PrecopyStopRules | None = None,
    *,
    constants: CostConstants | None = None,
    thresholds: RuleThresholds | None = None,
) -> Decision:
    """Choose a technique for moving ``service`` over ``link`` from ``src_caps`` to ``dst_caps``.

    Default objective: least downtime, then least total time, ties settled toward the paper's
    rule. Cold migration is always feasible, so a decision is always made.
    """
    obj = objective if objective is not None else Objective.least_downtime()
    rules = stop_rules if stop_rules is not None else PrecopyStopRules()
    candidates, excluded = feasible_techniques(src_caps, dst_caps)
    predictions = predict_all(
        service, link, source=src_caps, stop_rules=rules, constants=constants, techniques=candidates
    )
    rec = recommend(
        service, link, source=src_caps, destination=dst_caps, objective=obj, thresholds=thresholds
    )
    ranking, tied = _rank(predictions, obj, rec.technique)
    chosen = ranking[0]
    best = predictions[chosen]

    parts = [f"{obj.name}: {_summary(best)}"]
    if len(tied) > 1:
        others = ", ".join(t.value for t in tied if t is not chosen)
        if chosen is rec.technique:
            parts.append(
                f"ties with {others}, settled by the paper's rule: {rec.reason} [{rec.citation}]"
            )
        else:
            parts.append(f"ties with {others}, settled by the paper's general preference")
    elif chosen is rec.technique:
        parts.append(f"agrees with the paper's rule [{rec.citation}]")
    else:
        rival = predictions.get(rec.technique)
        rival_text = f" ({_summary(rival)})" if rival is not None else ""
        parts.append(
            f"the paper's rule would pick {rec.technique.value}{rival_text}, but the model "
            f"predicts it worse for this objective"
        )
    if excluded:
        parts.append("; ".join(f"{t.value} excluded: {why}" for t, why in excluded.items()))
    return Decision(
        technique=chosen,
        reason="; ".join(parts),
        objective=obj,
        predictions=predictions,
        excluded=excluded,
        recommendation=rec,
        ranking=tuple(ranking),
        source=src_caps,
        destination=dst_caps,
    )
