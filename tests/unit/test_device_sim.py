"""Unit tests of the device simulator: roaming plans, outage and downtime bookkeeping from
synthetic timelines, the ledger that resumes a service's record, the device loop against a
scripted service, the CSV and summary, and a small fleet against the real sensor site on
loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fogmig.device_sim import run as sim_run
from fogmig.device_sim.coap import Answer, coap_uri, retransmission_plan, transport_tuning
from fogmig.device_sim.device import Device, DeviceConfig, RequestSettings, ResumedLedger
from fogmig.device_sim.events import (
    NETWORK_ERROR,
    ContinuityCheck,
    FleetEvent,
    MigrationSeen,
    Outage,
    RequestKind,
    RequestOutcome,
    RequestRecord,
    Roam,
    event_dict,
)
from fogmig.device_sim.fleet import DeviceFleet, migration_seen
from fogmig.device_sim.roaming import (
    Cycle,
    Hop,
    RandomWalk,
    Schedule,
    Static,
    hops_until,
    parse_schedule,
)
from fogmig.device_sim.summary import build_summary, format_summary
from fogmig.device_sim.timeline import (
    CSV_FIELDS,
    OutageTracker,
    TimelineWriter,
    default_gap_s,
    detect_outages,
    observed_downtime,
    percentile,
    read_timeline,
)
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.schemas import MigrationDone
from fogmig.platform.cli import device_sim as device_sim_cli
from fogmig.platform.migration.record import MigrationRecord
from fogmig.services import sensor
from fogmig.services.client import DeviceSummary, PostResult, ServiceState
from fogmig.services.sensor import SensorState, validate_reading

# ---- roaming --------------------------------------------------------------------------------


def test_parse_schedule() -> None:
    plan = parse_schedule(" 10:gw2, 20.5:gw1 ,")
    assert plan.moves == (Hop(10.0, "gw2"), Hop(20.5, "gw1"))


@pytest.mark.parametrize(
    "text", ["", "10", "x:gw1", "10:GW1", "20:gw1,10:gw2", "-1:gw1", "inf:gw1"]
)
def test_parse_schedule_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_schedule(text)


def test_schedule_skips_moves_to_the_current_gateway() -> None:
    plan = Schedule((Hop(1, "gw1"), Hop(2, "gw2"), Hop(3, "gw2"), Hop(4, "gw1")))
    assert list(plan.hops("gw1")) == [Hop(2, "gw2"), Hop(4, "gw1")]


def test_cycle_starts_after_the_start_gateway() -> None:
    plan = Cycle(("gw1", "gw2", "gw3"), dwell_s=5)
    assert hops_until(plan, "gw2", 20) == [Hop(5, "gw3"), Hop(10, "gw1"), Hop(15, "gw2")]
    assert hops_until(Cycle(("gw1",), 5), "gw1", 100) == []


def test_static_never_moves() -> None:
    assert hops_until(Static(), "gw1", 1e9) == []


def test_random_walk_is_reproducible_and_always_moves() -> None:
    plan = RandomWalk(("gw1", "gw2", "gw3"), dwell_s=10, seed=7)
    hops = hops_until(plan, "gw1", 100_000)
    assert hops == hops_until(RandomWalk(("gw1", "gw2", "gw3"), 10, seed=7), "gw1", 100_000)
    assert hops != hops_until(RandomWalk(("gw1", "gw2", "gw3"), 10, seed=8), "gw1", 100_000)
    previous = "gw1"
    for hop in hops:
        assert hop.gateway != previous
        previous = hop.gateway
    dwells = [b.at_s - a.at_s for a, b in zip([Hop(0, "gw1"), *hops], hops, strict=False)]
    assert statistics.mean(dwells) == pytest.approx(10, rel=0.1)
    assert {h.gateway for h in hops} == {"gw1", "gw2", "gw3"}


@pytest.mark.parametrize(
    ("gateways", "dwell"), [((), 1.0), (("gw1", "gw1"), 1.0), (("gw1",), 0.0), (("Gw",), 1.0)]
)
def test_walks_validate(gateways: tuple[str, ...], dwell: float) -> None:
    with pytest.raises(ConfigError):
        RandomWalk(gateways, dwell)
    with pytest.raises(ConfigError):
        Cycle(gateways, dwell)


# ---- synthetic timelines ----------------------------------------------------------------------


def rec(
    t: float,
    outcome: RequestOutcome = RequestOutcome.OK,
    *,
    latency: float = 0.005,
    device: str = "d0",
    gateway: str = "gw1",
    seq: int = 1,
    attempt: int = 1,
    code: str | None = None,
    applied: bool | None = True,
    kind: RequestKind = RequestKind.POST,
) -> RequestRecord:
    if code is None:
        code = {
            RequestOutcome.OK: "2.04",
            RequestOutcome.TIMEOUT: "",
            RequestOutcome.ERROR: "5.03",
        }[outcome]
    return RequestRecord(
        device=device,
        request=kind,
        seq=seq if kind is RequestKind.POST else None,
        attempt=attempt,
        service="s0",
        gateway=gateway,
        address="10.79.0.1",
        port=5700,
        sent_at=t,
        latency_s=latency,
        outcome=outcome,
        code=code,
        applied=applied if outcome is RequestOutcome.OK else None,
    )


def migration_timeline() -> list[RequestRecord]:
    """Readings every second; the service stops answering after t=3 and is back at t=7.5."""
    out = [rec(t) for t in (0.0, 1.0, 2.0, 3.0)]
    out += [
        rec(4.0, RequestOutcome.TIMEOUT, latency=2.0),
        rec(6.0, RequestOutcome.TIMEOUT, latency=2.0),
    ]
    out += [rec(8.0, RequestOutcome.ERROR, code=NETWORK_ERROR, latency=0.001)]
    out += [rec(9.0, gateway="gw2", latency=0.010), rec(10.0, gateway="gw2")]
    return out


def test_outage_from_failed_requests() -> None:
    outages = detect_outages(migration_timeline(), gap_s=default_gap_s(1.0))
    assert len(outages) == 1
    o = outages[0]
    assert o.last_ok_at == pytest.approx(3.005)
    assert o.first_ok_at == pytest.approx(9.010)
    assert o.downtime_s == pytest.approx(6.005)
    assert o.failed == 3
    assert (o.gateway_before, o.gateway_after) == ("gw1", "gw2")


def test_a_late_answer_is_an_outage_and_jitter_is_not() -> None:
    # CoAP retransmissions can hide a stop entirely: no failure, only a very late answer.
    late = [rec(0.0), rec(1.0), rec(2.0, latency=4.2), rec(7.0)]
    (o,) = detect_outages(late, gap_s=default_gap_s(1.0))
    assert o.failed == 0
    assert o.downtime_s == pytest.approx(6.2 - 1.005)
    jitter = [rec(0.0), rec(1.3, latency=0.2), rec(2.0), rec(3.4)]
    assert detect_outages(jitter, gap_s=default_gap_s(1.0)) == []


def test_outages_are_per_device_and_ignore_state_reads() -> None:
    records = [
        rec(0.0, device="a"),
        rec(0.5, device="b"),
        rec(1.0, RequestOutcome.TIMEOUT, device="a", latency=2),
        rec(1.5, device="b"),
        rec(1.6, RequestOutcome.TIMEOUT, kind=RequestKind.STATE, device="b"),
        rec(3.0, device="a"),
        rec(3.5, device="b"),
    ]
    outages = detect_outages(records, gap_s=default_gap_s(1.0))
    assert [(o.device, o.failed) for o in outages] == [("a", 1)]


def test_outage_tracker_rejects_a_bad_gap() -> None:
    with pytest.raises(ConfigError):
        OutageTracker(gap_s=0)


def test_observed_downtime_of_a_migration_window() -> None:
    records = migration_timeline()
    assert observed_downtime(records, start=4.0, end=8.5) == pytest.approx(6.005)
    # A window without disruption sees the beat.
    assert observed_downtime(records[:4], start=0.5, end=2.5) == pytest.approx(1.0)
    # Nothing answered after the window started: unknown.
    assert observed_downtime(records[:4], start=5.0, end=6.0) is None


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside"):
        percentile(values, 101)


def test_timeline_csv_round_trip(tmp_path: Path) -> None:
    records = [
        *migration_timeline(),
        rec(11.0, applied=False, attempt=2, seq=9),
        rec(11.5, kind=RequestKind.STATE, applied=None),
    ]
    writer = TimelineWriter(tmp_path / "t.csv")
    for r in records:
        writer.write(r)
    writer.close()
    assert writer.rows == len(records)
    back = read_timeline(tmp_path / "t.csv")
    assert len(back) == len(records)
    for a, b in zip(records, back, strict=True):
        assert b.latency_s == pytest.approx(a.latency_s, abs=1e-6)
        assert b == dataclasses.replace(a, latency_s=b.latency_s)
    with pytest.raises(ConfigError):
        writer.write(records[0])
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header == ",".join(CSV_FIELDS)


def test_read_timeline_rejects_other_csv(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError):
        read_timeline(path)


# ---- summary -------------------------------------------------------------------------------


def check(
    device: str, *, matches: bool = True, verified: bool = True, lost: int = 0
) -> ContinuityCheck:
    return ContinuityCheck(
        device, "s0", "gw1", 1.0, "outage", verified=verified, matches=matches, lost=lost,
        expected_count=5, service_count=5 - lost, detail="" if matches else "lost",
    )  # fmt: skip


def test_summary_counts_and_matches_migrations() -> None:
    records = [*migration_timeline(), rec(11.0, seq=2, attempt=2, applied=False)]
    records.append(rec(11.5, kind=RequestKind.STATE))
    outages = detect_outages(records, gap_s=2.0)
    migration = MigrationSeen(
        migration_id="m1", service="s0", technique="cold", source="gw1", destination="gw2",
        outcome="completed", started_at=3.5, finished_at=8.0, downtime_s=4.0, total_time_s=4.5,
    )  # fmt: skip
    roams = [Roam("d0", "s0", 0.0, None, "gw1", True), Roam("d0", "s0", 8.5, "gw1", "gw2", True)]
    s = build_summary(
        started_at=0.0,
        finished_at=12.0,
        interval_s=1.0,
        devices=[("d0", "s0", 5700, "gw2")],
        records=records,
        outages=outages,
        checks=[check("d0"), check("d0", verified=False), check("d0", matches=False, lost=2)],
        roams=roams,
        migrations=[migration],
        attach_published=2,
    )
    st = s.stats
    assert (st.requests, st.ok, st.failed, st.timeouts) == (10, 7, 3, 2)
    assert st.errors == {NETWORK_ERROR: 1}
    assert (st.retries, st.duplicates) == (1, 1)
    assert st.latency.count == 7
    assert st.latency.p50_ms == pytest.approx(5.0)
    assert s.max_downtime_s == pytest.approx(6.005)
    assert (s.continuity.passed, s.continuity.failed, s.continuity.unverified) == (1, 1, 1)
    assert s.continuity.lost == 2
    assert not s.healthy
    (m,) = s.migrations
    assert m.observed_downtime_s == {"d0": pytest.approx(6.005)}
    assert m.platform_downtime_s == 4.0
    assert s.per_device[0].roams == 1
    assert s.per_device[0].outages == 1
    text = format_summary(s)
    assert "failed 3" in text
    assert "devices saw d0 6.005 s" in text
    assert "FAILED d0@gw1" in text
    assert type(s).model_validate_json(s.model_dump_json()) == s


def test_event_dicts_are_json() -> None:
    outage = Outage("d0", "s0", 1.0, 3.5, 2, "gw1", "gw2")
    events: list[FleetEvent] = [
        rec(1.0),
        outage,
        check("d0"),
        Roam("d0", "s0", 1, None, "gw1", False),
    ]
    kinds = [json.loads(json.dumps(event_dict(e)))["kind"] for e in events]
    assert kinds == ["request", "outage", "check", "roam"]
    assert event_dict(outage)["downtime_s"] == 2.5


def test_migration_seen_from_a_done_event() -> None:
    done = MigrationDone(
        node="gw1", command_id="c1", migration_id="m1", service="s0",
        outcome=Outcome.COMPLETED,
        record=MigrationRecord(migration_id="m1", service="s0", technique=Technique.PRECOPY,
                               source="gw1", destination="gw2", started_at=10.0, finished_at=12.5,
                               pre_dump_time_s=1.8, dump_time_s=0.7),
    )  # fmt: skip
    seen = migration_seen(done)
    assert (seen.technique, seen.destination, seen.downtime_s) == ("precopy", "gw2", 0.7)
    assert (seen.started_at, seen.finished_at) == (10.0, 12.5)


# ---- the ledger that resumes -------------------------------------------------------------------


def post(service: SensorState, payload: bytes) -> PostResult:
    applied = service.apply(validate_reading(payload), payload)
    return PostResult("2.04", 0.001, service.count, service.hash, applied)


def state_of(service: SensorState) -> ServiceState:
    return ServiceState.model_validate(
        {
            "count": service.count, "hash": service.hash, "state_mb": 1, "dirty_kbps": 0,
            "dirty_kbps_measured": 0, "uptime_s": 1, "started_at": 1, "pid": 1,
            "devices": service.devices_json(),
        }
    )  # fmt: skip


def test_resumed_ledger_continues_the_services_record() -> None:
    service = SensorState()
    first = ResumedLedger("d0")
    for i in range(3):
        assert first.record(post(service, first.next_reading(v=i)))
    baseline = DeviceSummary.model_validate(service.devices_json()["d0"])
    second = ResumedLedger("d0", baseline)
    assert second.next_seq == 4
    for i in range(2):
        assert second.record(post(service, second.next_reading(v=i)))
    # One reading applied but never acknowledged, one sent and lost: both of unknown fate.
    post(service, second.next_reading(v=9))
    second.abandon()
    second.next_reading(v=10)
    second.abandon()
    verdict = second.verify(state_of(service), exclusive=True)
    assert verdict.matches, verdict
    assert verdict.unacknowledged_applied == 1
    assert second.count == 5


def test_resumed_ledger_sees_lost_and_doubled_readings() -> None:
    service = SensorState()
    ledger = ResumedLedger("d0")
    for i in range(2):
        ledger.record(post(service, ledger.next_reading(v=i)))
    snapshot = copy.deepcopy(service)
    ledger.record(post(service, ledger.next_reading(v=2)))
    lost = ledger.verify(state_of(snapshot))
    assert not lost.matches
    assert lost.lost == 1
    doubled = copy.deepcopy(service)
    doubled.apply(validate_reading(b'{"device":"d0","seq":99}'), b'{"device":"d0","seq":99}')
    verdict = ledger.verify(state_of(doubled))
    assert not verdict.matches
    assert verdict.doubled == 1


# ---- the device loop against a scripted service -------------------------------------------------


@dataclass
class ScriptedService:
    """A sensor service in memory behind the CoAP port, with switchable faults."""

    state: SensorState = field(default_factory=SensorState)
    down: bool = False
    drop_answers: int = 0  # apply the reading, lose the answer
    reject_next: str | None = None
    calls: list[tuple[str, str, int, str]] = field(default_factory=list)

    async def request(
        self, method: str, address: str, port: int, path: str, *, payload: bytes = b"",
        timeout: float,
    ) -> Answer:  # fmt: skip
        self.calls.append((method, address, port, path))
        await asyncio.sleep(0.001)
        if self.down:
            return Answer(RequestOutcome.TIMEOUT, "", b"", timeout)
        if method == "GET":
            return Answer(
                RequestOutcome.OK, "2.05", state_of(self.state).model_dump_json().encode(), 0.001
            )
        if self.reject_next is not None:
            code, self.reject_next = self.reject_next, None
            return Answer(RequestOutcome.ERROR, code, b"bad", 0.001, detail="bad")
        result = post(self.state, payload)
        if self.drop_answers:
            self.drop_answers -= 1
            return Answer(RequestOutcome.TIMEOUT, "", b"", timeout)
        body = {"count": result.count, "hash": result.hash, "applied": result.applied}
        return Answer(RequestOutcome.OK, "2.04", json.dumps(body).encode(), 0.001)


FAST = RequestSettings(interval_s=0.02, timeout_s=0.05, check_every_s=None, gap_s=0.2)


def make_device(
    svc: ScriptedService, events: list[FleetEvent], *, settings: RequestSettings = FAST
) -> Device:
    return Device(
        DeviceConfig("d0", "s0", 5700, "gw1"),
        coap=svc,
        addresses={"gw1": "10.79.0.1", "gw2": "10.79.0.2"},
        settings=settings,
        emit=events.append,
    )


async def run_for(device: Device, seconds: float, *, during: Any = None) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(device.run(stop))
    if during is not None:
        await during()
    await asyncio.sleep(seconds)
    stop.set()
    await task


async def test_device_rides_out_an_outage_without_losing_a_reading() -> None:
    svc = ScriptedService()
    events: list[FleetEvent] = []
    device = make_device(svc, events)

    async def outage() -> None:
        await asyncio.sleep(0.15)
        svc.down = True
        await asyncio.sleep(0.3)
        device.move_to("gw2")
        svc.drop_answers = 1  # the first reading after the outage is applied, its answer lost
        svc.down = False

    await run_for(device, 0.3, during=outage)
    outages = [e for e in events if isinstance(e, Outage)]
    assert len(outages) == 1
    assert outages[0].failed >= 3
    assert (outages[0].gateway_before, outages[0].gateway_after) == ("gw1", "gw2")
    assert outages[0].downtime_s >= 0.3
    checks = [e for e in events if isinstance(e, ContinuityCheck)]
    assert [c.reason for c in checks][-1] == "final"
    assert checks[0].reason in {"roam", "outage"}
    assert all(c.verified and c.matches for c in checks), checks
    posts = [r for r in device.records if r.request is RequestKind.POST]
    # Every retry resent the same seq; the service applied each seq exactly once.
    assert svc.state.count == device.ledger.count  # type: ignore[union-attr]
    assert any(r.applied is False for r in posts)
    assert {r.address for r in posts} == {"10.79.0.1", "10.79.0.2"}
    seqs = [r.seq for r in posts if r.ok and r.seq is not None]
    assert seqs == sorted(seqs)
    assert device.exclusive


async def test_device_reports_a_service_that_lost_readings() -> None:
    svc = ScriptedService()
    events: list[FleetEvent] = []
    device = make_device(svc, events)

    async def rollback() -> None:
        await asyncio.sleep(0.1)
        snapshot = copy.deepcopy(svc.state)
        await asyncio.sleep(0.1)
        svc.state = snapshot  # a migration that restored an older state
        device.migration_seen()

    await run_for(device, 0.1, during=rollback)
    checks = [e for e in events if isinstance(e, ContinuityCheck)]
    assert checks[0].reason == "migration"
    assert not checks[0].matches
    assert checks[0].lost > 0


async def test_device_drops_a_reading_the_service_refuses() -> None:
    svc = ScriptedService(reject_next="4.00")
    events: list[FleetEvent] = []
    device = make_device(svc, events)
    await run_for(device, 0.1)
    posts = [r for r in device.records if r.request is RequestKind.POST]
    assert posts[0].code == "4.00"
    assert posts[1].seq == posts[0].seq + 1  # type: ignore[operator]
    final = [e for e in events if isinstance(e, ContinuityCheck)][-1]
    assert final.matches


async def test_device_waits_for_the_service_before_posting() -> None:
    svc = ScriptedService(down=True)
    events: list[FleetEvent] = []
    device = make_device(svc, events)
    await run_for(device, 0.1)
    assert device.ledger is None
    assert {r.request for r in device.records} == {RequestKind.STATE}
    assert not [e for e in events if isinstance(e, ContinuityCheck)]


async def test_periodic_checks() -> None:
    svc = ScriptedService()
    events: list[FleetEvent] = []
    settings = RequestSettings(interval_s=0.02, timeout_s=0.05, check_every_s=0.05)
    device = make_device(svc, events, settings=settings)
    await run_for(device, 0.3)
    reasons = [e.reason for e in events if isinstance(e, ContinuityCheck)]
    assert reasons.count("periodic") >= 2
    assert reasons[-1] == "final"


async def test_a_stopping_fleet_moves_no_more(tmp_path: Path) -> None:
    svc = ScriptedService()
    fleet = DeviceFleet(
        devices=[DeviceConfig("d0", "s0", 5700, "gw1", Schedule((Hop(0.3, "gw2"),)))],
        gateways={"gw1": "10.79.0.1", "gw2": "10.79.0.2"},
        settings=FAST,
        port=svc,
    )
    summary = await fleet.run(0.2)
    assert summary.roams == 0
    assert fleet.devices[0].gateway == "gw1"
    assert {address for _, address, _, _ in svc.calls} == {"10.79.0.1"}
    assert summary.healthy


class RecordingBus:
    """A device's own bus connection: what it published, and a subscription that stays quiet."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    async def publish(self, topic: str, msg: Any, **_: Any) -> None:
        self.published.append((topic, msg))

    @contextlib.asynccontextmanager
    async def subscribe(self, pattern: str) -> AsyncIterator[AsyncIterator[Any]]:
        async def nothing() -> AsyncIterator[Any]:
            await asyncio.Event().wait()
            yield None

        yield nothing()


