"""The link emulator's logic on a fake clock: token bucket, delay line, queue, cut, wake-ups."""

from __future__ import annotations

import pytest

from fogmig.platform.testbed.linkemu import (
    MIN_QUEUE_BYTES,
    DelayLine,
    LinkDirection,
    TokenBucket,
    WakeupTracker,
    queue_bytes_for,
)


def test_token_bucket_idle_link_sends_at_once() -> None:
    bucket = TokenBucket(8e6)  # 1 MB/s
    assert bucket.take(10.0, 1000) == 10.0


def test_token_bucket_paces_back_to_back_packets_at_the_rate() -> None:
    bucket = TokenBucket(8e6)  # 1 MB/s: a 1000-byte packet owes 1 ms
    times = [bucket.take(0.0, 1000) for _ in range(5)]
    assert times == pytest.approx([0.0, 0.001, 0.002, 0.003, 0.004])


def test_token_bucket_long_run_rate_is_exact_for_huge_packets() -> None:
    rate_bps = 11.34e6
    bucket = TokenBucket(rate_bps)
    size = 65000
    n = 200
    last = 0.0
    for _ in range(n):
        last = bucket.take(0.0, size)
    # n packets need n-1 packet times before the last one may leave.
    assert last == pytest.approx((n - 1) * size * 8 / rate_bps)


def test_token_bucket_debt_is_repaid_while_idle() -> None:
    bucket = TokenBucket(8e6)
    bucket.take(0.0, 5000)  # owes 5 ms
    assert bucket.departure(0.002) == pytest.approx(0.005)
    assert bucket.departure(0.010) == pytest.approx(0.010)


def test_token_bucket_burst_is_capped() -> None:
    bucket = TokenBucket(8e6, burst_bytes=2000)
    # After a long idle time only 2000 bytes of credit exist.
    assert bucket.take(100.0, 2000) == 100.0
    assert bucket.take(100.0, 1000) == 100.0  # tokens 0 -> may leave, goes into debt
    assert bucket.take(100.0, 1000) == pytest.approx(100.001)


def test_token_bucket_rate_change_applies_to_new_debt() -> None:
    bucket = TokenBucket(8e6)
    bucket.take(0.0, 1000)
    bucket.set_rate(16e6, 0.001)
    bucket.take(0.001, 1000)
    assert bucket.departure(0.001) == pytest.approx(0.0015)
    with pytest.raises(ValueError, match="positive"):
        bucket.set_rate(0, 1.0)


def test_delay_line_keeps_order_even_if_due_times_shrink() -> None:
    line: DelayLine[str] = DelayLine()
    line.push(5.0, "a")
    line.push(3.0, "b")  # due earlier, but a link never reorders
    assert line.pop_due(4.0) == []
    assert line.next_due() == 5.0
    assert line.pop_due(5.0) == ["a", "b"]
    assert line.next_due() is None


def test_direction_delays_by_half_the_rtt_minus_overhead_plus_transmission() -> None:
    d: LinkDirection[str] = LinkDirection(rate_mbit=8, rtt_ms=100, overhead_s=0.001)
    # 1000 bytes at 1 MB/s take 1 ms to cross (store and forward), then half the RTT.
    due = d.offer(1.0, "p", 1000)
    assert due == pytest.approx(1.0 + 0.001 + 0.050 - 0.001)
    assert d.pop_due(1.0) == []
    assert due is not None
    assert d.pop_due(due) == ["p"]


def test_direction_back_to_back_packets_arrive_at_the_rate() -> None:
    d: LinkDirection[int] = LinkDirection(rate_mbit=8, rtt_ms=10)
    dues = [d.offer(0.0, i, 1000) for i in range(3)]
    # Even the first packet after an idle spell takes its transmission time.
    assert dues == pytest.approx([0.006, 0.007, 0.008])


def test_direction_overhead_larger_than_delay_means_no_delay() -> None:
    d: LinkDirection[str] = LinkDirection(rate_mbit=100, rtt_ms=0.5, overhead_s=0.001)
    assert d.delay_s == 0.0


def test_direction_throughput_matches_the_rate() -> None:
    d: LinkDirection[int] = LinkDirection(rate_mbit=72.41, rtt_ms=6.94, queue_bytes=10**9)
    size = 65000
    dues = [d.offer(0.0, i, size) for i in range(100)]
    assert all(x is not None for x in dues)
    first, last = dues[0], dues[-1]
    assert first is not None
    assert last is not None
    assert (last - first) == pytest.approx(99 * size * 8 / 72.41e6)


def test_direction_drops_when_the_queue_is_full() -> None:
    d: LinkDirection[int] = LinkDirection(rate_mbit=8, rtt_ms=10, queue_bytes=3000)
    results = [d.offer(0.0, i, 1000) for i in range(6)]
    accepted = [r for r in results if r is not None]
    assert len(accepted) == 3
    assert d.stats.dropped_queue == 3
    # Once the queue drained, packets are accepted again.
    assert d.offer(1.0, 99, 1000) is not None


def test_default_queue_holds_two_delay_bandwidth_products() -> None:
    assert queue_bytes_for(100, 100) == pytest.approx(2 * 100e6 / 8 * 0.1, abs=1)
    assert queue_bytes_for(11.34, 122.95) == pytest.approx(2 * 11.34e6 / 8 * 0.12295, abs=1)
    # Small products still leave room for a burst of large packets.
    assert queue_bytes_for(1, 1) == MIN_QUEUE_BYTES


def test_cut_drops_everything_and_loses_packets_in_flight() -> None:
    d: LinkDirection[str] = LinkDirection(rate_mbit=10, rtt_ms=100)
    d.offer(0.0, "in flight", 100)
    assert d.set_cut(True) == 1
    assert d.offer(0.01, "offered while cut", 100) is None
    assert d.pop_due(10.0) == []
    assert d.stats.dropped_cut == 2
    d.set_cut(False)
    due = d.offer(20.0, "after restore", 100)
    assert due is not None
    assert d.pop_due(due) == ["after restore"]


def test_set_shape_changes_delay_and_rate() -> None:
    d: LinkDirection[str] = LinkDirection(rate_mbit=10, rtt_ms=100)
    d.set_shape(0.0, rate_mbit=20, rtt_ms=10)
    assert d.delay_s == pytest.approx(0.005)
    assert d.bucket.rate_Bps == pytest.approx(20e6 / 8)


def test_wakeup_tracker_learns_lateness_and_caps_stalls() -> None:
    tracker = WakeupTracker(alpha=0.5, cap_s=0.001)
    for _ in range(30):
        asked = tracker.wake_time(10.0)
        tracker.observe(asked, asked + 0.0002)
    assert tracker.estimate_s == pytest.approx(0.0002)
    assert tracker.wake_time(10.0) == pytest.approx(9.9998)
    assert tracker.horizon(9.9998) == pytest.approx(10.0)
    for _ in range(30):
        tracker.observe(0.0, 5.0)  # a long stall counts as the cap only
    assert tracker.estimate_s == pytest.approx(0.001)
