"""What a ``fogmig demo`` run produced, as plain values: decisions, migrations, requests, checks.

Pure functions over the controller's events, the nodes' migration records, the devices'
requests and continuity checks and the probes' timelines; the demo, its report and its tests
all read the same :class:`DemoSummary`, whose ``problems`` decide the exit code.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fogmig.device_sim.events import ContinuityCheck, RequestKind, RequestOutcome, RequestRecord
from fogmig.device_sim.observed import ProbeTimeline
from fogmig.device_sim.timeline import observed_downtime, percentile
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.schemas import MigrationDone


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecisionRow(_Model):
    """One migration the controller decided on, and what became of its command."""

    at: float
    command_id: str
    service: str
    source: str
    destination: str
    technique: str
    trigger: str
    reason: str
    predicted_downtime_s: float | None
    predicted_total_time_s: float | None
    predicted_bytes: float | None
    fate: str
    """``completed``, ``rolled_back``, ``failed_after_commit``, ``rejected``, ``send_failed``,
    ``lost`` or ``unfinished``."""


class ProbeSeen(_Model):
    """What the service's probe device saw from a migration's start to its finish."""

    downtime_s: float | None
    """Longest gap between the probe's answers overlapping the migration, minus one probe
    interval; None when the probe did not see the service up on both sides."""
    rate_hz: float
    sent: int
    answered: int
    lost: int


class MigrationRow(_Model):
    """One migration a node ran, predicted against measured against what the devices saw."""

    migration_id: str
    command_id: str
    service: str
    source: str
    destination: str
    technique: Technique
    trigger: str
    reason: str
    outcome: Outcome
    error: str | None
    started_at: float
    finished_at: float
    predicted_downtime_s: float | None
    predicted_total_time_s: float | None
    predicted_bytes: float | None
    downtime_s: float | None
    """The paper's downtime, measured by the node: dump + dump transfer + resume."""
    total_time_s: float | None
    transferred_bytes: float | None
    observed_downtime_s: dict[str, float | None]
    """Per device of the service: longest gap between good answers around the migration."""
    probe: ProbeSeen | None = None
    """What the service's probe saw (None: no probe ran for it)."""


class RequestTotals(_Model):
    """Readings the devices posted (GET /state checks are not counted)."""

    sent: int
    ok: int
    failed: int
    timeouts: int
    retries: int
    lost_readings: int
    """Readings a continuity check found missing at the service (the worst check)."""
    doubled_readings: int
    p50_ms: float | None
    p99_ms: float | None


class ContinuityTotals(_Model):
    passed: int
    failed: int
    unverified: int
    final: dict[str, bool]
    """Per device: whether its last check (at the end of the run) verified and matched."""
    failures: list[str]


class DemoSummary(_Model):
    """Everything the demo reports; ``ok`` is the exit code's verdict."""

    started_at: float
    finished_at: float
    duration_s: float
    profile: str
    nodes: list[str]
    devices: dict[str, str]
    """Device -> its service."""
    options: dict[str, Any]
    decisions: list[DecisionRow]
    migrations: list[MigrationRow]
    requests: RequestTotals
    continuity: ContinuityTotals
    settled: bool
    """At the end every service ran on its device's gateway and nothing was queued."""
    interrupted: bool
    controller: dict[str, int]
    problems: list[str]
    ok: bool


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any, default: str = "?") -> str:
    return value if isinstance(value, str) else default