async def test_each_device_announces_itself_on_its_own_connection() -> None:
    svc = ScriptedService()
    buses = {"d0": RecordingBus(), "d1": RecordingBus()}
    fleet = DeviceFleet(
        devices=[
            DeviceConfig("d0", "s0", 5700, "gw1", Schedule((Hop(0.05, "gw2"),))),
            DeviceConfig("d1", "s1", 5701, "gw2"),
        ],
        gateways={"gw1": "10.79.0.1", "gw2": "10.79.0.2"},
        buses=buses,  # type: ignore[arg-type]
        settings=FAST,
        port=svc,
    )
    summary = await fleet.run(0.3)
    assert summary.attach_published == 3
    d0 = [(t, m.device, m.gateway, m.service) for t, m in buses["d0"].published]
    assert d0 == [
        ("fogmig/v1/devices/d0/attach", "d0", "gw1", "s0"),
        ("fogmig/v1/devices/d0/attach", "d0", "gw2", "s0"),
    ]
    d1 = [(t, m.device, m.gateway, m.service) for t, m in buses["d1"].published]
    assert d1 == [("fogmig/v1/devices/d1/attach", "d1", "gw2", "s1")]


def test_a_fleet_with_buses_needs_one_per_device() -> None:
    with pytest.raises(ConfigError, match="no bus connection for device"):
        DeviceFleet(
            devices=[DeviceConfig("d0", "s0", 5700, "gw1"), DeviceConfig("d1", "s1", 5701, "gw1")],
            gateways={"gw1": "10.79.0.1"},
            buses={"d0": RecordingBus()},  # type: ignore[dict-item]
        )


