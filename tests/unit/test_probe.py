"""The probe device on loopback: NON requests at a fixed rate, never retransmitted, and the
downtime it sees when the service's event loop freezes (as a paused container's would)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fogmig.device_sim.coap import CoapThread
from fogmig.device_sim.events import RequestOutcome
from fogmig.device_sim.probe import MAX_RATE_HZ, Probe, ProbeSettings, write_csv
from fogmig.platform.base.errors import ConfigError
from fogmig.services import sensor
from fogmig.services.client import SensorClient

NON = 1
GET = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def silent_sockets(port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two bound UDP sockets that never answer: on ::1 and on 127.0.0.1, same port."""
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4,
    ):
        v6.bind(("::1", port))
        v4.bind(("127.0.0.1", port))
        v6.setblocking(False)
        v4.setblocking(False)
        yield v6, v4


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(2048))
    return got


@pytest.fixture
async def sensor_thread() -> AsyncIterator[tuple[CoapThread, int]]:
    """The sensor's CoAP site on ::1, on an event loop of its own that a test can freeze."""
    import aiocoap

    port = _free_port()
    svc = sensor.Service(1, 0.0, sensor.DirtyWriter(bytearray(4096), 0.0), started_at=1.0e9)
    async with CoapThread.running() as thread:
        ctx = await thread.call(
            aiocoap.Context.create_server_context(sensor.build_site(svc), bind=("::1", port))
        )
        try:
            yield thread, port
        finally:
            await thread.call(ctx.shutdown())


async def _freeze(seconds: float) -> None:
    # Blocks the server's loop as SIGSTOP or a cgroup freeze would: datagrams wait in the
    # socket's buffer and are answered at once when it thaws.
    time.sleep(seconds)  # noqa: ASYNC251


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_hz": 0},
        {"rate_hz": -1},
        {"rate_hz": MAX_RATE_HZ + 1},
        {"rate_hz": math.nan},
        {"timeout_s": 0},
        {"timeout_s": math.inf},
        {"path": "/"},
    ],
)
def test_settings_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ProbeSettings(**kwargs)  # type: ignore[arg-type]


def test_defaults() -> None:
    s = ProbeSettings()
    assert (s.rate_hz, s.interval_s, s.path) == (20.0, 0.05, "ping")
    assert ProbeSettings(rate_hz=MAX_RATE_HZ).interval_s == pytest.approx(0.01)
    with pytest.raises(ConfigError):
        Probe(address="not-an-ip", port=5700)
    with pytest.raises(ConfigError):
        Probe(address="::1", port=0)


async def test_requests_are_non_on_the_beat_and_never_retransmitted() -> None:
    port = _free_port()
    settings = ProbeSettings(rate_hz=50, timeout_s=0.15)
    with silent_sockets(port) as (v6, v4):
        probe = Probe(address="::1", port=port, settings=settings)
        await probe.start()
        await asyncio.sleep(0.5)
        probe.retarget("127.0.0.1")
        await asyncio.sleep(0.5)
        t_stop = time.monotonic()
        timeline = await probe.stop()
        # stop() waits for the requests in flight, at most one timeout.
        assert time.monotonic() - t_stop < settings.timeout_s + 0.1
        await asyncio.sleep(0.3)  # anything aiocoap might still send would arrive by now
        on_v6, on_v4 = drain(v6), drain(v4)
    records = timeline.records
    assert 40 <= len(records) <= 55
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert {r.outcome for r in records} == {RequestOutcome.TIMEOUT}
    assert timeline.answered == 0
    # One datagram per request, each a NON GET to /ping with its own message ID.
    datagrams = on_v6 + on_v4
    assert len(datagrams) == len(records)
    assert {(d[0] >> 4 & 0x3, d[1]) for d in datagrams} == {(NON, GET)}
    assert len({d[2:4] for d in datagrams}) == len(datagrams)
    assert all(b"ping" in d for d in datagrams)
    # Half went to each address, and the records say where.
    by_address = {a: sum(r.address == a for r in records) for a in ("::1", "127.0.0.1")}
    assert by_address == {"::1": len(on_v6), "127.0.0.1": len(on_v4)}
    assert min(by_address.values()) >= 18
    # On the beat: sends 20 ms apart, none waiting for an earlier one's 150 ms timeout.
    gaps = [b.sent_at - a.sent_at for a, b in itertools.pairwise(records)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.02, rel=0.1)
    assert max(gaps) < 0.1


