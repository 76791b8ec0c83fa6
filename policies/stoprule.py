"""When pre-copy stops, judged on what the rounds measured: another round only if it pays.

After each leave-running round the engine knows how fast the service dirtied pages, what a
changed page and the round's metadata cost on the wire, and how long a round takes besides its
bytes. :func:`next_round` predicts the pages the freeze would find if pre-copy stopped now, and
if it took one more round, and stops unless that round shortens the part after the freeze
(downtime, or the lazily faulted pages of hybrid) by more than it lengthens the total time.
"""

from __future__ import annotations

from dataclasses import dataclass

from fogmig.policies.conditions import PrecopyStopRules, StopReason


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundOutlook:
    """What the rounds so far measured, as the stop rule needs it."""

    rounds_done: int
    dirty_pages_per_s: float
    """Distinct pages changed per second: the last delta's pages over the time between its
    dump and the previous one (round 1: the service's measured dirty rate)."""
    since_dump_s: float
    """From the last round's dump to the moment it is taken: the pages dirtied meanwhile are
    what the next round (or the freeze) finds."""
    round_overhead_s: float
    """What a round costs besides its bytes: checkpoint, delta, the destination's reply."""
    page_wire_bytes: float
    """What a changed page costs a delta round on the wire (XOR and compression included)."""
    meta_wire_bytes: float
    """What every round carries besides pages (pagemaps, core images, descriptors)."""
    final_page_s: float
    """What a page left for after the freeze costs: its wire time in the final delta, or a
    lazy page's fault for hybrid."""
    link_bytes_per_s: float
    precopy_bytes_so_far: int
    state_bytes: int


@dataclass(frozen=True, slots=True)
class Forecast:
    """The prediction a decision was made from (seconds and pages)."""

    pages_if_stop: float
    pages_if_more: float
    round_s: float
    """How long one more round would take."""
    saved_s: float
    """How much that round would take off the part after the freeze."""

    @property
    def gain_s(self) -> float:
        """Downtime saved minus total time added; the round pays when this is positive."""
        return self.saved_s - (self.round_s - self.saved_s)


def forecast(o: RoundOutlook) -> Forecast:
    rate = max(o.dirty_pages_per_s, 0.0)
    link = max(o.link_bytes_per_s, 1.0)
    stop = rate * max(o.since_dump_s, 0.0)
    round_s = o.round_overhead_s + (o.meta_wire_bytes + stop * o.page_wire_bytes) / link
    more = rate * round_s
    saved = max(stop - more, 0.0) * o.final_page_s
    return Forecast(pages_if_stop=stop, pages_if_more=more, round_s=round_s, saved_s=saved)


def next_round(rules: PrecopyStopRules, o: RoundOutlook) -> tuple[StopReason | None, Forecast]:
    """Whether to stop after ``o.rounds_done`` rounds (``None``: take another), and why.

    ``min_changed_bytes`` bounds what the changed pages left for after the freeze cost, in
    link bytes (a lazy page's fault included): the metadata every round carries is paid once
    more by the freeze whatever pre-copy does, so it never keeps rounds going.
    """
    f = forecast(o)
    if f.pages_if_stop * o.final_page_s * o.link_bytes_per_s <= rules.min_changed_bytes:
        return StopReason.CONVERGED, f
    if o.rounds_done >= rules.max_rounds:
        return StopReason.MAX_ROUNDS, f
    if rules.stop_when_not_shrinking and f.pages_if_more >= f.pages_if_stop:
        return StopReason.NOT_SHRINKING, f
    budget = rules.max_precopy_bytes_factor * max(o.state_bytes, 1)
    next_bytes = o.meta_wire_bytes + f.pages_if_stop * o.page_wire_bytes
    if o.precopy_bytes_so_far + next_bytes > budget:
        return StopReason.BYTE_BUDGET, f
    if f.gain_s <= 0:
        return StopReason.NO_GAIN, f
    return None, f
