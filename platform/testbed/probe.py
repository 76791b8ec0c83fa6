"""Measuring the testbed's data links: round-trip time and TCP throughput, asked vs measured.

RTT is the median of UDP echo round trips between two namespaces (sockets made inside each
namespace by this process); throughput is one iperf3 TCP run per link, after an omitted
warm-up so that slow start on a long link does not count against it.
"""

from __future__ import annotations

import asyncio
import json
import math
import select
import statistics
import threading
import time
from dataclasses import asdict, dataclass

from fogmig.platform.base.errors import TestbedError
from fogmig.platform.base.proc import in_netns
from fogmig.platform.testbed.netns import socket_in_netns
from fogmig.platform.testbed.state import LinkInfo, NodeInfo, TestbedState

RTT_TOLERANCE = 0.05
RTT_FLOOR_MS = 0.5
"""An RTT within this of the asked one is on target whatever the share: the userspace link
emulator's own scheduling varies by a few tenths of a millisecond, which is more than 5% of
the orchestration link's 6.94 ms (measured 7.31 ms on a busy 2-core machine)."""
RATE_TOLERANCE = 0.10
IPERF_PORT = 5201
DEFAULT_SECONDS = 3.0
DEFAULT_PINGS = 15


def within(asked: float, measured: float | None, tolerance: float, floor: float = 0.0) -> bool:
    if measured is None:
        return False
    return abs(measured - asked) <= max(tolerance * asked, floor)


def rtt_within(asked_ms: float, measured_ms: float | None) -> bool:
    """Whether a measured RTT matches the asked one (:data:`RTT_TOLERANCE`, at least
    :data:`RTT_FLOOR_MS`)."""
    return within(asked_ms, measured_ms, RTT_TOLERANCE, RTT_FLOOR_MS)


def warmup_seconds(rtt_ms: float) -> int:
    """Seconds of iperf3 warm-up to omit: TCP needs some round trips to fill a long link."""
    return max(1, math.ceil(rtt_ms * 8 / 1000))


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    a: str
    b: str
    rtt_asked_ms: float
    rtt_ms: float | None
    rtt_lost: int
    rate_asked_mbit: float
    rate_mbit: float | None
    seconds: float

    @property
    def rtt_ok(self) -> bool:
        return rtt_within(self.rtt_asked_ms, self.rtt_ms)

    @property
    def rate_ok(self) -> bool:
        return within(self.rate_asked_mbit, self.rate_mbit, RATE_TOLERANCE)

    @property
    def ok(self) -> bool:
        return self.rtt_ok and self.rate_ok

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = asdict(self)
        d.update(rtt_ok=self.rtt_ok, rate_ok=self.rate_ok)
        return d


def _echo_rtts(src: NodeInfo, dst: NodeInfo, count: int, timeout: float) -> tuple[list[float], int]:
    """Blocking: ``count`` sequential UDP round trips from ``src`` to an echo in ``dst``."""
    server = socket_in_netns(dst.netns)
    client = socket_in_netns(src.netns)
    stop = threading.Event()
    try:
        server.bind((dst.data_ip, 0))
        client.bind((src.data_ip, 0))
        port = server.getsockname()[1]

        def echo() -> None:
            while not stop.is_set():
                ready, _, _ = select.select([server], [], [], 0.1)
                if ready:
                    data, addr = server.recvfrom(2048)
                    server.sendto(data, addr)

        thread = threading.Thread(target=echo, name="probe-echo", daemon=True)
        thread.start()
        rtts: list[float] = []
        lost = 0
        client.settimeout(timeout)
        for seq in range(count):
            payload = seq.to_bytes(4, "big") + bytes(60)
            t0 = time.perf_counter()
            client.sendto(payload, (dst.data_ip, port))
            try:
                while True:
                    data = client.recv(2048)
                    if data == payload:
                        break
            except TimeoutError:
                lost += 1
                continue
            rtts.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)
        stop.set()
        thread.join()
        return rtts, lost
    finally:
        stop.set()
        server.close()
        client.close()


async def measure_rtt(
    src: NodeInfo, dst: NodeInfo, *, count: int = DEFAULT_PINGS, timeout: float = 2.0
) -> tuple[float | None, int]:
    """Median RTT in ms (None if every echo was lost) and the number lost."""
    rtts, lost = await asyncio.to_thread(_echo_rtts, src, dst, count, timeout)
    return (statistics.median(rtts) if rtts else None), lost


async def measure_rate(
    src: NodeInfo, dst: NodeInfo, *, seconds: float, omit: int, port: int = IPERF_PORT
) -> float | None:
    """TCP throughput src -> dst in Mbit/s as the receiver saw it (iperf3), None on failure."""
    server = await asyncio.create_subprocess_exec(
        *in_netns(dst.netns, ["iperf3", "-s", "-1", "-B", dst.data_ip, "-p", str(port)]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        argv = ["iperf3", "-c", dst.data_ip, "-B", src.data_ip, "-p", str(port), "-J",
                "-t", f"{seconds:g}", "-O", str(omit), "--connect-timeout", "3000"]  # fmt: skip
        for _attempt in range(20):
            client = await asyncio.create_subprocess_exec(
                *in_netns(src.netns, argv),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(client.communicate(), seconds + omit + 30)
            try:
                result = json.loads(out)
            except json.JSONDecodeError:
                result = {}
            received = result.get("end", {}).get("sum_received")
            if client.returncode == 0 and received:
                return float(received["bits_per_second"]) / 1e6
            # The server may not listen yet; a refused connect is quick, so try again.
            if server.returncode is not None:
                return None
            await asyncio.sleep(0.1)
        return None
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


async def probe_link(
    state: TestbedState, link: LinkInfo, *, seconds: float, pings: int = DEFAULT_PINGS
) -> LinkMeasurement:
    src, dst = state.node(link.a), state.node(link.b)
    rtt, lost = await measure_rtt(src, dst, count=pings, timeout=max(1.0, link.rtt_ms / 250))
    rate = None
    if rtt is not None:
        rate = await measure_rate(src, dst, seconds=seconds, omit=warmup_seconds(link.rtt_ms))
    return LinkMeasurement(
        a=link.a,
        b=link.b,
        rtt_asked_ms=link.rtt_ms,
        rtt_ms=rtt,
        rtt_lost=lost,
        rate_asked_mbit=link.rate_mbit,
        rate_mbit=rate,
        seconds=seconds,
    )


async def probe(
    state: TestbedState, *, seconds: float = DEFAULT_SECONDS, pings: int = DEFAULT_PINGS
) -> list[LinkMeasurement]:
    """Measure every link in turn (one at a time, so they do not share the emulator's CPU)."""
    if seconds <= 0:
        raise TestbedError("the probe duration must be positive")
    return [await probe_link(state, link, seconds=seconds, pings=pings) for link in state.links]


__all__ = ["LinkMeasurement", "measure_rate", "measure_rtt", "probe", "probe_link"]