async def test_a_frozen_service_shows_as_downtime(sensor_thread: tuple[CoapThread, int]) -> None:
    server, port = sensor_thread
    settings = ProbeSettings(rate_hz=50, timeout_s=0.6)
    async with Probe.running(address="::1", port=port, settings=settings) as probe:
        await asyncio.sleep(0.5)
        steady = (probe.now(), probe.now() + 0.3)
        await asyncio.sleep(0.4)
        t0 = probe.now()
        await server.call(_freeze(0.4))
        t1 = probe.now()
        await asyncio.sleep(0.5)
    timeline = probe.timeline()
    frozen = timeline.window(t0, t1)
    print(frozen)
    assert 0.3 <= (frozen.downtime_s or 0) <= 0.55
    # The timeout outlasts the freeze: every request is answered, late.
    assert frozen.sent >= 15
    assert (frozen.answered, frozen.lost) == (frozen.sent, 0)
    calm = timeline.window(*steady)
    assert calm.downtime_s is not None
    assert calm.downtime_s < 0.05
    assert calm.lost == 0
    # Pings count as nothing in the service's state.
    async with SensorClient(port=port, timeout=2) as c:
        state = await c.get_state("::1")
    assert (state.requests, state.count) == (0, 0)


async def test_late_answers_past_the_timeout_are_lost(
    sensor_thread: tuple[CoapThread, int],
) -> None:
    server, port = sensor_thread
    settings = ProbeSettings(rate_hz=50, timeout_s=0.2)
    async with Probe.running(address="::1", port=port, settings=settings) as probe:
        await asyncio.sleep(0.3)
        t0 = probe.now()
        await server.call(_freeze(0.5))
        t1 = probe.now()
        await asyncio.sleep(0.3)
    seen = probe.timeline().window(t0, t1)
    assert seen.downtime_s is not None
    assert 0.4 <= seen.downtime_s <= 0.65
    # Sent in the first 0.3 s of the freeze: timed out before the thaw.
    assert seen.lost >= 10
    assert seen.answered >= 5


async def test_a_probe_runs_once_and_shares_a_thread(
    sensor_thread: tuple[CoapThread, int], tmp_path: Path
) -> None:
    server, port = sensor_thread
    probe = Probe(address="::1", port=port, thread=server)
    with pytest.raises(ConfigError):
        probe.timeline()
    with pytest.raises(ConfigError):
        await probe.stop()
    await probe.start()
    await asyncio.sleep(0.2)
    assert probe.records()
    timeline = await probe.stop()
    with pytest.raises(ConfigError):
        await probe.start()
    assert timeline.sent == timeline.answered >= 3
    assert timeline.stopped_at >= timeline.started_at
    assert abs(timeline.started_at + timeline.wall_offset_s - time.time()) < 5
    out = tmp_path / "probe.csv"
    write_csv(timeline, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "seq,address,sent_at,answered_at,latency_ms,outcome,code,detail"
    assert len(lines) == timeline.sent + 1
    assert lines[1].startswith("1,::1,")
    assert lines[1].endswith(",ok,2.05,")


def test_an_error_below_coap_is_named_by_its_socket_error() -> None:
    import errno

    import aiocoap.error

    from fogmig.device_sim.probe import error_detail

    wrapped = aiocoap.error.NetworkError("Connection refused (received through errqueue)")
    wrapped.__cause__ = OSError(errno.ECONNREFUSED, "Connection refused")
    assert error_detail(wrapped) == "ECONNREFUSED"
    assert error_detail(OSError(errno.EHOSTUNREACH, "No route to host")) == "EHOSTUNREACH"
    assert error_detail(aiocoap.error.NetworkError("gone")).startswith("NetworkError: ")
