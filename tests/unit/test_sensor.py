"""Unit tests of the sensor service's pure logic, its CoAP site on loopback, and the ledger."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fogmig.platform.base.vocabulary import PAGE_SIZE as FOGMIG_PAGE_SIZE
from fogmig.services import sensor
from fogmig.services.client import (
    DeviceLedger,
    PostResult,
    SensorClient,
    ServiceState,
    ServiceUnreachableError,
    encode_reading,
)
from fogmig.services.sensor import (
    INITIAL_HASH,
    PAGE_SIZE,
    DirtyWriter,
    InvalidReading,
    Reading,
    SensorState,
    chain_hash,
    should_apply,
    validate_reading,
)

# ---- hash chain -----------------------------------------------------------------------------


def test_chain_hash_is_sha256_over_previous_hex_and_payload() -> None:
    payload = b'{"device":"d","seq":1}'
    expected = hashlib.sha256(b"0" * 64 + payload).hexdigest()
    assert chain_hash(INITIAL_HASH, payload) == expected


def test_chain_hash_depends_on_order() -> None:
    a, b = b"a", b"b"
    ab = chain_hash(chain_hash(INITIAL_HASH, a), b)
    ba = chain_hash(chain_hash(INITIAL_HASH, b), a)
    assert ab != ba
    assert len(ab) == 64


# ---- validation -----------------------------------------------------------------------------


def test_valid_reading_keeps_device_and_seq() -> None:
    r = validate_reading(b'{"device": "d1", "seq": 7, "temp": 21.5}')
    assert r == Reading("d1", 7)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"seq": 1}',
        b'{"device": "", "seq": 1}',
        b'{"device": 5, "seq": 1}',
        b'{"device": "d"}',
        b'{"device": "d", "seq": -1}',
        b'{"device": "d", "seq": 1.5}',
        b'{"device": "d", "seq": "1"}',
        b'{"device": "d", "seq": true}',
        json.dumps({"device": "x" * 65, "seq": 1}).encode(),
    ],
)
def test_invalid_readings_are_rejected(payload: bytes) -> None:
    with pytest.raises(InvalidReading):
        validate_reading(payload)


# ---- dedup ----------------------------------------------------------------------------------


def test_dedup_rule() -> None:
    assert should_apply(None, 0)
    assert should_apply(3, 4)
    assert should_apply(3, 10)  # gaps are fine: lost readings are not waited for
    assert not should_apply(3, 3)
    assert not should_apply(3, 2)


def test_state_applies_each_device_seq_once() -> None:
    st = SensorState()
    p1 = encode_reading({"device": "a", "seq": 1})
    p2 = encode_reading({"device": "a", "seq": 2})
    q1 = encode_reading({"device": "b", "seq": 1})
    assert st.apply(validate_reading(p1), p1)
    assert not st.apply(validate_reading(p1), p1)  # retransmission
    assert st.apply(validate_reading(q1), q1)  # same seq, other device
    assert st.apply(validate_reading(p2), p2)
    assert not st.apply(validate_reading(p1), p1)  # late old reading
    assert st.count == 3
    assert st.hash == chain_hash(chain_hash(chain_hash(INITIAL_HASH, p1), q1), p2)
    devs = st.devices_json()
    assert devs["a"] == {
        "last_seq": 2,
        "count": 2,
        "hash": chain_hash(chain_hash(INITIAL_HASH, p1), p2),
    }
    assert devs["b"]["count"] == 1


# ---- memory writer --------------------------------------------------------------------------


def test_pages_per_second() -> None:
    assert sensor.pages_per_second(10) == 2.5
    assert sensor.pages_per_second(4) == 1.0


def test_allocate_state_is_random_and_sized() -> None:
    buf = sensor.allocate_state(2, chunk=300_000)
    assert len(buf) == 2 * 1024 * 1024
    # Random data: no page is all zero (probability of a false failure is negligible).
    assert all(any(buf[i : i + PAGE_SIZE]) for i in range(0, len(buf), PAGE_SIZE))


def _pages(buf: bytearray) -> list[bytes]:
    return [bytes(buf[i : i + PAGE_SIZE]) for i in range(0, len(buf), PAGE_SIZE)]


def test_writer_changes_the_asked_number_of_pages() -> None:
    buf = bytearray(sensor.allocate_state(1))  # 256 pages
    w = DirtyWriter(buf, dirty_kbps=400)  # 100 pages/s
    before = _pages(buf)
    t = 1000.0
    w.step(t)
    for _ in range(10):  # 1 s in 100 ms steps
        t += 0.1
        w.step(t)
    after = _pages(buf)
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert w.total_pages == 100
    assert changed == 100  # walking the buffer: 100 distinct pages
    assert w.measured_kbps() == pytest.approx(400, rel=0.02)


def test_writer_keeps_changing_pages_on_wraparound() -> None:
    buf = bytearray(4 * PAGE_SIZE)
    w = DirtyWriter(buf, dirty_kbps=16)  # 4 pages/s: the whole buffer each second
    t = 0.0
    w.step(t)
    snapshots = []
    for _ in range(3):
        t += 1.0
        w.step(t)
        snapshots.append(_pages(buf))
    for prev, cur in itertools.pairwise(snapshots):
        assert all(a != b for a, b in zip(prev, cur, strict=True))


def test_writer_does_not_burst_after_a_freeze() -> None:
    buf = bytearray(1024 * PAGE_SIZE)
    w = DirtyWriter(buf, dirty_kbps=40)  # 10 pages/s
    w.step(0.0)
    assert w.step(60.0) <= 10  # a minute frozen in a checkpoint counts as at most 1 s


def test_writer_with_zero_rate_or_state_does_nothing() -> None:
    assert DirtyWriter(bytearray(), 100).step(1.0) == 0
    w = DirtyWriter(bytearray(8 * PAGE_SIZE), 0)
    w.step(0.0)
    assert w.step(5.0) == 0
    assert w.measured_kbps() == 0.0


def test_parse_args_defaults() -> None:
    a = sensor.parse_args([])
    assert (a.state_mb, a.dirty_kbps, a.port) == (75, 10, 5683)
    with pytest.raises(SystemExit):
        sensor.parse_args(["--state-mb", "-1"])


# ---- the CoAP site on loopback (in-process, no root) ----------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def service_port() -> AsyncIterator[int]:
    import aiocoap

    port = _free_udp_port()
    buf = sensor.allocate_state(1)
    svc = sensor.Service(1, 40.0, DirtyWriter(buf, 40.0), started_at=1.0e9)
    ctx = await aiocoap.Context.create_server_context(sensor.build_site(svc), bind=("::1", port))
    try:
        yield port
    finally:
        await ctx.shutdown()


async def test_site_posts_and_state(service_port: int) -> None:
    ledger = DeviceLedger("dev-a")
    async with SensorClient(port=service_port, timeout=3) as c:
        for i in range(3):
            payload = ledger.next_reading(value=i)
            res = await c.post_reading("::1", payload)
            assert res.ok
            assert res.applied
            assert ledger.record(res)
        again = await c.post_reading("::1", encode_reading({"device": "dev-a", "seq": 2}))
        assert again.ok
        assert again.applied is False
        assert again.count == 3
        st = await c.get_state("::1")
    assert st.count == 3
    assert st.hash == ledger.hash
    assert st.last_seq == {"dev-a": 3}
    assert st.state_mb == 1
    assert st.uptime_s > 0
    assert ledger.verify(st, exclusive=True).matches


async def test_ping_answers_empty_and_leaves_the_state_alone(service_port: int) -> None:
    ledger = DeviceLedger("dev-p")
    async with SensorClient(port=service_port, timeout=3) as c:
        res = await c.post_reading("::1", ledger.next_reading(value=1))
        assert ledger.record(res)
        before = await c.get_state("::1")
        pings = [await c.request("::1", method="GET", path="ping") for _ in range(5)]
        refused = await c.request("::1", method="POST", path="ping")
        after = await c.get_state("::1")
    assert {(p.code, p.payload) for p in pings} == {("2.05", b"")}
    assert refused.code == "4.05"
    # Only what moves with time may differ: pings count as nothing.
    moving = {"uptime_s", "rss_kb", "dirty_kbps_measured", "dirtied_pages"}
    assert after.model_dump(exclude=moving) == before.model_dump(exclude=moving)
    assert after.requests == 1
    assert ledger.verify(after, exclusive=True).matches


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"method": "POST", "path": "sensor", "payload": b'{"device":"d","seq":1}'}, "4.15"),
        (
            {"method": "POST", "path": "sensor", "payload": b'{"device":"d","seq":1}',
             "content_format": 0},
            "4.15",
        ),
        ({"method": "POST", "path": "sensor", "payload": b"{", "content_format": 50}, "4.00"),
        (
            {"method": "POST", "path": "sensor", "payload": b'{"seq":1}', "content_format": 50},
            "4.00",
        ),
        (
            {"method": "POST", "path": "sensor", "content_format": 50,
             "payload": encode_reading({"device": "d", "seq": 1, "pad": "x" * 1100})},
            "4.13",
        ),
        ({"method": "GET", "path": "nowhere"}, "4.04"),
        ({"method": "PUT", "path": "sensor", "payload": b"{}", "content_format": 50}, "4.05"),
        ({"method": "POST", "path": "state"}, "4.05"),
    ],
)  # fmt: skip
async def test_site_rejects_bad_input(service_port: int, kwargs: dict[str, Any], code: str) -> None:
    async with SensorClient(port=service_port, timeout=3) as c:
        reply = await c.request("::1", **kwargs)
        assert reply.code == code
        st = await c.get_state("::1")
    assert st.count == 0


# ---- ledger verification --------------------------------------------------------------------


def _state(
    devices: dict[str, tuple[int, int, str]], count: int | None = None, hash_: str | None = None
) -> ServiceState:
    devs = {d: {"last_seq": s, "count": n, "hash": h} for d, (s, n, h) in devices.items()}
    if count is None and len(devices) == 1:
        ((_, n, h),) = devices.values()
        count, hash_ = n, h
    return ServiceState.model_validate(
        {
            "count": count or 0,
            "hash": hash_ or INITIAL_HASH,
            "state_mb": 1,
            "dirty_kbps": 0,
            "dirty_kbps_measured": 0,
            "uptime_s": 1,
            "started_at": 0,
            "pid": 1,
            "devices": devs,
        }
    )


def _ack(ledger: DeviceLedger, svc: SensorState, *, applied_by_service: bool = True) -> bytes:
    payload = ledger.next_reading(v=1)
    applied = svc.apply(validate_reading(payload), payload) if applied_by_service else False
    ledger.record(PostResult("2.04", 0.01, svc.count, svc.hash, applied))
    return payload


def _as_state(ledger: DeviceLedger, svc: SensorState) -> ServiceState:
    rec = svc.devices.get(ledger.device)
    if rec is None:
        return _state({})
    return _state({ledger.device: (rec.last_seq, rec.count, rec.hash)}, svc.count, svc.hash)


def test_ledger_matches_service() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    for _ in range(5):
        _ack(ledger, svc)
    check = ledger.verify(_as_state(ledger, svc), exclusive=True)
    assert check.matches
    assert check.lost == 0
    assert check.doubled == 0
    assert check.expected_count == check.service_count == 5


def test_ledger_detects_lost_readings() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    for _ in range(3):
        _ack(ledger, svc)
    old = _as_state(ledger, svc)  # e.g. a restore from this older checkpoint
    for _ in range(2):
        _ack(ledger, svc)
    check = ledger.verify(old)
    assert not check.matches
    assert check.lost == 2
    assert "lost" in check.reason


def test_ledger_detects_doubled_readings() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    payloads = [_ack(ledger, svc) for _ in range(3)]
    # A service that applied the second reading twice (dedup broken).
    h = INITIAL_HASH
    for p in [payloads[0], payloads[1], payloads[1], payloads[2]]:
        h = chain_hash(h, p)
    check = ledger.verify(_state({"d": (3, 4, h)}))
    assert not check.matches
    assert check.doubled == 1


def test_ledger_detects_a_different_history() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    for _ in range(2):
        _ack(ledger, svc)
    check = ledger.verify(_state({"d": (2, 2, "f" * 64)}))
    assert not check.matches
    assert "hash" in check.reason


def test_ledger_settles_a_retry_whose_first_answer_was_lost() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    payload = ledger.next_reading(v=1)
    assert svc.apply(validate_reading(payload), payload)  # applied, but the answer was lost
    assert ledger.next_reading(v=2) == payload  # the device resends the same bytes
    applied = svc.apply(validate_reading(payload), payload)
    assert not applied
    assert ledger.record(PostResult("2.04", 0.01, svc.count, svc.hash, applied))
    assert ledger.verify(_as_state(ledger, svc)).matches


def test_ledger_accounts_for_abandoned_readings() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    _ack(ledger, svc)
    # Given up, but the service did apply it.
    payload = ledger.next_reading()
    svc.apply(validate_reading(payload), payload)
    ledger.abandon()
    # Given up and never arrived.
    ledger.next_reading()
    ledger.abandon()
    _ack(ledger, svc)
    assert ledger.uncertain == 2
    check = ledger.verify(_as_state(ledger, svc))
    assert check.matches
    assert check.unacknowledged_applied == 1
    assert svc.devices["d"].last_seq == 4


def test_ledger_error_answer_keeps_the_reading_pending() -> None:
    ledger = DeviceLedger("d")
    payload = ledger.next_reading()
    assert not ledger.record(PostResult("5.03", 0.01, message="busy"))
    assert ledger.next_reading() == payload
    assert ledger.count == 0


def test_ledger_for_a_device_the_service_never_saw() -> None:
    ledger, svc = DeviceLedger("d"), SensorState()
    _ack(ledger, svc)
    check = ledger.verify(_state({}))
    assert not check.matches
    assert check.lost == 1


async def test_client_reports_an_unreachable_service() -> None:
    port = _free_udp_port()  # nothing listens there
    async with SensorClient(port=port, timeout=2) as c:
        with pytest.raises(ServiceUnreachableError, match=str(port)):
            await c.get_state("::1")


async def test_client_times_out_on_a_silent_service() -> None:
    # A bound socket that never answers: the request must end at the client's timeout.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as silent:
        silent.bind(("::1", 0))
        async with SensorClient(port=silent.getsockname()[1], timeout=0.3) as c:
            with pytest.raises(ServiceUnreachableError, match=r"within 0\.3 s"):
                await c.post_reading("::1", {"device": "d", "seq": 1})


def test_the_sensor_pages_are_fogmigs_pages() -> None:
    # The sensor runs in the container without fogmig, so it keeps its own copy of the constant.
    assert PAGE_SIZE == FOGMIG_PAGE_SIZE


# ---- bounds: devices, seq jumps, a fast /state ------------------------------------------------


def _reading(device: str, seq: int) -> tuple[Reading, bytes]:
    payload = json.dumps({"device": device, "seq": seq}).encode()
    return validate_reading(payload), payload


def test_a_hundred_thousand_devices_do_not_grow_the_table_beyond_its_limit() -> None:
    import time

    svc = SensorState()
    refused = 0
    for i in range(100_000):
        try:
            svc.apply(*_reading(f"dev-{i}", 1))
        except sensor.DeviceTableFull:
            refused += 1
    assert len(svc.devices) == sensor.MAX_DEVICES
    assert refused == 100_000 - sensor.MAX_DEVICES
    # The known devices keep working when the table is full.
    assert svc.apply(*_reading("dev-0", 2))
    service = sensor.Service(1, 0.0, DirtyWriter(bytearray(PAGE_SIZE), 0.0), 1.0, svc)
    started = time.perf_counter()
    for _ in range(10):
        doc = service.state_json()
    assert (time.perf_counter() - started) / 10 < 0.05
    assert len(json.dumps(doc)) < 1 << 20


def test_a_forged_huge_seq_does_not_block_the_device() -> None:
    svc = SensorState()
    assert svc.apply(*_reading("dev-a", 1))
    with pytest.raises(InvalidReading):
        svc.apply(*_reading("dev-a", 2**62))
    with pytest.raises(InvalidReading):
        validate_reading(json.dumps({"device": "dev-a", "seq": 2**64}).encode())
    assert svc.apply(*_reading("dev-a", 2))
    assert svc.devices["dev-a"].last_seq == 2
    # A new device cannot start far ahead either.
    with pytest.raises(InvalidReading):
        svc.apply(*_reading("dev-b", sensor.MAX_SEQ_JUMP + 1))
    # A gap of lost readings within the bound is fine.
    assert svc.apply(*_reading("dev-a", 2 + sensor.MAX_SEQ_JUMP))


async def test_site_refuses_a_new_device_when_the_table_is_full() -> None:
    import aiocoap

    port = _free_udp_port()
    svc = sensor.Service(
        1, 0.0, DirtyWriter(bytearray(PAGE_SIZE), 0.0), 1.0, SensorState(max_devices=2)
    )
    ctx = await aiocoap.Context.create_server_context(sensor.build_site(svc), bind=("::1", port))
    try:
        async with SensorClient(port=port, timeout=3) as c:
            for name in ("dev-a", "dev-b"):
                assert (await c.post_reading("::1", encode_reading({"device": name, "seq": 1}))).ok
            full = await c.post_reading("::1", encode_reading({"device": "dev-c", "seq": 1}))
            forged = await c.post_reading("::1", encode_reading({"device": "dev-a", "seq": 10**12}))
            st = await c.get_state("::1")
    finally:
        await ctx.shutdown()
    assert full.code == "5.03"
    assert forged.code == "4.00"
    assert st.last_seq == {"dev-a": 1, "dev-b": 1}
