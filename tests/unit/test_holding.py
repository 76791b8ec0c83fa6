"""The hold at a migration's destination without sockets: bounds, the kernel's tables, pacing."""

from __future__ import annotations

import socket

import pytest

from fogmig.platform.agent.holding import (
    IP_PKTINFO,
    HeldDatagram,
    HoldBuffer,
    HoldSettings,
    HoldStats,
    PortQueue,
    Sent,
    parse_pktinfo,
    pktinfo_for,
    port_queue,
    relay_pending,
)


def datagram(n: int, size: int = 10, at: float = 0.0) -> HeldDatagram:
    return HeldDatagram(
        data=bytes([n % 256]) * size,
        sender=("10.79.0.1", 40000 + n),
        dst_ip="10.79.0.2",
        ifindex=2,
        received_at=at,
    )


def held(buffer: HoldBuffer) -> list[int]:
    out = []
    while len(buffer):
        out.append(buffer.popleft().sender[1] - 40000)
    return out


def test_count_bound_drops_the_oldest_and_counts_them() -> None:
    stats = HoldStats()
    buffer = HoldBuffer(max_count=3, max_bytes=10_000, stats=stats)
    for n in range(5):
        buffer.push(datagram(n))
    assert (stats.held, stats.dropped_overflow, stats.dropped) == (5, 2, 2)
    assert buffer.nbytes == 30
    assert held(buffer) == [2, 3, 4]
    assert buffer.nbytes == 0


def test_byte_bound_drops_the_oldest_until_it_fits() -> None:
    stats = HoldStats()
    buffer = HoldBuffer(max_count=100, max_bytes=25, stats=stats)
    buffer.push(datagram(0, size=10))
    buffer.push(datagram(1, size=10))
    buffer.push(datagram(2, size=12))
    assert stats.dropped_overflow == 1
    assert buffer.nbytes == 22
    assert held(buffer) == [1, 2]


def test_a_datagram_larger_than_the_byte_bound_is_not_kept() -> None:
    stats = HoldStats()
    buffer = HoldBuffer(max_count=100, max_bytes=25, stats=stats)
    buffer.push(datagram(0, size=5))
    buffer.push(datagram(1, size=30))
    assert (len(buffer), buffer.nbytes, stats.dropped_overflow) == (0, 0, 2)


def test_push_front_and_clear_keep_the_byte_count() -> None:
    stats = HoldStats()
    buffer = HoldBuffer(max_count=10, max_bytes=100, stats=stats)
    buffer.push(datagram(0))
    buffer.push(datagram(1))
    first = buffer.popleft()
    buffer.push_front(first)
    assert buffer.nbytes == 20
    assert stats.held == 2
    assert buffer.clear() == 2
    assert buffer.nbytes == 0


def test_settings_refuse_empty_bounds() -> None:
    with pytest.raises(ValueError, match="positive"):
        HoldSettings(max_count=0)


def row(local: str, remote: str, rx_queue: int, inode: int, drops: int) -> str:
    """One socket as ``/proc/net/udp`` lists it."""
    return (
        f" 9077: {local} {remote} 07 00000000:{rx_queue:08X} 00:00000000 00000000"
        f"     0        0 {inode} 2 000000001514f791 {drops}"
    )


HEADER = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid ..."
V4_MAPPED_ANY = "0000000000000000FFFF000000000000"
UDP = "\n".join(
    [
        HEADER,
        row("00000000:1644", "00000000:0000", 0, 100, 0),
        row("00000000:1644", "0100007F:0009", 0x300, 101, 0),
        row("00000000:1645", "00000000:0000", 0x900, 102, 0),
        row("0A4F0001:1644", "00000000:0000", 0x100, 103, 1),
    ]
)
UDP6 = "\n".join([HEADER, row(f"{V4_MAPPED_ANY}:1644", "0" * 32 + ":0000", 0x340, 200, 7)])


def test_port_queue_sums_unconnected_sockets_on_the_port_but_ours() -> None:
    queue = port_queue([UDP, UDP6], 0x1644, exclude_inodes={100})
    # 101 is connected (the fenced hold socket), 102 is another port, 100 is excluded.
    assert queue == PortQueue(listeners=2, queued_bytes=0x100 + 0x340, drops=8)
    assert port_queue([UDP], 5000, exclude_inodes=set()).listeners == 0


def test_pktinfo_round_trip() -> None:
    info = pktinfo_for("10.79.0.1", 3)
    assert parse_pktinfo([(socket.IPPROTO_IP, IP_PKTINFO, info)]) == ("0.0.0.0", 3)
    raw = (7).to_bytes(4, "little") + socket.inet_aton("10.79.0.2") * 2
    assert parse_pktinfo([(socket.IPPROTO_IP, IP_PKTINFO, raw)]) == ("10.79.0.2", 7)
    assert parse_pktinfo([]) == (None, 0)