def test_configs_validate() -> None:
    with pytest.raises(ConfigError):
        DeviceConfig("D0", "s0", 5700, "gw1")
    with pytest.raises(ConfigError):
        DeviceConfig("d0", "s0", 0, "gw1")
    with pytest.raises(ConfigError):
        RequestSettings(interval_s=0)
    with pytest.raises(ConfigError):
        make_device(ScriptedService(), []).move_to("gw9")
    with pytest.raises(ConfigError, match="two ports"):
        DeviceFleet(
            devices=[DeviceConfig("a", "s0", 5700, "gw1"), DeviceConfig("b", "s0", 5701, "gw1")],
            gateways={"gw1": "10.79.0.1"},
        )


# ---- the fleet against the real sensor site on loopback ------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def sensor_port() -> AsyncIterator[int]:
    import aiocoap

    port = _free_udp_port()
    svc = sensor.Service(0, 0.0, sensor.DirtyWriter(bytearray(), 0.0), started_at=1.0e9)
    ctx = await aiocoap.Context.create_server_context(sensor.build_site(svc), bind=("::1", port))
    try:
        yield port
    finally:
        await ctx.shutdown()


async def test_fleet_on_loopback(sensor_port: int, tmp_path: Path) -> None:
    seen: list[FleetEvent] = []
    devices = [
        DeviceConfig("d0", "s0", sensor_port, "gw1", Schedule((Hop(0.5, "gw2"),))),
        DeviceConfig("d1", "s0", sensor_port, "gw2"),
    ]
    fleet = DeviceFleet(
        devices=devices,
        gateways={"gw1": "::1", "gw2": "::1"},
        out=tmp_path,
        settings=RequestSettings(interval_s=0.1, timeout_s=1.0, check_every_s=0.4),
        on_event=seen.append,
    )
    summary = await fleet.run(1.2)
    assert summary.stats.requests >= 16
    assert summary.stats.ok == summary.stats.requests
    assert summary.continuity.failed == 0
    assert summary.continuity.passed >= 2
    assert summary.healthy
    assert summary.roams == 1  # one move; the first attachments are not moves
    assert {d.gateway for d in summary.per_device} == {"gw2"}
    assert all(not d.continuity.failures for d in summary.per_device)
    # Two devices share s0: neither may claim the global counter as its own.
    assert not any(d.exclusive for d in fleet.devices)
    rows = read_timeline(tmp_path / "timeline.csv")
    assert len(rows) == sum(len(d.records) for d in fleet.devices)
    assert json.loads((tmp_path / "summary.json").read_text())["stats"]["ok"] == summary.stats.ok
    kinds = {
        json.loads(line)["kind"] for line in (tmp_path / "events.jsonl").read_text().splitlines()
    }
    assert kinds == {"roam", "check"}
    assert sum(isinstance(e, RequestRecord) for e in seen) == len(rows)
    with pytest.raises(ConfigError):
        await fleet.run(1.0)