def decision_rows(events: Iterable[Mapping[str, Any]]) -> list[DecisionRow]:
    """The controller's decisions (from its event dicts) with the fate of each command."""
    events = list(events)
    fate: dict[str, str] = {}
    for e in events:
        cid, kind = e.get("command_id"), e.get("event")
        if not isinstance(cid, str):
            continue
        if kind == "accepted":
            fate.setdefault(cid, "unfinished")
        elif kind in ("rejected", "send_failed") and fate.get(cid) != "unfinished":
            fate[cid] = str(kind)
        elif kind == "done" and not e.get("foreign"):
            fate[cid] = _str(e.get("outcome"))
        elif kind == "lost":
            fate[cid] = "lost"
    rows = []
    for e in events:
        if e.get("event") != "decision":
            continue
        d = e.get("decision")
        cid = e.get("command_id")
        if not isinstance(d, Mapping) or not isinstance(cid, str):
            continue
        predicted = d.get("predicted")
        p = predicted if isinstance(predicted, Mapping) else {}
        rows.append(
            DecisionRow(
                at=_num(d.get("at")) or _num(e.get("at")) or 0.0,
                command_id=cid,
                service=_str(d.get("service")),
                source=_str(d.get("source")),
                destination=_str(d.get("destination")),
                technique=_str(d.get("technique")),
                trigger=_str(d.get("trigger")),
                reason=_str(d.get("reason"), ""),
                predicted_downtime_s=_num(p.get("downtime_s")),
                predicted_total_time_s=_num(p.get("total_time_s")),
                predicted_bytes=_num(p.get("transferred_bytes")),
                fate=fate.get(cid, "unanswered"),
            )
        )
    return rows


def migration_rows(
    done: Iterable[MigrationDone],
    decisions: Sequence[DecisionRow],
    records: Sequence[RequestRecord],
    devices: Mapping[str, str],
    probes: Mapping[str, ProbeTimeline] | None = None,
) -> list[MigrationRow]:
    """One row per finished migration of the demo's services, in the order they started.

    ``devices`` maps each device to its service; the device-observed downtime of a migration
    comes from the requests of the devices that use the migrated service, the probe's from
    ``probes`` (service -> its probe's timeline).
    """
    probes = probes or {}
    by_command = {d.command_id: d for d in decisions}
    by_device: dict[str, list[RequestRecord]] = {name: [] for name in devices}
    for r in records:
        by_device.setdefault(r.device, []).append(r)
    services = set(devices.values())
    rows = []
    for msg in done:
        if msg.service not in services:
            continue
        rec = msg.record
        decision = by_command.get(msg.command_id)
        started = rec.started_at
        finished = rec.finished_at or started
        observed = {
            device: observed_downtime(by_device.get(device, []), start=started, end=finished)
            for device, service in sorted(devices.items())
            if service == msg.service
        }
        rows.append(
            MigrationRow(
                migration_id=msg.migration_id,
                command_id=msg.command_id,
                service=msg.service,
                source=rec.source,
                destination=rec.destination,
                technique=rec.technique,
                trigger=decision.trigger if decision else "manual",
                reason=decision.reason if decision else "",
                outcome=msg.outcome,
                error=msg.error,
                started_at=started,
                finished_at=finished,
                predicted_downtime_s=decision.predicted_downtime_s if decision else None,
                predicted_total_time_s=decision.predicted_total_time_s if decision else None,
                predicted_bytes=decision.predicted_bytes if decision else None,
                downtime_s=rec.downtime_s,
                total_time_s=rec.total_time_s,
                transferred_bytes=rec.transferred_bytes,
                observed_downtime_s=observed,
                probe=probe_seen(probes.get(msg.service), started, finished),
            )
        )
    rows.sort(key=lambda m: m.started_at)
    return rows


def probe_seen(timeline: ProbeTimeline | None, start: float, end: float) -> ProbeSeen | None:
    """The probe's view of the window ``[start, end]`` (UNIX times)."""
    if timeline is None or end < start:
        return None
    seen = timeline.window_wall(start, end)
    return ProbeSeen(
        downtime_s=None if seen.downtime_s is None else round(seen.downtime_s, 6),
        rate_hz=round(1.0 / timeline.interval_s, 6),
        sent=seen.sent,
        answered=seen.answered,
        lost=seen.lost,
    )


def request_totals(
    records: Iterable[RequestRecord], checks: Iterable[ContinuityCheck]
) -> RequestTotals:
    posts = [r for r in records if r.request is RequestKind.POST]
    ok = [r for r in posts if r.ok]
    verified = [c for c in checks if c.verified]
    latencies = [r.latency_s * 1000 for r in ok]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return RequestTotals(
        sent=len(posts),
        ok=len(ok),
        failed=len(posts) - len(ok),
        timeouts=sum(1 for r in posts if r.outcome is RequestOutcome.TIMEOUT),
        retries=sum(1 for r in posts if r.attempt > 1),
        lost_readings=max((c.lost for c in verified), default=0),
        doubled_readings=max((c.doubled for c in verified), default=0),
        p50_ms=None if p50 is None else round(p50, 3),
        p99_ms=None if p99 is None else round(p99, 3),
    )