class FakeService:
    """A service socket whose queue fills with each send and drains with the fake clock."""

    def __init__(
        self,
        *,
        rcvbuf: int = 4000,
        truesize: int = 768,
        drain_per_s: float = 10_000.0,
        listening: bool = True,
    ) -> None:
        self.now = 0.0
        self.queue = 0
        self.rcvbuf = rcvbuf
        self.truesize = truesize
        self.drain_per_s = drain_per_s
        self.listening = listening
        self.got: list[tuple[int, str]] = []
        self.kernel_drops = 0
        self.peak = 0
        self.refuse: set[int] = set()
        self.busy_sends = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-4)
        self.queue = max(0, self.queue - int(self.drain_per_s * max(seconds, 1e-4)) * self.truesize)

    def probe(self) -> PortQueue:
        return PortQueue(listeners=int(self.listening), queued_bytes=self.queue, drops=0)

    def send(self, item: HeldDatagram, target_ip: str) -> Sent:
        n = item.sender[1] - 40000
        if self.busy_sends:
            self.busy_sends -= 1
            return Sent.RETRY
        if n in self.refuse:
            return Sent.FAILED
        if self.queue + self.truesize > self.rcvbuf:
            self.kernel_drops += 1
            return Sent.OK
        self.queue += self.truesize
        self.peak = max(self.peak, self.queue)
        self.got.append((n, target_ip))
        return Sent.OK


async def run_relay(
    service: FakeService, count: int, settings: HoldSettings, target_ip: str | None = None
) -> HoldStats:
    stats = HoldStats()
    buffer = HoldBuffer(max_count=10_000, max_bytes=10**7, stats=stats)
    for n in range(count):
        buffer.push(datagram(n, at=-1.0))
    await relay_pending(
        buffer,
        service,
        target_ip=target_ip,
        settings=settings,
        stats=stats,
        clock=service.clock,
        sleep=service.sleep,
    )
    assert len(buffer) == 0
    return stats


async def test_pacing_keeps_a_slow_service_from_overflowing() -> None:
    service = FakeService(rcvbuf=20_000, drain_per_s=2_000)
    settings = HoldSettings(queue_limit=8_000, burst=4)
    stats = await run_relay(service, 500, settings)
    assert service.kernel_drops == 0
    assert [n for n, _ in service.got] == list(range(500))
    assert service.peak < settings.queue_limit + settings.burst * service.truesize
    assert stats.released == 500
    assert stats.dropped == 0
    assert stats.max_held_latency_s >= 1.0


async def test_without_pacing_the_same_burst_would_overflow() -> None:
    service = FakeService(rcvbuf=20_000, drain_per_s=2_000)
    await run_relay(service, 500, HoldSettings(queue_limit=10**9, burst=500))
    assert service.kernel_drops > 0


async def test_each_datagram_goes_to_its_own_destination_unless_one_is_given() -> None:
    service = FakeService()
    await run_relay(service, 2, HoldSettings())
    assert {ip for _, ip in service.got} == {"10.79.0.2"}
    service = FakeService()
    await run_relay(service, 2, HoldSettings(), target_ip="10.79.0.9")
    assert {ip for _, ip in service.got} == {"10.79.0.9"}


async def test_a_full_send_buffer_is_retried_and_failures_are_counted() -> None:
    service = FakeService()
    service.busy_sends = 3
    service.refuse = {1}
    stats = await run_relay(service, 4, HoldSettings())
    assert [n for n, _ in service.got] == [0, 2, 3]
    assert (stats.released, stats.dropped_unrelayable) == (3, 1)


async def test_no_listener_drops_the_rest_after_the_timeout() -> None:
    service = FakeService(listening=False)
    stats = await run_relay(service, 5, HoldSettings(listener_timeout_s=0.5))
    assert (stats.released, stats.dropped_unrelayable) == (0, 5)
    assert 0.5 <= service.now < 0.6


async def test_a_stalled_service_gets_the_rest_dropped() -> None:
    service = FakeService(rcvbuf=10**6, drain_per_s=0)
    settings = HoldSettings(queue_limit=4 * 768, burst=4, stall_timeout_s=1.0)
    stats = await run_relay(service, 20, settings)
    assert (stats.released, stats.dropped_unrelayable) == (4, 16)
    assert stats.dropped == 16


async def test_relaying_stops_when_told_to() -> None:
    service = FakeService()
    stats = HoldStats()
    buffer = HoldBuffer(max_count=100, max_bytes=10_000, stats=stats)
    for n in range(20):
        buffer.push(datagram(n))
    await relay_pending(
        buffer,
        service,
        target_ip=None,
        settings=HoldSettings(burst=4),
        stats=stats,
        clock=service.clock,
        sleep=service.sleep,
        running=lambda: stats.released < 8,
    )
    assert (stats.released, len(buffer)) == (8, 12)