def test_fleet_under_uvloop_keeps_refusals_where_they_belong() -> None:
    # The CLI and the demo run on uvloop. Each device's service answers on one gateway only;
    # on the other, its requests draw ICMP "port unreachable". None of that may fail a
    # request at home, and each device must see its service again when it returns.
    import aiocoap
    import uvloop

    async def scenario() -> list[Device]:
        ports = [_free_udp_port(), _free_udp_port()]
        servers = []
        for host, port in zip(("::1", "127.0.0.1"), ports, strict=True):
            svc = sensor.Service(0, 0.0, sensor.DirtyWriter(bytearray(), 0.0), started_at=1.0e9)
            site = sensor.build_site(svc)
            servers.append(await aiocoap.Context.create_server_context(site, bind=(host, port)))
        walk = Cycle(("gw1", "gw2"), 0.5)
        fleet = DeviceFleet(
            devices=[
                DeviceConfig("d0", "s0", ports[0], "gw1", walk),
                DeviceConfig("d1", "s1", ports[1], "gw2", walk),
            ],
            gateways={"gw1": "::1", "gw2": "127.0.0.1"},
            settings=RequestSettings(interval_s=0.05, timeout_s=0.5, check_every_s=None),
        )
        try:
            await fleet.run(2.2)
        finally:
            for server in servers:
                await server.shutdown()
        return fleet.devices

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        devices = runner.run(scenario())
    for device, home in zip(devices, ("gw1", "gw2"), strict=True):
        at_home = [r for r in device.records if r.gateway == home]
        away = [r for r in device.records if r.gateway != home]
        assert len(at_home) > 10
        assert all(r.ok for r in at_home), [r for r in at_home if not r.ok]
        assert any(r.code == NETWORK_ERROR for r in away)
        assert len(device.outages) >= 2
        assert all(c.matches for c in device.checks)


