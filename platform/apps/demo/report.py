"""The demo's HTML report: a request-latency timeline with the migrations marked, a downtime
comparison, and the tables of the summary, in one self-contained file.

plotly.js is embedded (the machine may be offline: nothing is fetched from a CDN when the
report is opened). Built from a :class:`DemoSummary` and the devices' requests, so a test can
render it from synthetic values.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogmig.device_sim.events import RequestKind, RequestRecord, Roam
from fogmig.platform.apps.demo.results import DecisionRow, DemoSummary, MigrationRow
from fogmig.platform.base import fmt
from fogmig.platform.base.vocabulary import Outcome, Technique

TIMELINE_DIV = "fogmig-timeline"
DOWNTIME_DIV = "fogmig-downtime"
_TECHNIQUE_COLOURS: dict[Technique, str] = {
    Technique.COLD: "#7f7f7f",
    Technique.PRECOPY: "#1f77b4",
    Technique.POSTCOPY: "#d62728",
    Technique.HYBRID: "#9467bd",
}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #b42318; font-weight: bold; }
.reason { max-width: 36em; } .muted { color: #777; }
"""


@dataclass(frozen=True, slots=True)
class ReportInput:
    """What the report shows: the summary, every request and every roam of the devices."""

    summary: DemoSummary
    records: Sequence[RequestRecord]
    roams: Sequence[Roam] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    """Raw files next to the report (relative path -> what it holds)."""
    title: str = "fogmig demo"


# --- formatting -------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def probe_downtime(m: MigrationRow) -> float | None:
    return m.probe.downtime_s if m.probe else None


def worst_observed(m: MigrationRow) -> float | None:
    seen = [v for v in m.observed_downtime_s.values() if v is not None]
    return max(seen) if seen else None