def continuity_totals(
    checks: Iterable[ContinuityCheck], devices: Iterable[str]
) -> ContinuityTotals:
    checks = sorted(checks, key=lambda c: c.at)
    last: dict[str, ContinuityCheck] = {}
    for c in checks:
        last[c.device] = c
    done = [c for c in checks if c.verified]
    bad = [c for c in done if not c.matches]
    return ContinuityTotals(
        passed=len(done) - len(bad),
        failed=len(bad),
        unverified=len(checks) - len(done),
        final={
            d: d in last and last[d].verified and last[d].matches and last[d].reason == "final"
            for d in devices
        },
        failures=[
            f"{c.device}@{c.gateway} ({c.reason}): {c.detail or 'mismatch'}; expected "
            f"{c.expected_count}, service {c.service_count}, lost {c.lost}, doubled {c.doubled}"
            for c in bad
        ],
    )


def problems(
    *,
    decisions: Sequence[DecisionRow],
    migrations: Sequence[MigrationRow],
    continuity: ContinuityTotals,
    controller_events: Iterable[Mapping[str, Any]],
    interrupted: bool,
) -> list[str]:
    """Why the run is not a success (empty: it is). The rule: every migration completed, at
    least one did, and every continuity check passed, including each device's final one."""
    out: list[str] = []
    if interrupted:
        out.append("the run was interrupted")
    for m in migrations:
        if m.outcome is not Outcome.COMPLETED:
            out.append(
                f"migration {m.migration_id} of {m.service} {m.source} -> {m.destination} "
                f"({m.technique}) ended {m.outcome}" + (f": {m.error}" if m.error else "")
            )
    finished = {m.command_id for m in migrations}
    for d in decisions:
        if d.fate == "unfinished" and d.command_id not in finished:
            out.append(
                f"migration of {d.service} {d.source} -> {d.destination} ({d.technique}) "
                "did not finish before the end"
            )
        elif d.fate == "lost":
            out.append(f"migration of {d.service} {d.source} -> {d.destination} was lost")
    for e in controller_events:
        if e.get("event") == "gave_up":
            out.append(f"controller gave up: {e.get('message')}")
    if not any(m.outcome is Outcome.COMPLETED for m in migrations):
        out.append("no migration completed")
    out += [f"continuity check failed: {f}" for f in continuity.failures]
    for device, good in sorted(continuity.final.items()):
        if not good:
            out.append(f"{device}: no verified final continuity check")
    return out


# --- raw files --------------------------------------------------------------------------------

MIGRATION_CSV_FIELDS = (
    "migration_id",
    "service",
    "source",
    "destination",
    "technique",
    "trigger",
    "outcome",
    "started_at",
    "finished_at",
    "predicted_downtime_s",
    "downtime_s",
    "observed_downtime_s",
    "probe_downtime_s",
    "probe_sent",
    "probe_lost",
    "predicted_total_time_s",
    "total_time_s",
    "predicted_bytes",
    "transferred_bytes",
    "error",
)


def write_migrations_csv(path: Path, rows: Sequence[MigrationRow]) -> None:
    """One row per migration; the observed downtime is the worst over the service's devices,
    the probe's columns are empty where no probe ran."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MIGRATION_CSV_FIELDS)
        writer.writeheader()
        for m in rows:
            seen = [v for v in m.observed_downtime_s.values() if v is not None]
            row = m.model_dump(include=set(MIGRATION_CSV_FIELDS) - {"observed_downtime_s"})
            row["observed_downtime_s"] = max(seen) if seen else None
            row["probe_downtime_s"] = m.probe.downtime_s if m.probe else None
            row["probe_sent"] = m.probe.sent if m.probe else None
            row["probe_lost"] = m.probe.lost if m.probe else None
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