async def test_fleet_times_out_on_a_silent_port(tmp_path: Path) -> None:
    port = _free_udp_port()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as silent:
        silent.bind(("::1", port))  # takes the datagrams, never answers
        fleet = DeviceFleet(
            devices=[DeviceConfig("d0", "s0", port, "gw1")],
            gateways={"gw1": "::1"},
            settings=RequestSettings(interval_s=0.1, timeout_s=0.3, ack_timeout_s=0.05),
        )
        summary = await fleet.run(0.8)
    timeouts = [r for r in fleet.devices[0].records if r.outcome is RequestOutcome.TIMEOUT]
    assert len(timeouts) >= 2
    # CoAP itself gives up: one retransmission fits, so after 0.05 * (1 + 2) * 1..1.5 s.
    assert all(0.15 - 0.01 <= r.latency_s <= 0.225 + 0.05 for r in timeouts), timeouts
    assert summary.stats.requests == 0  # no baseline, so no reading was ever posted
    assert not summary.healthy


async def test_fleet_recovers_within_a_beat_of_the_service_returning() -> None:
    # The service stops answering (its port swallows the datagrams), then comes back with its
    # state. The device must see it back within about one beat, not after a CoAP
    # retransmission backed off behind the requests it already gave up on.
    import aiocoap

    port = _free_udp_port()
    svc = sensor.Service(0, 0.0, sensor.DirtyWriter(bytearray(), 0.0), started_at=1.0e9)
    site = sensor.build_site(svc)
    ctx = await aiocoap.Context.create_server_context(site, bind=("::1", port))
    fleet = DeviceFleet(
        devices=[DeviceConfig("d0", "s0", port, "gw1")],
        gateways={"gw1": "::1"},
        settings=RequestSettings(interval_s=0.1, timeout_s=0.3, ack_timeout_s=0.05),
    )
    running = asyncio.create_task(fleet.run(2.0))
    await asyncio.sleep(0.5)
    await ctx.shutdown()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as silent:
        silent.bind(("::1", port))
        await asyncio.sleep(0.8)
    ctx = await aiocoap.Context.create_server_context(site, bind=("::1", port))
    back_at = time.time()
    try:
        summary = await running
    finally:
        await ctx.shutdown()
    (outage,) = summary.outages
    assert outage.failed >= 2
    assert outage.first_ok_at - back_at < 0.25, outage
    assert summary.continuity.failed == 0
    assert summary.continuity.passed >= 2


