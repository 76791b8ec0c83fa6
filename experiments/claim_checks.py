"""The checks behind the paper's findings: how a claim is held against the measured runs.

Ranks and comparisons across techniques and configurations, and one check per kind of
statement; ``claims`` pairs each of the paper's findings with its check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from fogmig.experiments.compare import (
    Check,
    View,
    comparable,
    higher,
    significantly_higher,
)
from fogmig.experiments.stats import Estimate

TECHNIQUES: Final = ("cold", "precopy", "postcopy", "hybrid")
LABEL: Final = {
    "total_time_s": "total",
    "downtime_s": "downtime",
    "transferred_mb": "transferred",
    "dump_time_s": "dump",
    "resume_time_s": "resume",
    "dump_mb": "dump size",
    "faulted_pages_mb": "faulted pages",
    "pre_dump_mb": "pre-dump size",
}
LOW_DOWNTIME: Final = 0.25
"""A live technique's downtime is "low" when under this share of cold migration's."""
NEGLIGIBLE: Final = 0.25
"""Local steps are negligible when they take under this share of the transfers' time."""
DUMP_SECONDS: Final = 1.0
EXEC_STATE_SHARE: Final = 0.05

Relation = Callable[[Estimate, Estimate, str], bool]
RELATIONS: Final[dict[str, Relation]] = {
    "lowest": lambda a, b, _m: a.mean < b.mean,
    "highest": lambda a, b, _m: a.mean > b.mean,
    "higher": higher,
    "much higher": significantly_higher,
    "lower": lambda a, b, m: higher(b, a, m),
    "less": lambda a, b, _m: a.mean < b.mean,
    "comparable": comparable,
    "comparable or lower": lambda a, b, m: a.mean <= b.mean or comparable(a, b, m),
    "comparable or higher": lambda a, b, m: a.mean >= b.mean or comparable(a, b, m),
}


def _numbers(v: View, metric: str, config: str, techniques: Sequence[str]) -> str:
    return f"{LABEL.get(metric, metric)}: " + "; ".join(
        v.num(metric, config, t) for t in techniques
    )


def rank(
    metric: str,
    subject: str,
    relation: str,
    others: Sequence[str] = TECHNIQUES,
    configs: Sequence[str] = (),
) -> Callable[[View], list[Check]]:
    """``subject`` stands in ``relation`` to each of ``others`` in every configuration."""
    rel = RELATIONS[relation]

    def evaluate(v: View) -> list[Check]:
        checks = []
        for c in v.configurations(*configs):
            rivals = [o for o in others if o != subject and v.has(c, o)]
            if not v.has(c, subject) or not rivals:
                continue
            a = v.est(metric, c, subject)
            ok = all(rel(a, v.est(metric, c, o), metric) for o in rivals)
            checks.append(Check(c, ok, _numbers(v, metric, c, [subject, *rivals])))
        return checks

    return evaluate


def across(
    metric: str,
    techniques: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    relation: str,
) -> Callable[[View], list[Check]]:
    """For each technique, the second configuration of each pair stands in ``relation`` to
    the first (e.g. ``("C", "D")`` with ``comparable``: no effect from C to D)."""
    rel = RELATIONS[relation]

    def evaluate(v: View) -> list[Check]:
        checks = []
        for first, second in pairs:
            for t in techniques:
                if not (v.has(first, t) and v.has(second, t)):
                    continue
                a, b = v.est(metric, second, t), v.est(metric, first, t)
                detail = (
                    f"{t} {LABEL.get(metric, metric)}: {first} {b.text()} -> {second} {a.text()}"
                )
                checks.append(Check(f"{first}->{second}", rel(a, b, metric), detail))
        return checks

    return evaluate


def every(*parts: Callable[[View], list[Check]]) -> Callable[[View], list[Check]]:
    """All the checks of several parts of one claim."""

    def evaluate(v: View) -> list[Check]:
        return [c for p in parts for c in p(v)]

    return evaluate


def cold_coincides(v: View) -> list[Check]:
    checks = []
    for c in v.configurations():
        if v.has(c, "cold"):
            down, total = v.est("downtime_s", c, "cold"), v.est("total_time_s", c, "cold")
            ok = abs(down.mean - total.mean) <= 0.01 * total.mean
            checks.append(Check(c, ok, f"cold downtime {down.text()} s, total {total.text()} s"))
    return checks