def _table(headers: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]]) -> str:
    """``rows`` hold (cell HTML, CSS class) pairs; the cell HTML is already escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{cell}</td>' for cell, cls in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _t(text: object, cls: str = "") -> tuple[str, str]:
    return _e(text), cls


# --- figures ----------------------------------------------------------------------------------


def timeline_figure(data: ReportInput) -> Any:
    """Per device request latency over time; failed requests as crosses; migrations shaded."""
    import plotly.graph_objects as go

    t0 = data.summary.started_at
    fig = go.Figure()
    devices = sorted({r.device for r in data.records})
    for device in devices:
        posts = [r for r in data.records if r.device == device and r.request is RequestKind.POST]
        ok = [r for r in posts if r.ok]
        bad = [r for r in posts if not r.ok]
        fig.add_trace(
            go.Scatter(
                x=[round(r.sent_at - t0, 3) for r in ok],
                y=[round(r.latency_s * 1000, 3) for r in ok],
                mode="lines+markers",
                name=f"{device} ({ok[0].service if ok else ''})",
                legendgroup=device,
                marker={"size": 5},
                text=[f"{r.gateway} seq {r.seq}" for r in ok],
                hovertemplate="%{x:.1f} s: %{y:.1f} ms via %{text}<extra>" + device + "</extra>",
            )
        )
        if bad:
            fig.add_trace(
                go.Scatter(
                    x=[round(r.sent_at - t0, 3) for r in bad],
                    y=[max(round(r.latency_s * 1000, 3), 0.1) for r in bad],
                    mode="markers",
                    name=f"{device} failed",
                    legendgroup=device,
                    marker={"symbol": "x", "size": 9, "color": "#b42318"},
                    text=[f"{r.outcome.value} {r.code} via {r.gateway}" for r in bad],
                    hovertemplate="%{x:.1f} s: %{text}<extra>" + device + "</extra>",
                )
            )
    for m in data.summary.migrations:
        colour = _TECHNIQUE_COLOURS.get(m.technique, "#2ca02c")
        fig.add_vrect(
            x0=m.started_at - t0,
            x1=max(m.finished_at, m.started_at + 0.05) - t0,
            fillcolor=colour,
            opacity=0.18,
            line_width=0,
            annotation_text=f"{m.service} {m.source}→{m.destination} {m.technique}",
            annotation_position="top left",
            annotation_font_size=10,
        )
    if data.roams:
        fig.add_trace(
            go.Scatter(
                x=[round(r.at - t0, 3) for r in data.roams if r.from_gateway is not None],
                y=[1.0 for r in data.roams if r.from_gateway is not None],
                mode="markers",
                name="device roams",
                marker={"symbol": "triangle-up", "size": 10, "color": "#ff7f0e"},
                text=[
                    f"{r.device}: {r.from_gateway} → {r.to_gateway}"
                    for r in data.roams
                    if r.from_gateway is not None
                ],
                hovertemplate="%{x:.1f} s: %{text}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Request latency per device (shaded: migrations; triangles: device roams)",
        xaxis_title="seconds since the start",
        yaxis_title="latency (ms, log scale)",
        yaxis_type="log",
        height=520,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def downtime_figure(migrations: Sequence[MigrationRow]) -> Any:
    """Predicted, platform-measured, probe-observed and device-observed downtime of every
    migration."""
    import plotly.graph_objects as go

    labels = [
        f"{i + 1}. {m.service} {m.source}→{m.destination} {m.technique}"
        for i, m in enumerate(migrations)
    ]
    fig = go.Figure()
    for name, values in (
        ("predicted", [m.predicted_downtime_s for m in migrations]),
        ("measured (node)", [m.downtime_s for m in migrations]),
        ("observed (probe)", [probe_downtime(m) for m in migrations]),
        ("observed (device)", [worst_observed(m) for m in migrations]),
    ):
        if name == "observed (probe)" and not any(m.probe for m in migrations):
            continue
        fig.add_trace(go.Bar(name=name, x=labels, y=values))
    fig.update_layout(
        title="Downtime per migration: predicted, measured by the node, observed by a probe "
        "and by the devices",
        barmode="group",
        yaxis_title="seconds",
        height=420,
        margin={"l": 60, "r": 20, "t": 60, "b": 120},
    )
    return fig


# --- sections ---------------------------------------------------------------------------------


def _summary_section(s: DemoSummary) -> str:
    verdict = '<span class="ok">PASSED</span>' if s.ok else '<span class="bad">FAILED</span>'
    completed = sum(1 for m in s.migrations if m.outcome is Outcome.COMPLETED)
    r, c = s.requests, s.continuity
    rows = [
        ("verdict", verdict),
        ("started", _e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started_at)))),
        ("duration", _e(f"{s.duration_s:.1f} s")),
        ("profile", _e(s.profile)),
        ("nodes", _e(", ".join(s.nodes))),
        ("devices", _e(", ".join(f"{d} → {svc}" for d, svc in s.devices.items()))),
        ("migrations", _e(f"{len(s.migrations)} ({completed} completed)")),
        (
            "requests",
            _e(
                f"{r.sent} sent, {r.ok} ok, {r.failed} failed ({r.timeouts} timeouts), "
                f"{r.retries} retries; "
                f"latency p50 {fmt.millis(r.p50_ms)}, p99 {fmt.millis(r.p99_ms)}"
            ),
        ),
        ("readings lost / doubled", _e(f"{r.lost_readings} / {r.doubled_readings}")),
        (
            "continuity checks",
            _e(f"{c.passed} passed, {c.failed} failed, {c.unverified} unverified"),
        ),
        ("settled at the end", _e("yes" if s.settled else "no")),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    out = f"<h2>Summary</h2><table>{body}</table>"
    if s.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in s.problems)
        out += f'<h2>Problems</h2><ul class="bad">{items}</ul>'
    return out


def _probe_cell(m: MigrationRow) -> str:
    if m.probe is None:
        return "-"
    return f"{fmt.duration(m.probe.downtime_s)} ({m.probe.lost}/{m.probe.sent} lost)"


def migrations_table(migrations: Sequence[MigrationRow], t0: float) -> str:
    headers = [
        "#",
        "at",
        "service",
        "move",
        "technique",
        "trigger",
        "outcome",
        "downtime predicted",
        "downtime measured",
        "downtime probe",
        "downtime observed",
        "total predicted",
        "total measured",
        "bytes predicted",
        "bytes sent",
        "why",
    ]
    rows = []
    for i, m in enumerate(migrations):
        seen = ", ".join(f"{d} {fmt.duration(v)}" for d, v in m.observed_downtime_s.items()) or "-"
        outcome_cls = "ok" if m.outcome is Outcome.COMPLETED else "bad"
        outcome = m.outcome + (f": {m.error}" if m.error else "")
        rows.append(
            [
                _t(i + 1, "num"),
                _t(f"{m.started_at - t0:.1f} s", "num"),
                _t(m.service),
                _t(f"{m.source} → {m.destination}"),
                _t(m.technique),
                _t(m.trigger),
                _t(outcome, outcome_cls),
                _t(fmt.duration(m.predicted_downtime_s), "num"),
                _t(fmt.duration(m.downtime_s), "num"),
                _t(_probe_cell(m), "num"),
                _t(seen, "num"),
                _t(fmt.duration(m.predicted_total_time_s), "num"),
                _t(fmt.duration(m.total_time_s), "num"),
                _t(fmt.megabytes(m.predicted_bytes), "num"),
                _t(fmt.megabytes(m.transferred_bytes), "num"),
                _t(m.reason, "reason"),
            ]
        )
    if not rows:
        return '<p class="muted">No migration ran.</p>'
    return _table(headers, rows)


def decisions_table(decisions: Sequence[DecisionRow], t0: float) -> str:
    headers = ["at", "service", "move", "technique", "trigger", "predicted downtime", "fate", "why"]
    rows = [
        [
            _t(f"{d.at - t0:.1f} s", "num"),
            _t(d.service),
            _t(f"{d.source} → {d.destination}"),
            _t(d.technique),
            _t(d.trigger),
            _t(fmt.duration(d.predicted_downtime_s), "num"),
            _t(d.fate, "ok" if d.fate == Outcome.COMPLETED else "bad"),
            _t(d.reason, "reason"),
        ]
        for d in decisions
    ]
    if not rows:
        return '<p class="muted">The controller decided nothing.</p>'
    return _table(headers, rows)


def devices_table(records: Sequence[RequestRecord], roams: Sequence[Roam]) -> str:
    headers = ["device", "service", "requests", "ok", "failed", "roams", "gateways"]
    rows = []
    for device in sorted({r.device for r in records}):
        posts = [r for r in records if r.device == device and r.request is RequestKind.POST]
        moves = [r for r in roams if r.device == device]
        path = " → ".join(r.to_gateway for r in moves) or "-"
        ok = sum(1 for r in posts if r.ok)
        rows.append(
            [
                _t(device),
                _t(posts[0].service if posts else "-"),
                _t(len(posts), "num"),
                _t(ok, "num"),
                _t(len(posts) - ok, "num" if ok == len(posts) else "num bad"),
                _t(sum(1 for r in moves if r.from_gateway is not None), "num"),
                _t(path),
            ]
        )
    return _table(headers, rows)


def _files_section(files: Mapping[str, str]) -> str:
    if not files:
        return ""
    items = "".join(
        f'<li><a href="{_e(path)}">{_e(path)}</a>: {_e(what)}</li>' for path, what in files.items()
    )
    return f"<h2>Raw files</h2><ul>{items}</ul>"


def render_report(data: ReportInput) -> str:
    """The whole report as one HTML document (plotly.js inline)."""
    s = data.summary
    t0 = s.started_at
    config = {"displaylogo": False, "responsive": True}
    timeline = timeline_figure(data).to_html(
        full_html=False, include_plotlyjs=True, div_id=TIMELINE_DIV, config=config
    )
    downtime = ""
    if s.migrations:
        downtime = downtime_figure(s.migrations).to_html(
            full_html=False, include_plotlyjs=False, div_id=DOWNTIME_DIV, config=config
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(data.title)}</h1>",
        _summary_section(s),
        "<h2>Timeline</h2>",
        timeline,
        "<h2>Migrations</h2>",
        migrations_table(s.migrations, t0),
        '<p class="muted">Downtime measured: the node\'s (dump + dump transfer + resume). '
        "Probe: the longest gap between answers to a probe device's pings of the service "
        "through its device's gateway, minus one ping interval, with the pings lost during "
        "the migration. Observed: the longest gap between acknowledged readings around the "
        f"migration, as the device saw it; readings go out every {_e(_interval(s))}, so that "
        "spacing means no visible interruption.</p>",
        downtime,
        "<h2>Controller decisions</h2>",
        decisions_table(s.decisions, t0),
        "<h2>Devices</h2>",
        devices_table(data.records, data.roams),
        _files_section(data.files),
        "</body></html>",
    ]
    return "\n".join(parts)


def _interval(s: DemoSummary) -> str:
    value = s.options.get("interval_s")
    return fmt.duration(float(value)) if isinstance(value, int | float) else "interval"


def write_report(path: Path, data: ReportInput) -> Path:
    """Write the report to ``path`` (atomically: a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_report(data), encoding="utf-8")
    tmp.replace(path)
    return path
