"""The probe's analysis: the device-observed downtime of a window and its request counts."""

from __future__ import annotations

import pytest

from fogmig.device_sim.events import NETWORK_ERROR, RequestOutcome
from fogmig.device_sim.observed import (
    ProbeRecord,
    ProbeTimeline,
    longest_gap,
    observe_window,
)
from fogmig.platform.base.errors import ConfigError

INTERVAL = 0.05


def rec(seq: int, sent: float, latency: float | None, code: str = "2.05") -> ProbeRecord:
    if latency is None:
        return ProbeRecord(
            seq=seq,
            address="10.0.0.1",
            sent_at=sent,
            answered_at=None,
            outcome=RequestOutcome.TIMEOUT,
        )
    ok = code.startswith("2.")
    return ProbeRecord(
        seq=seq,
        address="10.0.0.1",
        sent_at=sent,
        answered_at=sent + latency if ok else None,
        outcome=RequestOutcome.OK if ok else RequestOutcome.ERROR,
        code=code,
    )


def run(
    duration: float, *, down: tuple[float, float] | None = None, latency: float = 0.002
) -> list[ProbeRecord]:
    """A probe at 20 Hz from 0 to ``duration``; a request sent while the service is ``down``
    (from, to) gets no answer."""
    out = []
    for i in range(round(duration / INTERVAL)):
        t = i * INTERVAL
        dead = down is not None and down[0] <= t < down[1]
        out.append(rec(i + 1, t, None if dead else latency))
    return out


def test_a_steady_service_shows_no_downtime() -> None:
    seen = observe_window(run(3.0), start=1.0, end=2.0, interval_s=INTERVAL)
    assert seen.downtime_s == pytest.approx(0.0, abs=1e-9)
    assert seen.gap_s == pytest.approx(INTERVAL)
    assert (seen.sent, seen.answered, seen.lost) == (21, 21, 0)


def test_downtime_is_the_gap_minus_one_interval() -> None:
    # Requests sent in [1.0, 2.0) are lost: the last answer comes for the one sent at 0.95,
    # the next for the one sent at 2.0.
    records = run(4.0, down=(1.0, 2.0))
    seen = observe_window(records, start=1.2, end=1.5, interval_s=INTERVAL)
    assert seen.gap_from == pytest.approx(0.952)
    assert seen.gap_to == pytest.approx(2.002)
    assert seen.downtime_s == pytest.approx(1.05 - INTERVAL)
    # Only the requests sent within the window count.
    assert (seen.sent, seen.answered, seen.lost) == (7, 0, 7)


def test_a_window_around_the_outage_counts_both_kinds() -> None:
    seen = observe_window(run(4.0, down=(1.0, 2.0)), start=0.5, end=2.5, interval_s=INTERVAL)
    assert seen.downtime_s == pytest.approx(1.0)
    assert (seen.sent, seen.answered, seen.lost) == (41, 21, 20)


def test_a_gap_that_only_touches_the_window_counts() -> None:
    records = run(4.0, down=(1.0, 2.0))
    last_before, first_after = records[19].answered_at, records[40].answered_at
    assert last_before is not None
    assert first_after is not None
    ends_at_start = observe_window(records, start=first_after, end=3.0, interval_s=INTERVAL)
    assert ends_at_start.downtime_s == pytest.approx(1.0)
    starts_at_end = observe_window(records, start=0.5, end=last_before, interval_s=INTERVAL)
    assert starts_at_end.downtime_s == pytest.approx(1.0)
    after = observe_window(records, start=first_after + 0.001, end=3.0, interval_s=INTERVAL)
    assert after.downtime_s == pytest.approx(0.0, abs=1e-9)


def test_the_longest_overlapping_gap_wins_and_others_are_ignored() -> None:
    # Two outages: 0.5 s (inside the window) and 1.5 s (outside it).
    records = [*run(6.0, down=(1.0, 1.5))[:60], *run(6.0, down=(3.0, 4.5))[60:]]
    inside = observe_window(records, start=0.8, end=2.0, interval_s=INTERVAL)
    assert inside.downtime_s == pytest.approx(0.5)
    both = observe_window(records, start=0.8, end=3.5, interval_s=INTERVAL)
    assert both.downtime_s == pytest.approx(1.5)