def low_downtime(technique: str) -> Callable[[View], list[Check]]:
    def evaluate(v: View) -> list[Check]:
        checks = []
        for c in v.configurations():
            if v.has(c, technique) and v.has(c, "cold"):
                d, cold = v.est("downtime_s", c, technique), v.est("downtime_s", c, "cold")
                share = d.mean / cold.mean if cold.mean > 0 else float("inf")
                detail = (
                    f"{technique} downtime {d.text()} s = {share:.0%} of cold's {cold.text()} s"
                )
                checks.append(Check(c, share < LOW_DOWNTIME, detail))
        return checks

    return evaluate


def rtt_penalty(v: View) -> list[Check]:
    """Post-copy's excess over cold grows with the RTT: A against C, B against D."""
    checks = []
    for slow, fast in (("A", "C"), ("B", "D")):
        if not all(v.has(c, t) for c in (slow, fast) for t in ("cold", "postcopy")):
            continue
        ratio = {
            c: v.est("total_time_s", c, "postcopy").mean / v.est("total_time_s", c, "cold").mean
            for c in (slow, fast)
        }
        detail = f"postcopy/cold total: {slow} {ratio[slow]:.2f}, {fast} {ratio[fast]:.2f}"
        checks.append(Check(f"{slow} vs {fast}", ratio[slow] > ratio[fast], detail))
    return checks


def local_negligible(v: View) -> list[Check]:
    checks = []
    local = ("pre_dump_time_s", "dump_time_s", "resume_time_s")
    moved = ("pre_dump_transfer_time_s", "dump_transfer_time_s", "faulted_pages_transfer_time_s")
    for c in v.configurations():
        shares = {}
        for t in TECHNIQUES:
            if v.has(c, t):
                own = sum(v.est(m, c, t).mean for m in local)
                link = sum(v.est(m, c, t).mean for m in moved)
                shares[t] = own / link if link > 0 else float("inf")
        if shares:
            worst = max(shares.values())
            detail = "local/transfer time: " + "; ".join(f"{t} {s:.0%}" for t, s in shares.items())
            checks.append(Check(c, worst < NEGLIGIBLE, detail))
    return checks


def dump_bound(exempt: bool) -> Callable[[View], list[Check]]:
    """Dumps of live techniques take at most a second (``exempt=False``), except pre-copy's
    in B; cold's dumps (and pre-copy's in B) take longer (``exempt=True``)."""

    def evaluate(v: View) -> list[Check]:
        checks = []
        for c in v.configurations():
            chosen = [
                t
                for t in TECHNIQUES
                if v.has(c, t) and (t == "cold" or (t == "precopy" and c == "B")) == exempt
            ]
            if not chosen:
                continue
            means = [v.est("dump_time_s", c, t).mean for t in chosen]
            ok = all(m > DUMP_SECONDS for m in means) if exempt else max(means) <= DUMP_SECONDS
            checks.append(Check(c, ok, _numbers(v, "dump_time_s", c, chosen)))
        return checks

    return evaluate


def largest_component(v: View) -> list[Check]:
    expected = {
        "cold": "dump_mb",
        "precopy": "pre_dump_mb",
        "postcopy": "faulted_pages_mb",
        "hybrid": "pre_dump_mb",
    }
    checks = []
    for c in v.configurations():
        wrong = []
        parts = []
        for t, part in expected.items():
            if not v.has(c, t):
                continue
            sizes = {m: v.est(m, c, t).mean for m in ("pre_dump_mb", "dump_mb", "faulted_pages_mb")}
            biggest = max(sizes, key=lambda m: sizes[m])
            parts.append(f"{t} {LABEL[biggest]} {sizes[biggest]:.1f} MB")
            if biggest != part:
                wrong.append(t)
        if parts:
            checks.append(Check(c, not wrong, "largest part: " + "; ".join(parts)))
    return checks


def exec_state(v: View) -> list[Check]:
    checks = []
    for c in v.configurations():
        if v.has(c, "postcopy"):
            dump, total = v.est("dump_mb", c, "postcopy"), v.est("transferred_mb", c, "postcopy")
            share = dump.mean / total.mean if total.mean > 0 else 1.0
            detail = f"postcopy dump {dump.text()} MB of {total.text()} MB ({share:.1%})"
            checks.append(Check(c, share < EXEC_STATE_SHARE, detail))
    return checks


