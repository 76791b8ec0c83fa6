"""The figures of a device-sim run: per device and for the fleet, as JSON and as text.

Built from the recorded events alone (pure), so the same summary comes out of a live fleet
and of a timeline read back from disk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from fogmig.device_sim.events import (
    ContinuityCheck,
    MigrationSeen,
    Outage,
    RequestKind,
    RequestOutcome,
    RequestRecord,
    Roam,
)
from fogmig.device_sim.timeline import observed_downtime, percentile
from fogmig.platform.base import fmt


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStats(_Model):
    """Round-trip times of the acknowledged readings, in milliseconds."""

    count: int
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None


class RequestStats(_Model):
    requests: int
    ok: int
    failed: int
    timeouts: int
    errors: dict[str, int]
    """Failed requests by CoAP code (or ``network``)."""
    retries: int
    """Sends of a reading after its first (the same seq again)."""
    duplicates: int
    """Acknowledged sends the service did not apply: it had the reading already."""
    latency: LatencyStats


class OutageOut(_Model):
    device: str
    service: str
    last_ok_at: float
    first_ok_at: float
    downtime_s: float
    failed: int
    gateway_before: str
    gateway_after: str


class ContinuityStats(_Model):
    passed: int
    failed: int
    unverified: int
    lost: int
    """Most readings found lost in any one check (the worst moment)."""
    doubled: int
    failures: list[str]


class MigrationOut(_Model):
    migration_id: str
    service: str
    technique: str
    source: str
    destination: str
    outcome: str
    total_time_s: float
    platform_downtime_s: float
    """The paper's downtime from the migration record."""
    observed_downtime_s: dict[str, float | None]
    """Per device of the service: last good answer before to first good answer after."""


class DeviceOut(_Model):
    device: str
    service: str
    port: int
    gateway: str
    roams: int
    stats: RequestStats
    outages: int
    max_downtime_s: float | None
    continuity: ContinuityStats


class FleetSummary(_Model):
    started_at: float
    finished_at: float
    duration_s: float
    interval_s: float
    devices: int
    stats: RequestStats
    outages: list[OutageOut]
    max_downtime_s: float | None
    migrations: list[MigrationOut]
    continuity: ContinuityStats
    roams: int
    """Moves from one gateway to another (the first attachment is not one)."""
    attach_published: int
    attach_failed: int
    per_device: list[DeviceOut]

    @property
    def healthy(self) -> bool:
        """Every continuity check that ran passed and at least one ran."""
        return self.continuity.failed == 0 and self.continuity.passed > 0


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def request_stats(records: Iterable[RequestRecord]) -> RequestStats:
    posts = [r for r in records if r.request is RequestKind.POST]
    ok = [r for r in posts if r.ok]
    latencies = [r.latency_s * 1000 for r in ok]
    errors = Counter(r.code for r in posts if r.outcome is RequestOutcome.ERROR)
    return RequestStats(
        requests=len(posts),
        ok=len(ok),
        failed=len(posts) - len(ok),
        timeouts=sum(1 for r in posts if r.outcome is RequestOutcome.TIMEOUT),
        errors=dict(sorted(errors.items())),
        retries=sum(1 for r in posts if r.attempt > 1),
        duplicates=sum(1 for r in ok if r.applied is False),
        latency=LatencyStats(
            count=len(latencies),
            p50_ms=_round(percentile(latencies, 50)),
            p99_ms=_round(percentile(latencies, 99)),
            mean_ms=_round(sum(latencies) / len(latencies)) if latencies else None,
            max_ms=_round(max(latencies, default=None)),
        ),
    )


def continuity_stats(checks: Iterable[ContinuityCheck]) -> ContinuityStats:
    checks = list(checks)
    done = [c for c in checks if c.verified]
    bad = [c for c in done if not c.matches]
    return ContinuityStats(
        passed=len(done) - len(bad),
        failed=len(bad),
        unverified=len(checks) - len(done),
        lost=max((c.lost for c in done), default=0),
        doubled=max((c.doubled for c in done), default=0),
        failures=[
            f"{c.device}@{c.gateway} ({c.reason}): {c.detail or 'mismatch'}; "
            f"expected {c.expected_count}, service {c.service_count}"
            for c in bad
        ],
    )


def _outage_out(o: Outage) -> OutageOut:
    return OutageOut(
        device=o.device,
        service=o.service,
        last_ok_at=o.last_ok_at,
        first_ok_at=o.first_ok_at,
        downtime_s=round(o.downtime_s, 6),
        failed=o.failed,
        gateway_before=o.gateway_before,
        gateway_after=o.gateway_after,
    )


