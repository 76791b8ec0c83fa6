"""What a probe saw of a service: its requests over time, and a migration window's downtime.

Pure values and functions over the probe's records (monotonic send and answer times), so a
live run and a test of hand-made records give the same numbers; :mod:`.probe` makes them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fogmig.device_sim.events import RequestOutcome
from fogmig.platform.base.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRecord:
    """One probe request: when it left and, if a good answer came in time, when that came."""

    seq: int
    """1 for the probe's first request, counting up by one per request sent."""
    address: str
    """The gateway the request went to."""
    sent_at: float
    """Monotonic time (``time.monotonic()``) the request left."""
    answered_at: float | None
    """Monotonic time a 2.xx answer came; None for a timeout or an error answer."""
    outcome: RequestOutcome
    code: str = ""
    """CoAP code ``"c.dd"``, ``"network"`` for an error below CoAP, empty for a timeout."""
    detail: str = ""
    """For an error below CoAP, what it was (the socket's error, e.g. ``ECONNREFUSED``)."""

    @property
    def answered(self) -> bool:
        return self.answered_at is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowObservation:
    """What the probe saw around one window (see :func:`observe_window` for the definitions)."""

    start: float
    end: float
    interval_s: float
    downtime_s: float | None
    """Longest gap between consecutive good answers that overlaps the window, minus one probe
    interval, never negative; None when the probe's answers do not bracket the window."""
    gap_from: float | None
    """Answer time of the last good answer before the longest gap."""
    gap_to: float | None
    """Answer time of the first good answer after the longest gap."""
    sent: int
    """Requests sent within ``[start, end]``."""
    answered: int
    """Of those, the ones that got a good (2.xx) answer within their timeout."""
    lost: int
    """Of those, the ones that did not: ``sent - answered`` (timeouts and error answers)."""

    @property
    def gap_s(self) -> float | None:
        if self.gap_from is None or self.gap_to is None:
            return None
        return self.gap_to - self.gap_from


def check_window(start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        raise ConfigError(f"a window needs finite start <= end, got [{start}, {end}]")


def answer_times(records: Iterable[ProbeRecord]) -> list[float]:
    """The good answers' times, in order."""
    return sorted(r.answered_at for r in records if r.answered_at is not None)


def longest_gap(
    answered: Sequence[float], *, start: float, end: float
) -> tuple[float, float] | None:
    """The widest pair of consecutive answer times ``(a, b)`` with ``a <= end`` and
    ``b >= start`` (the gap overlaps ``[start, end]``, touching counts); None when
    ``answered`` (sorted) has no answer at or before ``start`` or none at or after ``end``.

    Of equally wide gaps the earliest wins.
    """
    check_window(start, end)
    if not answered or answered[0] > start or answered[-1] < end:
        return None
    best: tuple[float, float] | None = None
    for a, b in itertools.pairwise(answered):
        if a > end:
            break
        if b >= start and (best is None or b - a > best[1] - best[0]):
            best = (a, b)
    if best is None:
        # One answer exactly at a zero-length window: no gap around it at all.
        best = (start, start)
    return best


def observe_window(
    records: Iterable[ProbeRecord], *, start: float, end: float, interval_s: float
) -> WindowObservation:
    """The device-observed downtime of the window ``[start, end]`` and its request counts.

    Definitions (all times on the probe's monotonic clock):

    - A request is *answered* if a 2.xx answer came within its own timeout; its answer time
      is when that answer arrived. Timeouts and error answers (4.xx, 5.xx, ICMP errors) are
      not answers.
    - The good answers, ordered by answer time, cut the probe's run into *gaps*: from one
      answer time ``a`` to the next ``b``. A gap *overlaps* the window if ``a <= end`` and
      ``b >= start``.
    - The *downtime* is the widest overlapping gap ``b - a`` minus ``interval_s`` (the
      spacing a healthy service shows anyway), and 0 if that is negative. For a service
      that stops answering at ``t0`` and answers again at ``t1`` it lies in
      ``[t1 - t0 - interval_s, t1 - t0]``.
    - It is None when no good answer came at or before ``start``, or none at or after
      ``end``: the probe did not see the service up on both sides of the window, so it
      cannot bound the interruption.
    - ``sent`` counts the requests whose send time lies in ``[start, end]``; ``answered``
      those of them answered as above; ``lost = sent - answered``. A request sent in the
      window but answered after it still counts as answered.
    """
    if not interval_s > 0:
        raise ConfigError(f"the probe interval must be positive, got {interval_s}")
    check_window(start, end)
    records = list(records)
    gap = longest_gap(answer_times(records), start=start, end=end)
    in_window = [r for r in records if start <= r.sent_at <= end]
    answered = sum(r.answered for r in in_window)
    return WindowObservation(
        start=start,
        end=end,
        interval_s=interval_s,
        downtime_s=None if gap is None else max(0.0, gap[1] - gap[0] - interval_s),
        gap_from=None if gap is None else gap[0],
        gap_to=None if gap is None else gap[1],
        sent=len(in_window),
        answered=answered,
        lost=len(in_window) - answered,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeTimeline:
    """Everything one probe run recorded, in send order."""

    address: str
    """The gateway the probe started on."""
    port: int
    path: str
    interval_s: float
    timeout_s: float
    started_at: float
    """Monotonic time of the first send."""
    stopped_at: float
    """Monotonic time the last request was settled (answered or given up)."""
    wall_offset_s: float
    """``time.time() - time.monotonic()`` at the start: add it to a monotonic time to get
    UNIX time, subtract it from a UNIX time (e.g. a migration record's) to compare."""
    records: tuple[ProbeRecord, ...]

    def window(self, start: float, end: float) -> WindowObservation:
        """:func:`observe_window` over this run, for a window on the monotonic clock."""
        return observe_window(self.records, start=start, end=end, interval_s=self.interval_s)

    def window_wall(self, start: float, end: float) -> WindowObservation:
        """:meth:`window` for a window given in UNIX time."""
        return self.window(start - self.wall_offset_s, end - self.wall_offset_s)

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def answered(self) -> int:
        return sum(r.answered for r in self.records)
