"""The paper's figures 7-11 from the grid's runs, plus the downtime the devices saw.

One panel per configuration, one bar per technique (and engine, when a baseline's runs are
present), components stacked as in the paper; the black whiskers are 95% confidence intervals
of the bar's total. Each figure is written as HTML (plotly.js once, beside them) and as PNG
when an image exporter works here (see :mod:`fogmig.experiments.png`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fogmig.experiments.png import PngWriter
from fogmig.experiments.stats import Summary

TECHNIQUE_ORDER: Final = ("cold", "precopy", "postcopy", "hybrid")
COLORS: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass(frozen=True, slots=True)
class FigureSpec:
    """One figure: its file name, title, stacked components and the metric of its whiskers."""

    name: str
    title: str
    y_title: str
    components: tuple[tuple[str, str], ...]
    """(metric, legend label) stacked bottom to top."""
    total: str
    floor: bool = False
    """Mark the physical floor (bytes moved / link rate) on every bar."""


FIGURES: Final = (
    FigureSpec(
        name="fig7-total-time",
        title="Figure 7: total migration time with its components",
        y_title="time (s)",
        components=(
            ("pre_dump_time_s", "pre-dump"),
            ("pre_dump_transfer_time_s", "pre-dump transfer"),
            ("dump_time_s", "dump"),
            ("dump_transfer_time_s", "dump transfer"),
            ("resume_time_s", "resume"),
            ("faulted_pages_transfer_time_s", "faulted pages transfer"),
        ),
        total="total_time_s",
        floor=True,
    ),
    FigureSpec(
        name="fig8-downtime",
        title="Figure 8: downtime with its components",
        y_title="time (s)",
        components=(
            ("dump_time_s", "dump"),
            ("dump_transfer_time_s", "dump transfer"),
            ("resume_time_s", "resume"),
        ),
        total="downtime_s",
    ),
    FigureSpec(
        name="fig9-dump-time",
        title="Figure 9: dump time",
        y_title="time (s)",
        components=(("dump_time_s", "dump"),),
        total="dump_time_s",
    ),
    FigureSpec(
        name="fig10-resume-time",
        title="Figure 10: resume time",
        y_title="time (s)",
        components=(("resume_time_s", "resume"),),
        total="resume_time_s",
    ),
    FigureSpec(
        name="fig11-transferred",
        title="Figure 11: transferred data with its components",
        y_title="data (MB)",
        components=(
            ("pre_dump_mb", "pre-dump"),
            ("dump_mb", "dump"),
            ("faulted_pages_mb", "faulted pages"),
        ),
        total="transferred_mb",
    ),
    FigureSpec(
        name="fig12-device-downtime",
        title="Downtime seen by the node and by a device probing the service",
        y_title="time (s)",
        components=(("downtime_s", "node"), ("device_downtime_s", "device")),
        total="",
    ),
)


def _bars(summary: Summary, configuration: str) -> list[tuple[str, str, str]]:
    """(engine, technique, x label) of every bar of a panel, in order."""
    engines = summary.engines()
    out = []
    for technique in TECHNIQUE_ORDER:
        for engine in engines:
            if summary.attempted(engine, configuration, technique):
                label = technique if len(engines) == 1 else f"{technique}<br>{engine}"
                out.append((engine, technique, label))
    return out


def build(spec: FigureSpec, summary: Summary, configurations: Sequence[str]) -> go.Figure:
    """The figure ``spec`` over ``configurations`` (one panel each)."""
    fig = make_subplots(
        rows=1,
        cols=max(1, len(configurations)),
        subplot_titles=[f"configuration {c}" for c in configurations],
        shared_yaxes=False,
    )
    grouped = not spec.total  # side-by-side bars, each with its own whiskers
    for col, conf in enumerate(configurations, start=1):
        bars = _bars(summary, conf)
        xs = [label for _e, _t, label in bars]
        for i, (metric, label) in enumerate(spec.components):
            ests = [summary.get(metric, e, conf, t) for e, t, _l in bars]
            trace: dict[str, Any] = {
                "x": xs,
                "y": [0.0 if e.n == 0 else e.mean for e in ests],
                "name": label,
                "legendgroup": label,
                "showlegend": col == 1,
                "marker_color": COLORS[i % len(COLORS)],
            }
            if grouped or len(spec.components) == 1:
                trace["error_y"] = {
                    "type": "data",
                    "array": [0.0 if e.n < 2 else e.half_width for e in ests],
                    "color": "black",
                }
            fig.add_trace(go.Bar(**trace), row=1, col=col)
        if spec.total and len(spec.components) > 1:
            totals = [summary.get(spec.total, e, conf, t) for e, t, _l in bars]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[0.0 if e.n == 0 else e.mean for e in totals],
                    mode="markers",
                    marker={"color": "black", "size": 4},
                    error_y={
                        "type": "data",
                        "array": [0.0 if e.n < 2 else e.half_width for e in totals],
                        "color": "black",
                    },
                    name="total (95% CI)",
                    legendgroup="total",
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        if spec.floor:
            floors = [summary.get("floor_s", e, conf, t) for e, t, _l in bars]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[0.0 if e.n == 0 else e.mean for e in floors],
                    mode="markers",
                    marker={"symbol": "line-ew-open", "size": 24, "color": "black"},
                    name="floor: bytes / link rate",
                    legendgroup="floor",
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
    fig.update_layout(
        title=spec.title,
        barmode="group" if grouped else "stack",
        height=480,
        width=max(700, 330 * len(configurations)),
        legend={"orientation": "h", "y": -0.18},
        template="plotly_white",
    )
    fig.update_yaxes(title_text=spec.y_title, row=1, col=1)
    return fig


def write_figures(
    summary: Summary, out: Path, *, png: PngWriter | None = None
) -> dict[str, go.Figure]:
    """Every figure as ``out/figures/<name>.html`` (and ``.png`` when possible)."""
    directory = out / "figures"
    directory.mkdir(parents=True, exist_ok=True)
    configurations = summary.configurations()
    figures = {}
    for spec in FIGURES:
        fig = build(spec, summary, configurations)
        # "directory": one plotly.min.js beside the figures instead of a copy in each.
        fig.write_html(directory / f"{spec.name}.html", include_plotlyjs="directory")
        if png is not None:
            png.write(fig, directory / f"{spec.name}.png")
        figures[spec.name] = fig
    return figures
