"""The logic of an emulated link, free of I/O: a token bucket for the rate, a delay line for
the propagation delay, a bounded queue, and the cut switch.

Times are plain floats in seconds from whatever clock the caller uses, so the link daemon runs
it on the event loop's clock and the unit tests on a fake one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Room for a burst of maximum-size packets, whatever the rate.
MIN_QUEUE_BYTES = 256 * 1024
# Queue depth in units of the link's delay-bandwidth product: BBR (this kernel's default)
# keeps up to two of them in flight, so it runs without losses; loss-based TCPs keep the link
# busy through a loss.
QUEUE_BDP_FACTOR = 2.0


class TokenBucket:
    """A token bucket that lets a packet leave once the bucket is not in debt.

    A packet leaves as soon as the tokens are non-negative and then takes its size out, so the
    bucket may go into debt: the long-run rate is exactly ``rate_bps`` for packets of any size
    (a packet of the data links' large MTU can be larger than any sensible burst), and an idle
    link starts sending the first packet at once.
    """

    def __init__(self, rate_bps: float, burst_bytes: float = 0.0) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.rate_Bps = rate_bps / 8.0
        self.burst = burst_bytes
        self.tokens = burst_bytes
        self.t_last: float | None = None

    def _tokens_at(self, t: float) -> float:
        if self.t_last is None:
            return self.burst
        return min(self.burst, self.tokens + (t - self.t_last) * self.rate_Bps)

    def set_rate(self, rate_bps: float, now: float) -> None:
        """Change the rate from ``now`` on (a debt already owed is repaid at the new rate)."""
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        if self.t_last is not None and now > self.t_last:
            self.tokens = self._tokens_at(now)
            self.t_last = now
        self.rate_Bps = rate_bps / 8.0

    def departure(self, now: float) -> float:
        """When a packet offered at ``now`` may leave (nothing is taken)."""
        t = now if self.t_last is None else max(now, self.t_last)
        tokens = self._tokens_at(t)
        return t if tokens >= 0 else t - tokens / self.rate_Bps

    def take(self, now: float, size: int) -> float:
        """Send a packet of ``size`` bytes offered at ``now``; returns its departure time."""
        t = self.departure(now)
        self.tokens = self._tokens_at(t) - size
        self.t_last = t
        return t


@dataclass
class DelayLine(Generic[T]):
    """A FIFO of items, each released at its due time; order is kept even if due times shrink."""

    items: deque[tuple[float, T]] = field(default_factory=deque)

    def push(self, due: float, item: T) -> None:
        self.items.append((due, item))

    def next_due(self) -> float | None:
        return self.items[0][0] if self.items else None

    def pop_due(self, now: float) -> list[T]:
        out: list[T] = []
        while self.items and self.items[0][0] <= now:
            out.append(self.items.popleft()[1])
        return out

    def clear(self) -> int:
        n = len(self.items)
        self.items.clear()
        return n

    def __len__(self) -> int:
        return len(self.items)


def bdp_bytes(rate_mbit: float, rtt_ms: float) -> float:
    return rate_mbit * 1e6 / 8 * rtt_ms / 1e3


def queue_bytes_for(rate_mbit: float, rtt_ms: float) -> int:
    return max(MIN_QUEUE_BYTES, int(bdp_bytes(rate_mbit, rtt_ms) * QUEUE_BDP_FACTOR))


@dataclass
class DirectionStats:
    packets: int = 0
    bytes: int = 0
    dropped_queue: int = 0
    dropped_cut: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "dropped_queue": self.dropped_queue,
            "dropped_cut": self.dropped_cut,
        }


class LinkDirection(Generic[T]):
    """One direction of a link: offer packets as they arrive, take them when they are due.

    ``overhead_s`` is the one-way delay that the emulator's own path (reading and writing the
    TUN devices, waking up) adds; it is taken off the propagation delay so that the delay an
    application measures is the one asked for.
    """

    def __init__(
        self,
        *,
        rate_mbit: float,
        rtt_ms: float,
        overhead_s: float = 0.0,
        queue_bytes: int | None = None,
    ) -> None:
        self.overhead_s = overhead_s
        self.bucket = TokenBucket(rate_mbit * 1e6)
        self.line: DelayLine[T] = DelayLine()
        self.cut = False
        self.stats = DirectionStats()
        self.queue_bytes_fixed = queue_bytes
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self.delay_s = 0.0
        self.queue_bytes = 0
        self._apply_shape()

    def _apply_shape(self) -> None:
        self.delay_s = max(0.0, self.rtt_ms / 2e3 - self.overhead_s)
        self.queue_bytes = self.queue_bytes_fixed or queue_bytes_for(self.rate_mbit, self.rtt_ms)

    def set_shape(self, now: float, *, rate_mbit: float, rtt_ms: float) -> None:
        self.bucket.set_rate(rate_mbit * 1e6, now)
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self._apply_shape()

    def set_overhead(self, overhead_s: float) -> None:
        self.overhead_s = overhead_s
        self._apply_shape()

    def set_cut(self, cut: bool) -> int:
        """Cut (or restore) the direction; cutting loses the packets in flight. Returns them."""
        self.cut = cut
        if not cut:
            return 0
        lost = self.line.clear()
        self.stats.dropped_cut += lost
        return lost

    def offer(self, now: float, item: T, size: int) -> float | None:
        """Accept a packet; returns its due time, or None when it is dropped."""
        if self.cut:
            self.stats.dropped_cut += 1
            return None
        leave = self.bucket.departure(now)
        backlog = (leave - now) * self.bucket.rate_Bps if leave > now else 0.0
        if backlog > 0 and backlog + size > self.queue_bytes:
            self.stats.dropped_queue += 1
            return None
        leave = self.bucket.take(now, size)
        # Store and forward: the packet arrives once its last bit has crossed. Delivering it
        # when its first bit leaves would let a burst after an idle spell arrive faster than
        # the rate, and rate-estimating TCPs (BBR) would believe the link is faster than it is.
        due = leave + size / self.bucket.rate_Bps + self.delay_s
        self.line.push(due, item)
        self.stats.packets += 1
        self.stats.bytes += size
        return due

    def pop_due(self, now: float) -> list[T]:
        return self.line.pop_due(now)

    def next_due(self) -> float | None:
        return self.line.next_due()


class WakeupTracker:
    """Learns how late the event loop wakes for a timer, so timers can be set that much early.

    The estimate is an exponentially weighted mean of observed lateness, capped so that one
    long stall (a loaded machine) cannot make the link deliver packets far too early.
    """

    def __init__(self, *, alpha: float = 0.05, cap_s: float = 0.001) -> None:
        self.alpha = alpha
        self.cap_s = cap_s
        self.estimate_s = 0.0

    def wake_time(self, due: float) -> float:
        return due - self.estimate_s

    def horizon(self, now: float) -> float:
        """Packets due up to here go out now: waiting for them would make them late."""
        return now + self.estimate_s

    def observe(self, asked: float, woke: float) -> None:
        late = min(max(woke - asked, 0.0), self.cap_s)
        self.estimate_s += self.alpha * (late - self.estimate_s)