def test_coap_uri() -> None:
    assert coap_uri("10.79.0.1", 5700, "/sensor") == "coap://[::ffff:a4f:1]:5700/sensor"
    assert coap_uri("::1", 5683, "state") == "coap://[::1]:5683/state"


@pytest.mark.parametrize(
    ("ack", "timeout", "plan"),
    [
        (0.4, 2.0, (0.4, 1)),  # 0.4 * 1.5 * (1 + 2) = 1.8 fits, one more would need 4.2
        (0.5, 2.0, (0.5, 0)),  # 2.25 would not fit
        (0.5, 2.25, (0.5, 1)),
        (0.1, 5.0, (0.1, 4)),  # RFC 7252's MAX_RETRANSMIT when it fits: 4.65 s
        (2.0, 1.0, (1.0 / 1.5, 0)),  # not even one transmission fits: shorter first timeout
    ],
)
def test_retransmissions_end_within_the_timeout(
    ack: float, timeout: float, plan: tuple[float, int]
) -> None:
    got = retransmission_plan(ack, timeout)
    assert got == pytest.approx(plan)
    tuning = transport_tuning(ack, timeout)
    ack_timeout, retransmits, wait = (
        tuning.ACK_TIMEOUT,
        tuning.MAX_RETRANSMIT,
        tuning.MAX_TRANSMIT_WAIT,
    )
    assert (ack_timeout, retransmits) == pytest.approx(plan)
    assert wait <= timeout + 1e-9
    with pytest.raises(ConfigError):
        retransmission_plan(0, 1)


