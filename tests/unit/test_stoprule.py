"""The measured pre-copy stop rule: another round only where it shortens more than it costs."""

from __future__ import annotations

import dataclasses

import pytest

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.policies.conditions import PrecopyStopRules, StopReason
from fogmig.policies.stoprule import RoundOutlook, forecast, next_round

MOBILITY = 11.34e6 / 8  # bytes/s
MANAGEMENT = 72.41e6 / 8
RULES = PrecopyStopRules()


def outlook(**kw: float) -> RoundOutlook:
    """After the first full round of the 75 MB service on the mobility link, 500 KB/s."""
    base = RoundOutlook(
        rounds_done=1,
        dirty_pages_per_s=125.0,
        since_dump_s=60.0,
        round_overhead_s=0.6,
        page_wire_bytes=PAGE_SIZE / 1.15,
        meta_wire_bytes=80_000,
        final_page_s=PAGE_SIZE / 1.15 / MOBILITY,
        link_bytes_per_s=MOBILITY,
        precopy_bytes_so_far=82_000_000,
        state_bytes=82_000_000,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_forecast_follows_the_measured_rate_and_round_time() -> None:
    f = forecast(outlook())
    assert f.pages_if_stop == pytest.approx(125 * 60)
    expected_round = 0.6 + (80_000 + 7500 * PAGE_SIZE / 1.15) / MOBILITY
    assert f.round_s == pytest.approx(expected_round)
    assert f.pages_if_more == pytest.approx(125 * expected_round)
    assert f.saved_s == pytest.approx((7500 - 125 * expected_round) * PAGE_SIZE / 1.15 / MOBILITY)


def test_whole_pages_after_a_long_first_round_take_another_round() -> None:
    assert next_round(RULES, outlook())[0] is None


def test_xor_coded_pages_make_another_round_pointless() -> None:
    # After a delta round: 30 bytes a changed page, 1.5 s since the dump.
    coded = outlook(rounds_done=2, since_dump_s=1.5, page_wire_bytes=30, final_page_s=30 / MOBILITY)
    reason, f = next_round(RULES, coded)
    assert reason is StopReason.CONVERGED
    assert f.gain_s <= 0


def test_metadata_alone_never_keeps_rounds_going() -> None:
    # Each round carries 250 KB of metadata and almost no pages: the old rule, comparing the
    # whole round with 512 KiB plus the metadata, took one more round here.
    quiet = outlook(
        rounds_done=2,
        dirty_pages_per_s=2.5,
        since_dump_s=1.0,
        meta_wire_bytes=250_000,
        page_wire_bytes=60,
        final_page_s=60 / MANAGEMENT,
        link_bytes_per_s=MANAGEMENT,
    )
    assert next_round(RULES, quiet)[0] is StopReason.CONVERGED


def test_a_round_that_saves_less_than_it_costs_is_not_taken() -> None:
    # Management link, 500 KB/s, after the first round (whole pages assumed): the final delta
    # would take 0.5 s; another round costs 1 s to take 0.45 s off it.
    d = outlook(
        since_dump_s=9.5,
        round_overhead_s=0.45,
        final_page_s=PAGE_SIZE / 1.15 / MANAGEMENT,
        link_bytes_per_s=MANAGEMENT,
    )
    reason, f = next_round(PrecopyStopRules(min_changed_bytes=0), d)
    assert reason is StopReason.NO_GAIN
    assert 0 < f.saved_s < f.round_s - f.saved_s


def test_lazily_faulted_pages_justify_a_round_that_a_final_delta_does_not() -> None:
    after_delta = outlook(rounds_done=2, since_dump_s=1.2, page_wire_bytes=30)
    shipped = dataclasses.replace(after_delta, final_page_s=30 / MOBILITY)
    faulted = dataclasses.replace(after_delta, final_page_s=PAGE_SIZE / MOBILITY + 0.06)
    assert next_round(RULES, shipped)[0] is not None
    assert next_round(RULES, faulted)[0] is None


def test_limits_still_apply() -> None:
    assert next_round(PrecopyStopRules(max_rounds=1), outlook())[0] is StopReason.MAX_ROUNDS
    # Dirtying outruns the link: the round after would find more pages than this one.
    flood = outlook(dirty_pages_per_s=2000, page_wire_bytes=PAGE_SIZE, since_dump_s=1.0)
    assert next_round(RULES, flood)[0] is StopReason.NOT_SHRINKING
    budget = PrecopyStopRules(max_precopy_bytes_factor=1.0)
    assert next_round(budget, outlook())[0] is StopReason.BYTE_BUDGET
