"""The demo's HTML report and the results it is built from, on synthetic runs: the timeline and
downtime plots, the tables, plotly.js inline (nothing from a CDN), escaping, the verdict (every
migration completed, every continuity check held) and the summary printed on the terminal."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fogmig.device_sim.events import (
    ContinuityCheck,
    RequestKind,
    RequestOutcome,
    RequestRecord,
    Roam,
)
from fogmig.device_sim.observed import ProbeRecord, ProbeTimeline
from fogmig.platform.apps.demo.report import (
    DOWNTIME_DIV,
    TIMELINE_DIV,
    ReportInput,
    render_report,
    write_report,
)
from fogmig.platform.apps.demo.results import (
    DemoSummary,
    continuity_totals,
    decision_rows,
    migration_rows,
    problems,
    request_totals,
    write_migrations_csv,
)
from fogmig.platform.apps.demo.view import summary_renderable
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.schemas import MigrationDone
from fogmig.platform.migration.record import MigrationRecord

T0 = 1_700_000_000.0
DEVICES = {"d0": "s0", "d1": "s1"}


def request(
    device: str,
    at: float,
    latency: float = 0.004,
    outcome: RequestOutcome = RequestOutcome.OK,
    seq: int = 0,
) -> RequestRecord:
    return RequestRecord(
        device=device,
        request=RequestKind.POST,
        seq=seq,
        attempt=1,
        service=DEVICES[device],
        gateway="gw1",
        address="10.79.0.1",
        port=5700,
        sent_at=T0 + at,
        latency_s=latency if outcome is RequestOutcome.OK else 2.0,
        outcome=outcome,
        code="2.04" if outcome is RequestOutcome.OK else "",
    )


def timeline(gap: tuple[float, float] = (10.0, 12.5)) -> list[RequestRecord]:
    """d0 posts every second and loses the answers inside ``gap``; d1 never misses one."""
    out = []
    for i in range(30):
        t = float(i)
        lost = gap[0] <= t < gap[1]
        out.append(
            request("d0", t, outcome=RequestOutcome.TIMEOUT if lost else RequestOutcome.OK, seq=i)
        )
        out.append(request("d1", t + 0.5, seq=i))
    return out


def decision_event(cid: str, service: str = "s0", technique: str = "precopy") -> dict[str, Any]:
    return {
        "at": T0 + 9,
        "event": "decision",
        "service": service,
        "node": "gw1",
        "message": "mobility",
        "command_id": cid,
        "decision": {
            "service": service,
            "source": "gw1",
            "destination": "gw2",
            "technique": technique,
            "reason": "device d0 moved to gw2; least downtime <script>alert(1)</script>",
            "predicted": {"downtime_s": 0.35, "total_time_s": 1.5, "transferred_bytes": 8.4e6},
            "trigger": "mobility",
            "at": T0 + 9,
        },
    }


def done(cid: str, outcome: Outcome = Outcome.COMPLETED) -> MigrationDone:
    return MigrationDone(
        node="gw1",
        command_id=cid,
        migration_id=f"m-{cid}",
        service="s0",
        outcome=outcome,
        record=MigrationRecord(
            migration_id=f"m-{cid}",
            service="s0",
            source="gw1",
            destination="gw2",
            technique=Technique.PRECOPY,
            outcome=outcome,
            started_at=T0 + 10.2,
            finished_at=T0 + 11.9,
            pre_dump_time_s=1.7 - 0.42,  # total 1.7 s
            dump_time_s=0.42,  # downtime 0.42 s
            pre_dump_bytes=8_000_000,
            dump_bytes=800_000,  # 8.8 MB in all
        ),
        error=None if outcome is Outcome.COMPLETED else "dump failed",
    )


def check(
    device: str, at: float, *, matches: bool = True, reason: str = "final"
) -> ContinuityCheck:
    return ContinuityCheck(
        device, DEVICES[device], "gw2", T0 + at, reason, verified=True, matches=matches,
        expected_count=30, service_count=30 if matches else 29, lost=0 if matches else 1,
    )  # fmt: skip


def probe_run(down: tuple[float, float] = (10.5, 11.5)) -> ProbeTimeline:
    """s0's probe at 20 Hz for 30 s (monotonic 0 is T0 on the wall clock), sending at
    0.01 s past each beat; requests sent while the service is ``down`` get no answer."""
    records = []
    for i in range(600):
        t = i * 0.05 + 0.01
        dead = down[0] <= t < down[1]
        records.append(
            ProbeRecord(
                seq=i + 1,
                address="10.79.0.1",
                sent_at=t,
                answered_at=None if dead else t + 0.002,
                outcome=RequestOutcome.TIMEOUT if dead else RequestOutcome.OK,
                code="" if dead else "2.05",
            )
        )
    return ProbeTimeline(
        address="10.79.0.1",
        port=5700,
        path="ping",
        interval_s=0.05,
        timeout_s=1.0,
        started_at=0.01,
        stopped_at=30.0,
        wall_offset_s=T0,
        records=tuple(records),
    )


def summary_of(
    events: list[dict[str, Any]],
    dones: list[MigrationDone],
    checks: list[ContinuityCheck],
    records: list[RequestRecord],
    probes: dict[str, ProbeTimeline] | None = None,
) -> DemoSummary:
    decisions = decision_rows(events)
    migrations = migration_rows(dones, decisions, records, DEVICES, probes=probes)
    continuity = continuity_totals(checks, DEVICES)
    found = problems(
        decisions=decisions,
        migrations=migrations,
        continuity=continuity,
        controller_events=events,
        interrupted=False,
    )
    return DemoSummary(
        started_at=T0,
        finished_at=T0 + 30,
        duration_s=30,
        profile="orchestration (72.41 Mbit/s, 6.94 ms RTT)",
        nodes=["gw1", "gw2"],
        devices=DEVICES,
        options={"probe_hz": 20.0} if probes else {},
        decisions=decisions,
        migrations=migrations,
        requests=request_totals(records, checks),
        continuity=continuity,
        settled=True,
        interrupted=False,
        controller={},
        problems=found,
        ok=not found,
    )


def good_run(*, probed: bool = False) -> tuple[DemoSummary, list[RequestRecord]]:
    events = [
        decision_event("c1"),
        {"event": "accepted", "command_id": "c1"},
        {"event": "done", "command_id": "c1", "outcome": "completed"},
    ]
    records = timeline()
    checks = [check("d0", 29.5), check("d1", 29.6)]
    probes = {"s0": probe_run(), "s1": probe_run(down=(0.0, 0.0))} if probed else None
    return summary_of(events, [done("c1")], checks, records, probes), records


# --- results ---------------------------------------------------------------------------------


def test_results_join_decision_record_and_device_view() -> None:
    summary, _ = good_run()
    assert summary.ok, summary.problems
    (m,) = summary.migrations
    assert (m.service, m.technique, m.trigger, m.outcome) == (
        "s0",
        "precopy",
        "mobility",
        "completed",
    )
    assert m.predicted_downtime_s == pytest.approx(0.35)
    assert m.downtime_s == pytest.approx(0.42)
    # d0's last good answer before the gap came at 9 s + 4 ms, its first after at 13 s + 4 ms.
    assert m.observed_downtime_s == {"d0": pytest.approx(4.0)}
    (d,) = summary.decisions
    assert d.fate == "completed"
    r = summary.requests
    assert (r.sent, r.ok, r.failed, r.timeouts) == (60, 57, 3, 3)
    assert r.p50_ms == pytest.approx(4.0)


def test_the_probe_view_of_a_migration() -> None:
    summary, _ = good_run(probed=True)
    (m,) = summary.migrations
    assert m.probe is not None
    # Migration 10.2..11.9 s; pings sent in [10.5, 11.5) went unanswered: the last answer
    # before came at 10.462, the first after at 11.512, a 1.05 s gap at 20 Hz.
    assert m.probe.downtime_s == pytest.approx(1.0)
    assert m.probe.rate_hz == pytest.approx(20.0)
    # Sent 10.21 .. 11.86 (34), of them 10.51 .. 11.46 (20) lost.
    assert (m.probe.sent, m.probe.answered, m.probe.lost) == (34, 14, 20)
    # The devices' own view of the same migration is untouched by the probe.
    assert m.observed_downtime_s == {"d0": pytest.approx(4.0)}
    assert summary.ok


def test_a_migration_without_a_probe_or_not_bracketed_by_it() -> None:
    summary, _ = good_run()
    assert summary.migrations[0].probe is None
    # The probe never saw the service answer after the migration: no bound, so None.
    records, checks = timeline(), [check("d0", 29.5), check("d1", 29.6)]
    events = [decision_event("c1"), {"event": "accepted", "command_id": "c1"}]
    s = summary_of(events, [done("c1")], checks, records, {"s0": probe_run(down=(10.5, 31.0))})
    probe = s.migrations[0].probe
    assert probe is not None
    assert probe.downtime_s is None
    assert probe.sent == probe.lost + probe.answered == 34


def test_verdict_fails_on_rollback_mismatch_and_unfinished() -> None:
    records = timeline()
    events = [
        decision_event("c1"),
        {"event": "accepted", "command_id": "c1"},
        {"event": "done", "command_id": "c1", "outcome": "rolled_back"},
        decision_event("c2", service="s1"),
        {"event": "accepted", "command_id": "c2"},
    ]
    checks = [check("d0", 29.5, matches=False), check("d1", 20.0, reason="outage")]
    s = summary_of(events, [done("c1", Outcome.ROLLED_BACK)], checks, records)
    assert not s.ok
    text = "\n".join(s.problems)
    assert "ended rolled_back: dump failed" in text
    assert "did not finish before the end" in text
    assert "no migration completed" in text
    assert "continuity check failed: d0@gw2" in text
    # d1's only check was not the final one: continuity at the end is unproven.
    assert "d1: no verified final continuity check" in text
    assert s.continuity.final == {"d0": False, "d1": False}


def test_rejected_then_retried_is_not_a_failure() -> None:
    records = timeline()
    events = [
        decision_event("c1"),
        {"event": "rejected", "command_id": "c1"},
        decision_event("c2"),
        {"event": "accepted", "command_id": "c2"},
        {"event": "done", "command_id": "c2", "outcome": "completed"},
    ]
    s = summary_of(events, [done("c2")], [check("d0", 29.5), check("d1", 29.6)], records)
    assert [d.fate for d in s.decisions] == ["rejected", "completed"]
    assert s.ok, s.problems


def test_migrations_csv(tmp_path: Path) -> None:
    summary, _ = good_run()
    path = tmp_path / "migrations.csv"
    write_migrations_csv(path, summary.migrations)
    header, row = path.read_text().splitlines()
    assert header.startswith("migration_id,service,source,destination,technique")
    assert row.startswith("m-c1,s0,gw1,gw2,precopy,mobility,completed")
    assert ",0.35,0.42,4.0,,,," in row
    summary, _ = good_run(probed=True)
    write_migrations_csv(path, summary.migrations)
    header, row = path.read_text().splitlines()
    assert ",downtime_s,observed_downtime_s,probe_downtime_s,probe_sent,probe_lost," in header
    assert ",0.35,0.42,4.0,1.0" in row
    assert ",34,20," in row


# --- the report ------------------------------------------------------------------------------


def test_report_has_plots_tables_and_no_cdn(tmp_path: Path) -> None:
    summary, records = good_run()
    roams = [
        Roam("d0", "s0", T0, None, "gw1", published=True),
        Roam("d0", "s0", T0 + 8.0, "gw1", "gw2", published=True),
    ]
    path = write_report(
        tmp_path / "report.html",
        ReportInput(
            summary=summary,
            records=records,
            roams=roams,
            files={"devices/timeline.csv": "one row per request"},
        ),
    )
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # Both plots, drawn by the plotly.js embedded in the page, not fetched.
    assert f'id="{TIMELINE_DIV}"' in text
    assert f'id="{DOWNTIME_DIV}"' in text
    assert text.count("Plotly.newPlot") == 2
    assert len(text) > 1_000_000  # plotly.js itself is several MB
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "<link" not in text
    # The timeline carries both devices, the failed requests and the migration window.
    assert '"name":"d0 (s0)"' in text
    assert '"name":"d1 (s1)"' in text
    assert '"name":"d0 failed"' in text
    assert "s0 gw1\\u2192gw2 precopy" in text  # plotly writes JSON in ASCII
    assert "device roams" in text
    # Tables: summary, migrations (predicted, measured, observed), decisions, devices, files.
    assert "PASSED" in text
    for needle in ("350 ms", "420 ms", "d0 4.00 s", "8.4 MB", "8.8 MB", "timeline.csv"):
        assert needle in text, needle
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # No probe ran: no probe bars, a dash in its column.
    assert '"name":"observed (probe)"' not in text


def test_report_shows_the_probe_beside_node_and_devices() -> None:
    summary, records = good_run(probed=True)
    text = render_report(ReportInput(summary=summary, records=records))
    for name in ("measured (node)", "observed (probe)", "observed (device)"):
        assert f'"name":"{name}"' in text, name
    assert "1.00 s (20/34 lost)" in text


def test_report_of_a_failed_run_without_migrations() -> None:
    records = timeline(gap=(0.0, 0.0))
    s = summary_of([], [], [check("d0", 29.5), check("d1", 29.6)], records)
    text = render_report(ReportInput(summary=s, records=records))
    assert "FAILED" in text
    assert "no migration completed" in text
    assert "No migration ran." in text
    assert f'id="{TIMELINE_DIV}"' in text
    assert DOWNTIME_DIV not in text


def test_summary_renderable_says_why_a_run_failed() -> None:
    summary, _ = good_run()
    console = Console(record=True, width=200)
    console.print(summary_renderable(summary))
    text = console.export_text()
    assert "PASSED" in text
    assert "precopy" in text
    assert "d0 4.00 s" in text
    assert "probe:" not in text
    probed, _ = good_run(probed=True)
    console = Console(record=True, width=250)
    console.print(summary_renderable(probed))
    text = console.export_text()
    assert "1.00 s, 20 lost" in text
    assert "20 Hz pings" in text
    failed = summary.model_copy(update={"ok": False, "problems": ["no migration completed"]})
    console = Console(record=True, width=200)
    console.print(summary_renderable(failed))
    assert "FAILED: no migration completed" in console.export_text()