def test_answers_are_ordered_by_arrival_not_by_send() -> None:
    # A frozen service answers the queued requests all at once when it thaws: several
    # requests sent during the pause come back at 2.0; the gap ends at the first of them.
    records = [rec(i + 1, i * INTERVAL, 0.002) for i in range(20)]  # up to 0.952
    records += [rec(21 + i, 1.0 + i * INTERVAL, 2.0 - (1.0 + i * INTERVAL)) for i in range(20)]
    records += [rec(41 + i, 2.0 + i * INTERVAL, 0.002) for i in range(20)]
    records.reverse()  # any input order
    seen = observe_window(records, start=1.2, end=1.8, interval_s=INTERVAL)
    assert (seen.gap_from, seen.gap_to) == (pytest.approx(0.952), pytest.approx(2.0))
    assert seen.downtime_s == pytest.approx(2.0 - 0.952 - INTERVAL)
    assert (seen.sent, seen.answered, seen.lost) == (13, 13, 0)


def test_error_answers_are_not_answers() -> None:
    records = run(3.0)
    for i in range(20, 30):
        code = NETWORK_ERROR if i % 2 else "5.03"
        records[i] = rec(i + 1, i * INTERVAL, 0.001, code=code)
    seen = observe_window(records, start=1.0, end=1.5, interval_s=INTERVAL)
    assert seen.downtime_s == pytest.approx(0.5)
    assert (seen.sent, seen.answered, seen.lost) == (11, 1, 10)


@pytest.mark.parametrize(
    ("down", "start", "end"),
    [
        ((1.5, 2.0), -0.5, 1.0),  # the probe saw no answer before the window
        ((1.5, 2.0), 2.5, 3.5),  # nor after it
        ((1.5, 3.0), 1.6, 2.0),  # the service never came back
    ],
)
def test_a_window_the_answers_do_not_bracket_has_no_downtime(
    down: tuple[float, float], start: float, end: float
) -> None:
    seen = observe_window(run(3.0, down=down), start=start, end=end, interval_s=INTERVAL)
    assert seen.downtime_s is None
    assert seen.gap_s is None


def test_no_answers_at_all() -> None:
    records = [rec(i + 1, i * INTERVAL, None) for i in range(10)]
    seen = observe_window(records, start=0.09, end=0.31, interval_s=INTERVAL)
    assert seen.downtime_s is None
    assert (seen.sent, seen.answered, seen.lost) == (5, 0, 5)


def test_longest_gap_of_a_zero_length_window() -> None:
    assert longest_gap([1.0, 1.05, 1.5], start=1.05, end=1.05) == (1.05, 1.5)
    assert longest_gap([1.0], start=1.0, end=1.0) == (1.0, 1.0)
    assert longest_gap([], start=1.0, end=1.0) is None


@pytest.mark.parametrize(
    ("start", "end", "interval"),
    [(2.0, 1.0, INTERVAL), (float("nan"), 1.0, INTERVAL), (0.0, 1.0, 0.0), (0.0, 1.0, -1.0)],
)
def test_bad_windows_and_intervals_are_refused(start: float, end: float, interval: float) -> None:
    with pytest.raises(ConfigError):
        observe_window(run(1.0), start=start, end=end, interval_s=interval)


def test_timeline_windows_on_either_clock() -> None:
    records = run(4.0, down=(1.0, 2.0))
    timeline = ProbeTimeline(
        address="10.0.0.1",
        port=5700,
        path="ping",
        interval_s=INTERVAL,
        timeout_s=1.0,
        started_at=0.0,
        stopped_at=4.0,
        wall_offset_s=1_700_000_000.0,
        records=tuple(records),
    )
    mono = timeline.window(1.21, 1.51)
    wall = timeline.window_wall(1_700_000_001.21, 1_700_000_001.51)
    assert mono.downtime_s == pytest.approx(1.0)
    assert wall.downtime_s == pytest.approx(1.0)
    assert (wall.sent, wall.lost) == (mono.sent, mono.lost) == (6, 6)
    assert (timeline.sent, timeline.answered) == (80, 60)
