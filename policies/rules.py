"""The paper's lessons learnt (section 5.2.4, Table 4) as explicit, explainable rules.

``classify`` places the conditions in the paper's categories (dirtying rate against throughput,
length of the pre-copy phase); ``recommend`` turns the category, the objective and the nodes'
capabilities into a technique with its reason in words and the passage of the paper behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fogmig.platform.base.vocabulary import NodeCapabilities, Technique
from fogmig.policies.conditions import LinkConditions, Metric, Objective, ServiceConditions


class DirtyRegime(StrEnum):
    """The page dirtying rate D against the throughput B, as the paper words it."""

    DIFFERENT_ORDERS = "different_orders"
    """D lower than B by at least an order of magnitude (configurations A, C, D)."""
    SAME_ORDER = "same_order"
    """D below B but of the same order of magnitude (configuration B)."""
    EXCEEDS = "exceeds"
    """D at or above B: pre-copy can never converge."""


@dataclass(frozen=True, slots=True)
class RuleThresholds:
    """Where the paper's qualitative words become numbers.

    ``same_order_ratio``: B/D below this is "the same order of magnitude" (B: B/D = 2.8; D:
    B/D = 18, "about one order lower"). ``prolonged_precopy_s``: a first pre-copy round (S/B)
    longer than this is "prolonged" (the paper's 75 MB state takes tens of seconds on the
    mobility link, A and B, and only a few on the management link, C and D).
    """

    same_order_ratio: float = 10.0
    prolonged_precopy_s: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "same_order_ratio": self.same_order_ratio,
            "prolonged_precopy_s": self.prolonged_precopy_s,
        }


@dataclass(frozen=True, slots=True)
class ConditionClass:
    """The paper's categories for one set of conditions, with the numbers behind them."""

    throughput_to_dirty_ratio: float
    """B/D; infinite when the service dirties nothing."""
    precopy_phase_s: float
    """S/B: how long the first pre-copy round keeps the link busy."""
    regime: DirtyRegime
    prolonged_precopy: bool

    @property
    def precopy_suits(self) -> bool:
        """The paper's pre-copy category: D and B of different orders and a short phase."""
        return self.regime is DirtyRegime.DIFFERENT_ORDERS and not self.prolonged_precopy

    def to_dict(self) -> dict[str, Any]:
        ratio = self.throughput_to_dirty_ratio
        return {
            "throughput_to_dirty_ratio": ratio if ratio != float("inf") else None,
            "precopy_phase_s": self.precopy_phase_s,
            "regime": self.regime.value,
            "prolonged_precopy": self.prolonged_precopy,
        }


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What the paper's rules advise, why, and where the paper says so."""

    technique: Technique
    rule: str
    """A short stable identifier of the rule that fired (for logs and tests)."""
    reason: str
    citation: str
    conditions: ConditionClass
    avoid: tuple[tuple[Technique, str], ...] = ()
    """Techniques the paper advises against under these conditions, each with why."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique.value,
            "rule": self.rule,
            "reason": self.reason,
            "citation": self.citation,
            "conditions": self.conditions.to_dict(),
            "avoid": [{"technique": t.value, "why": why} for t, why in self.avoid],
        }


def classify(
    service: ServiceConditions, link: LinkConditions, thresholds: RuleThresholds | None = None
) -> ConditionClass:
    th = thresholds if thresholds is not None else RuleThresholds()
    b, d = link.throughput_bytes_per_s, service.dirty_rate_bytes_per_s
    ratio = b / d if d > 0 else float("inf")
    if d >= b:
        regime = DirtyRegime.EXCEEDS
    elif ratio < th.same_order_ratio:
        regime = DirtyRegime.SAME_ORDER
    else:
        regime = DirtyRegime.DIFFERENT_ORDERS
    phase = service.state_bytes / b
    return ConditionClass(
        throughput_to_dirty_ratio=ratio,
        precopy_phase_s=phase,
        regime=regime,
        prolonged_precopy=phase > th.prolonged_precopy_s,
    )


_COLD_AVOID = (
    Technique.COLD,
    "always the highest downtime, equal to the total migration time (Table 4; section 5.2.4)",
)
_HYBRID_AVOID = (
    Technique.HYBRID,
    "always the highest total migration time, with downtime only comparable to post-copy's "
    "(Table 4; section 5.2.1)",
)


def _describe(c: ConditionClass) -> str:
    if c.regime is DirtyRegime.EXCEEDS:
        rate = "the page dirtying rate reaches or exceeds the throughput"
    elif c.regime is DirtyRegime.SAME_ORDER:
        rate = f"the throughput is only {c.throughput_to_dirty_ratio:.1f}x the page dirtying rate"
    elif c.throughput_to_dirty_ratio == float("inf"):
        rate = "the service dirties no pages"
    else:
        rate = f"the throughput is {c.throughput_to_dirty_ratio:.0f}x the page dirtying rate"
    length = "prolonged" if c.prolonged_precopy else "short"
    return f"{rate}; the pre-copy phase is {length} ({c.precopy_phase_s:.1f} s for the state)"


def recommend(
    service: ServiceConditions,
    link: LinkConditions,
    *,
    source: NodeCapabilities | None = None,
    destination: NodeCapabilities | None = None,
    objective: Objective | None = None,
    thresholds: RuleThresholds | None = None,
) -> Recommendation:
    """The technique the paper's lessons learnt advise under these conditions.

    Unknown capabilities are taken as able to do lazy restore (the paper's testbed could).
    """
    c = classify(service, link, thresholds)
    obj = objective if objective is not None else Objective.least_downtime()
    lazy_ok = (source is None or source.postcopy) and (destination is None or destination.postcopy)
    where = _describe(c)

    if obj.primary is Metric.TOTAL_TIME:
        return Recommendation(
            technique=Technique.COLD,
            rule="least-total-time-cold",
            reason=f"cold migration always has the lowest total migration time; {where}",
            citation="Table 4 (Cold, total migration time); section 5.2.1",
            conditions=c,
            avoid=(_HYBRID_AVOID,),
        )
    if obj.primary is Metric.TRANSFERRED_BYTES:
        return Recommendation(
            technique=Technique.COLD,
            rule="least-bytes-cold",
            reason=(
                "cold migration transfers every page once and so the least data "
                f"(post-copy is comparable); {where}"
            ),
            citation="Table 4 (Cold and Post-copy, transferred data); section 5.2.3",
            conditions=c,
            avoid=(
                (Technique.PRECOPY, "may transfer pages more than once (section 4.2.1)"),
                (Technique.HYBRID, "may transfer pages more than once (section 4.2.3)"),
            ),
        )

    if c.precopy_suits:
        return Recommendation(
            technique=Technique.PRECOPY,
            rule="precopy-fast-link",
            reason=(
                f"{where}: pre-copy performs like post-copy and hybrid here without their "
                "drawbacks (page faults at the destination, state split across two nodes)"
            ),
            citation="Section 5.2.4, second lesson (configurations C and D); section 4.2.2",
            conditions=c,
            avoid=(_COLD_AVOID, _HYBRID_AVOID),
        )

    precopy_avoid = (
        Technique.PRECOPY,
        "downtime grows with the pages dirtied during a long or dirty-heavy pre-copy phase and "
        "tends to cold migration's (Table 4; section 5.2.2)",
    )
    if lazy_ok:
        return Recommendation(
            technique=Technique.POSTCOPY,
            rule="postcopy-slow-or-dirty",
            reason=(
                f"{where}: pre-copy would suffer long downtimes; post-copy keeps the downtime "
                "as low as hybrid with less total time and data"
            ),
            citation="Section 5.2.4, third lesson (configurations A and B); Table 4",
            conditions=c,
            avoid=(_COLD_AVOID, precopy_avoid, _HYBRID_AVOID),
        )

    no_lazy = "post-copy and hybrid need userfaultfd (lazy pages) on both nodes"
    if c.regime is DirtyRegime.EXCEEDS:
        return Recommendation(
            technique=Technique.COLD,
            rule="cold-no-lazy-nonconverging",
            reason=(
                f"{where}: {no_lazy}, and pre-copy cannot converge when pages are dirtied as "
                "fast as they are sent: its dump approaches the whole state, so its downtime "
                "approaches cold migration's while it sends more data and takes longer"
            ),
            citation="Section 4.2.1; Table 4 (Pre-copy vs Cold); section 5.2.2 (configuration B)",
            conditions=c,
        )
    return Recommendation(
        technique=Technique.PRECOPY,
        rule="precopy-no-lazy",
        reason=(
            f"{where}: the paper would choose post-copy, but {no_lazy}; pre-copy still keeps "
            "the downtime below cold migration's"
        ),
        citation="Section 5.2.4 (cold is to be avoided); Table 4",
        conditions=c,
        avoid=(_COLD_AVOID,),
    )
