"""A measured RTT is on target within 5% or half a millisecond, whichever is larger."""

from __future__ import annotations

from fogmig.platform.testbed.probe import rtt_within


def test_short_links_get_the_emulators_half_millisecond() -> None:
    assert rtt_within(6.94, 7.31)  # 5.3% off, 0.37 ms: the emulator's own jitter
    assert not rtt_within(6.94, 7.6)
    assert rtt_within(122.95, 128.0)  # 4.1%
    assert not rtt_within(122.95, 130.0)  # 5.7%: far more than the floor
    assert not rtt_within(6.94, None)