# ---- command line ----------------------------------------------------------------------------


def test_device_services() -> None:
    assert sim_run.device_services(3, prefix="s", port_base=5700) == [
        ("s0", 5700), ("s1", 5701), ("s2", 5702),
    ]  # fmt: skip
    assert sim_run.device_services(2, explicit=["cam:6000"], prefix="s", port_base=5700) == [
        ("cam", 6000), ("s1", 5701),
    ]  # fmt: skip
    with pytest.raises(ConfigError):
        sim_run.device_services(1, explicit=["a:1", "b:2"], prefix="s", port_base=5700)
    with pytest.raises(ConfigError):
        sim_run.parse_service("s0")


def test_roaming_plans_from_options() -> None:
    gws = ["gw1", "gw2"]
    assert sim_run.roaming_plan("none", gateways=gws, dwell_s=5, schedule=None, seed=0) == Static()
    assert sim_run.roaming_plan("schedule", gateways=gws, dwell_s=5, schedule=None, seed=0) == (
        Cycle(("gw1", "gw2"), 5)
    )
    plan = sim_run.roaming_plan("schedule", gateways=gws, dwell_s=5, schedule="3:gw2", seed=0)
    assert plan == Schedule((Hop(3, "gw2"),))
    assert sim_run.roaming_plan("random", gateways=gws, dwell_s=5, schedule=None, seed=4) == (
        RandomWalk(("gw1", "gw2"), 5, 4)
    )


def test_reexec_keeps_every_option(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    device_sim_cli.register(sub)
    argv = ["device-sim", "--devices", "3", "--duration", "7.5", "--roam", "random",
            "--dwell", "4", "--service", "a:6000", "--gateway", "gw2", "--json",
            "--out", str(tmp_path / "o"), "--check-every", "0", "--no-bus"]  # fmt: skip
    args = parser.parse_args(argv)
    args.verbose = 1
    full = device_sim_cli.reexec_argv("fm-dev", args)
    assert full[:3] == ["nsenter", "--net=/var/run/netns/fm-dev", "--"]
    assert full[4:8] == ["-P", "-m", "fogmig.platform.cli.main", "-v"]
    again = vars(parser.parse_args(full[full.index("device-sim") :]))
    original = vars(args)
    original.pop("verbose")
    assert again == original