def migration_out(
    m: MigrationSeen, records_by_device: dict[str, list[RequestRecord]], service_of: dict[str, str]
) -> MigrationOut:
    observed = {
        device: _round(
            observed_downtime(records_by_device[device], start=m.started_at, end=m.finished_at),
            6,
        )
        for device, service in sorted(service_of.items())
        if service == m.service
    }
    return MigrationOut(
        migration_id=m.migration_id,
        service=m.service,
        technique=m.technique,
        source=m.source,
        destination=m.destination,
        outcome=m.outcome,
        total_time_s=m.total_time_s,
        platform_downtime_s=m.downtime_s,
        observed_downtime_s=observed,
    )


def build_summary(
    *,
    started_at: float,
    finished_at: float,
    interval_s: float,
    devices: Sequence[tuple[str, str, int, str]],
    records: Iterable[RequestRecord],
    outages: Iterable[Outage],
    checks: Iterable[ContinuityCheck],
    roams: Iterable[Roam],
    migrations: Iterable[MigrationSeen],
    attach_published: int = 0,
    attach_failed: int = 0,
) -> FleetSummary:
    """``devices`` holds (name, service, port, current gateway) of each device."""
    records, outages, checks, roams = list(records), list(outages), list(checks), list(roams)
    by_device: dict[str, list[RequestRecord]] = {name: [] for name, *_ in devices}
    for r in records:
        by_device.setdefault(r.device, []).append(r)
    per_device = []
    for name, service, port, gateway in devices:
        own_outages = [o for o in outages if o.device == name]
        per_device.append(
            DeviceOut(
                device=name,
                service=service,
                port=port,
                gateway=gateway,
                roams=sum(1 for r in roams if r.device == name and r.from_gateway is not None),
                stats=request_stats(by_device[name]),
                outages=len(own_outages),
                max_downtime_s=_round(max((o.downtime_s for o in own_outages), default=None), 6),
                continuity=continuity_stats(c for c in checks if c.device == name),
            )
        )
    service_of = {name: service for name, service, *_ in devices}
    return FleetSummary(
        started_at=started_at,
        finished_at=finished_at,
        duration_s=round(finished_at - started_at, 3),
        interval_s=interval_s,
        devices=len(devices),
        stats=request_stats(records),
        outages=[_outage_out(o) for o in outages],
        max_downtime_s=_round(max((o.downtime_s for o in outages), default=None), 6),
        migrations=[migration_out(m, by_device, service_of) for m in migrations],
        continuity=continuity_stats(checks),
        roams=sum(1 for r in roams if r.from_gateway is not None),
        attach_published=attach_published,
        attach_failed=attach_failed,
        per_device=per_device,
    )


def format_summary(s: FleetSummary) -> str:
    """A few readable lines for the terminal."""
    st, c = s.stats, s.continuity
    errors = ", ".join(f"{code} x{n}" for code, n in st.errors.items()) or "none"
    lines = [
        f"{s.devices} device(s), {s.duration_s:.1f} s, one reading per {s.interval_s:g} s",
        f"requests {st.requests}: ok {st.ok}, failed {st.failed} "
        f"(timeouts {st.timeouts}, errors {errors}), retries {st.retries}, "
        f"duplicates {st.duplicates}",
        f"latency p50 {fmt.millis(st.latency.p50_ms)}, p99 {fmt.millis(st.latency.p99_ms)}, "
        f"max {fmt.millis(st.latency.max_ms)}",
        f"outages {len(s.outages)}, longest {fmt.seconds(s.max_downtime_s)}; roams {s.roams} "
        f"(attach published {s.attach_published}, failed {s.attach_failed})",
        f"continuity checks: passed {c.passed}, failed {c.failed}, unverified {c.unverified}"
        f" (lost {c.lost}, doubled {c.doubled})",
    ]
    for m in s.migrations:
        seen = ", ".join(f"{d} {fmt.seconds(v)}" for d, v in m.observed_downtime_s.items()) or "-"
        lines.append(
            f"migration {m.service} {m.source}->{m.destination} {m.technique} ({m.outcome}): "
            f"platform downtime {fmt.seconds(m.platform_downtime_s)}, devices saw {seen}"
        )
    lines += [f"FAILED {f}" for f in c.failures]
    return "\n".join(lines)