def beyond_state(v: View) -> list[Check]:
    checks = []
    for c in v.configurations():
        present = [t for t in TECHNIQUES if v.has(c, t)]
        if not present:
            continue
        state = v.state_mb(c)
        means = {t: v.est("transferred_mb", c, t).mean for t in present}
        detail = f"service state {state:g} MB; transferred " + "; ".join(
            f"{t} {m:.1f} MB" for t, m in means.items()
        )
        checks.append(Check(c, min(means.values()) > state, detail))
    return checks


def limited_increase(v: View) -> list[Check]:
    checks = []
    for t in ("precopy", "hybrid"):
        if v.has("C", t) and v.has("D", t):
            lo, hi = v.est("transferred_mb", "C", t), v.est("transferred_mb", "D", t)
            ok = hi.mean > lo.mean and hi.mean < 1.25 * lo.mean
            checks.append(Check("C->D", ok, f"{t} transferred: C {lo.text()} -> D {hi.text()} MB"))
    return checks


def approaches_cold(v: View) -> list[Check]:
    if not (v.has("B", "precopy") and v.has("B", "cold")):
        return []
    pre, cold = v.est("downtime_s", "B", "precopy"), v.est("downtime_s", "B", "cold")
    tot, cold_tot = v.est("total_time_s", "B", "precopy"), v.est("total_time_s", "B", "cold")
    return [
        Check(
            "B",
            pre.mean >= 0.5 * cold.mean,
            f"precopy downtime {pre.text()} s against cold's {cold.text()} s",
        ),
        Check(
            "B",
            higher(tot, cold_tot, "total_time_s"),
            f"precopy total {tot.text()} s against cold's {cold_tot.text()} s",
        ),
    ]


STREAMED = (
    "fogmig's post-copy streams the pages the service has not asked for yet over several "
    "channels at the link's rate, compressed where that pays, while the service already runs "
    "(faults go first, on a channel of their own): its lazy phase is bound by the link's "
    "throughput, not by round trips, so its total comes out close to cold's, below it where "
    "running the restore beside the transfer wins, rather than above it as with a "
    "fault-by-fault transfer"
)
DELTAS = (
    "fogmig's pre-copy rounds ship each changed page as its difference from the copy the "
    "destination already holds (XOR, compressed) and stop when another round cannot shorten "
    "the downtime by more than it lengthens the total: at 500 KB/s of dirtying the rounds add "
    "about half a megabyte to the state, not the whole pages re-sent round after round, so B "
    "behaves much like A"
)
FAST_NODES = (
    "the nodes here are x86 machines dumping to memory, not Raspberry Pi boards: local steps "
    "(dump, resume) take fractions of a second whatever the size, so second-scale "
    "differences the paper saw between them shrink below the comparison margins"
)
CHANNEL = (
    "fogmig streams images over its own channel (no rsync start-up, no per-file checksums): "
    "each phase costs little beyond its bytes, so techniques that move the same bytes end up "
    "close and small differences in bytes decide the order"
)
DIRTY = (
    "the sensor service dirties its pages at the configured rate, but CRIU's dirty tracking "
    "counts whole pages and the container's own pages (runtime, interpreter) change too, so "
    "the dirty data is not proportional to the configured rate"
)
LAZY_SETUP = (
    "fogmig's post-copy and hybrid downtimes hold the transfer of the execution state and the "
    "lazy layout (about 2 MB before compression) and a restore whose first page faults are "
    "answered across the link: on the 123 ms mobility link each of these takes round trips, "
    "so the downtime grows with the RTT, while a restore from a complete local image does not"
)
PRECOPY_SHORT_DUMP = (
    "pre-copy's final dump holds only the pages changed during the pre-copy phase (at 10 KB/s "
    "well under a megabyte even over a long phase) and crosses the link in one stream, while "
    "post-copy's and hybrid's downtimes on the slow link also include setting up lazy paging "
    "across it (round trips); that evens the downtimes out unless the dump grows large"
)
SMALL = (
    "the run moved less state than the paper's (with --quick, about an eighth), so "
    "fixed costs weigh more against the state-proportional ones"
)
