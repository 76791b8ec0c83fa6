"""The grid's report: conditions, measured results beside their physical floor, the verdict on
every claim of the paper, the MTU control and (when present) a baseline engine side by side.

Written as ``report.md`` and ``report.html`` (figures inline) from the runs alone, so it can be
regenerated at any time (``fogmig experiment --report DIR``).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from fogmig.experiments import doc
from fogmig.experiments.baseline import ENGINE as BASELINE_ENGINE
from fogmig.experiments.baseline_compare import Comparison
from fogmig.experiments.baseline_compare import compare as compare_engines
from fogmig.experiments.compare import Status, comparable
from fogmig.experiments.figures import FIGURES, TECHNIQUE_ORDER, write_figures
from fogmig.experiments.grid import ENGINE, GridSpec, base_configuration
from fogmig.experiments.png import PngWriter
from fogmig.experiments.stats import Summary
from fogmig.experiments.store import RunRecord, load_runs
from fogmig.experiments.verdicts import Verdict, decide_all, tally

SAME_ORDER = 0.1
"""Dirty rate and throughput are "of the same order of magnitude" from this ratio up."""


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]
    png_problem: str | None
    verdicts: list[Verdict]


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def _span(runs: Sequence[RunRecord]) -> str:
    """From the first migration's start to the last one's end, as a sentence."""
    starts = [r.record.started_at for r in runs if r.record.started_at > 0]
    ends = [r.record.finished_at for r in runs if r.record.finished_at > 0]
    if not starts or not ends:
        return ""
    return f" The migrations span {(max(ends) - min(starts)) / 60:.1f} min."


def _conditions(summary: Summary, engine: str) -> doc.TableBlock:
    rows = []
    for conf in summary.configurations(engine):
        runs = [r for r in summary.runs if r.engine == engine and r.configuration == conf]
        if not runs:
            continue
        first = runs[0]
        asked = f"{first.link_rate_asked_mbit:g}"
        measured = [r.link_rate_measured_mbit for r in runs if r.link_rate_measured_mbit]
        rtts = [r.link_rtt_measured_ms for r in runs if r.link_rtt_measured_ms]
        rate = statistics.fmean(measured) if measured else first.link_rate_asked_mbit
        ratio = first.dirty_kbps * 1024 * 8 / (rate * 1e6)
        pre = summary.get("pre_dump_transfer_time_s", engine, conf, "precopy")
        rows.append(
            [
                conf,
                first.link_profile,
                str(first.mtu or "-"),
                f"{asked} / {_fmt(statistics.fmean(measured)) if measured else '-'}",
                f"{first.link_rtt_asked_ms:g} / {_fmt(statistics.fmean(rtts)) if rtts else '-'}",
                f"{first.state_mb:g}",
                f"{first.dirty_kbps:g}",
                f"{ratio:.3f} ({'same order' if ratio >= SAME_ORDER else 'lower order'})",
                _fmt(pre.mean, 1) if pre.n else "-",
                str(sum(r.leftover_images for r in runs)),
            ]
        )
    return doc.TableBlock(
        headers=[
            "configuration",
            "link",
            "MTU",
            "rate Mbit/s asked / measured",
            "RTT ms asked / measured",
            "state MB",
            "dirty KB/s",
            "dirty rate / throughput",
            "pre-copy phase s",
            "images found before runs",
        ],
        rows=rows,
    )


def _results(summary: Summary, engines: Sequence[str]) -> doc.TableBlock:
    rows = []
    for conf in summary.configurations():
        for t in TECHNIQUE_ORDER:
            for e in engines:
                n = summary.attempted(e, conf, t)
                if not n:
                    continue
                ok = len(summary.completed(e, conf, t))
                total = summary.get("total_time_s", e, conf, t)
                floor = summary.get("floor_s", e, conf, t)
                floor_m = summary.get("floor_measured_s", e, conf, t)
                ratio = total.mean / floor.mean if floor.n and floor.mean > 0 else math.nan
                rows.append(
                    [
                        conf,
                        t,
                        *([e] if len(engines) > 1 else []),
                        f"{ok}/{n}",
                        total.text(),
                        summary.get("downtime_s", e, conf, t).text(),
                        summary.get("device_downtime_s", e, conf, t).text(),
                        summary.get("transferred_mb", e, conf, t).text(digits=1),
                        floor.text(),
                        floor_m.text(),
                        _fmt(ratio),
                    ]
                )
    return doc.TableBlock(
        headers=[
            "configuration",
            "technique",
            *(["engine"] if len(engines) > 1 else []),
            "completed",
            "total s",
            "downtime s",
            "device downtime s",
            "transferred MB",
            "floor s (asked rate)",
            "floor s (measured rate)",
            "total / floor",
        ],
        rows=rows,
    )


def _verdict_blocks(
    verdicts: Sequence[Verdict], others: dict[str, list[Verdict]]
) -> list[doc.Block]:
    counts = tally(verdicts)
    blocks: list[doc.Block] = [
        doc.Para(
            "Each verdict is computed from the runs above by the rules in docs/evaluation.md: "
            + ", ".join(f"{counts[s]} {s.value}" for s in Status)
            + "."
        ),
    ]
    headers = ["claim", "where", "statement", ENGINE, *others]
    rows = []
    for i, v in enumerate(verdicts):
        rows.append(
            [
                v.claim.id,
                v.claim.source,
                v.claim.statement,
                v.status.value,
                *(o[i].status.value for o in others.values()),
            ]
        )
    blocks.append(doc.TableBlock(headers=headers, rows=rows))
    blocks.append(doc.Heading(2, "The numbers behind each verdict"))
    for v in verdicts:
        items = [f"{c.configuration}: {'yes' if c.ok else 'no'}: {c.detail}" for c in v.checks] or [
            "no runs of the configurations this claim is about"
        ]
        blocks.append(doc.Para(f"{v.claim.id} ({v.status.value}): {v.claim.statement}"))
        blocks.append(doc.Bullets(items))
        if v.status in (Status.FAILS, Status.PARTLY) and v.claim.differs:
            blocks.append(doc.Para(f"Likely reason for the difference: {v.claim.differs}."))
    return blocks


def _control(summary: Summary, spec: GridSpec | None) -> list[doc.Block]:
    controls = [c for c in summary.configurations(ENGINE) if c != base_configuration(c)]
    if not controls:
        return []
    mtu = spec.control_mtu if spec else 1500
    blocks: list[doc.Block] = [
        doc.Heading(1, f"Control: the same configurations on a {mtu}-byte MTU"),
        doc.Para(
            "The testbed's data links use a large MTU so that its userspace link emulator handles "
            "few packets. Real links carry Ethernet-sized packets: more packets per byte, more "
            "per-packet work in the emulator, the kernel and TCP. The control runs the same "
            "cells with that MTU; where its times differ, the large MTU flatters the results."
        ),
    ]
    rows = []
    changes: list[float] = []
    differing: list[str] = []
    for ctl in controls:
        base = base_configuration(ctl)
        for t in TECHNIQUE_ORDER:
            a, b = (summary.get("total_time_s", ENGINE, c, t) for c in (base, ctl))
            if a.n == 0 and b.n == 0:
                continue
            da, db = (summary.get("downtime_s", ENGINE, c, t) for c in (base, ctl))
            change = (b.mean / a.mean - 1) if a.n and b.n and a.mean > 0 else math.nan
            if not math.isnan(change):
                changes.append(change)
                if not comparable(a, b, "total_time_s"):
                    differing.append(f"{ctl} {t}")
            rows.append(
                [
                    f"{base} vs {ctl}",
                    t,
                    a.text(),
                    b.text(),
                    "-" if math.isnan(change) else f"{change:+.0%}",
                    da.text(),
                    db.text(),
                ]
            )
        rates = [
            statistics.fmean(xs) if xs else math.nan
            for xs in (
                [
                    r.link_rate_measured_mbit
                    for r in summary.runs
                    if r.configuration == c and r.engine == ENGINE and r.link_rate_measured_mbit
                ]
                for c in (base, ctl)
            )
        ]
        blocks.append(
            doc.Para(
                f"Measured TCP throughput: {base} {_fmt(rates[0])} Mbit/s, "
                f"{ctl} {_fmt(rates[1])} Mbit/s."
            )
        )
    if changes:
        blocks.append(
            doc.Para(
                f"At MTU {mtu} the total times change by {statistics.fmean(changes):+.0%} on "
                f"average ({min(changes):+.0%} to {max(changes):+.0%} over the techniques); "
                + (
                    "not comparable (docs/evaluation.md's rule) for " + ", ".join(differing)
                    if differing
                    else "every technique's total is comparable at both MTUs: at these rates "
                    "the large MTU hides nothing measurable in the migration times"
                )
                + "."
            )
        )
    blocks.append(
        doc.TableBlock(
            headers=[
                "pair",
                "technique",
                "total s (testbed MTU)",
                f"total s (MTU {mtu})",
                "change",
                "downtime s (testbed MTU)",
                f"downtime s (MTU {mtu})",
            ],
            rows=rows,
        )
    )
    return blocks


def short_reason(why: str, limit: int = 240) -> str:
    """An error in a table cell: long command lines elided, the cause (which comes last)
    kept."""
    text = re.sub(r"`[^`]{40,}`", "(command)", why)
    if len(text) <= limit:
        return text
    return text[:60] + " ... " + text[-(limit - 65) :]


def _against_baseline(runs: Sequence[RunRecord]) -> list[doc.Block]:
    """fogmig's engine over the paper's toolchain per configuration and technique, as ratios
    of means (below 1: fogmig did better); a technique the toolchain could not run says why."""
    if not any(r.engine == BASELINE_ENGINE for r in runs):
        return []
    rows: list[list[str]] = []
    for conf in sorted({r.configuration for r in runs}):
        records = [r.record for r in runs if r.configuration == conf]
        for c in compare_engines(records):

            def ratio(metric: str, c: Comparison = c) -> str:
                value = c.ratio(metric)
                return "-" if value is None else f"{value:.2f}"

            why = c.baseline_error or ""
            rows.append(
                [
                    conf,
                    str(c.technique),
                    ratio("total_s"),
                    ratio("downtime_s"),
                    ratio("bytes"),
                    short_reason(why),
                ]
            )
    return [
        doc.Heading(1, "Against the paper's toolchain"),
        doc.Para(
            f"fogmig's engine over {BASELINE_ENGINE} (runc checkpoint and restore, CRIU's "
            "lazy pages, images copied with rsync over ssh, as the paper's scripts did), "
            "ratios of the means of completed runs: below 1, fogmig did better. Where the "
            "toolchain could not run a technique on this kernel, its own error says why."
        ),
        doc.TableBlock(
            headers=["configuration", "technique", "total", "downtime", "bytes", "baseline"],
            rows=rows,
        ),
    ]


def build_report(
    runs: Sequence[RunRecord],
    *,
    spec: GridSpec | None,
    figures: dict[str, go.Figure],
    pngs: bool,
    elapsed_s: float | None = None,
) -> tuple[doc.Document, list[Verdict]]:
    summary = Summary(runs)
    engines = summary.engines()
    verdicts = decide_all(summary, engine=ENGINE)
    others = {e: decide_all(summary, engine=e) for e in engines if e != ENGINE}
    d = doc.Document(title="Container migration in the fog: the evaluation on this testbed")
    grid_text = (
        "no grid.json: runs collected elsewhere"
        if spec is None
        else (
            f"{'quick' if spec.quick else 'full'} grid: configurations "
            f"{', '.join(spec.configuration_names())}, techniques {', '.join(spec.techniques)}, "
            f"{spec.runs} run(s) each, service state {spec.state_mb} MB, probe "
            f"{spec.probe_hz:g} Hz"
        )
    )
    done = sum(r.completed for r in runs)
    d.add(
        doc.Para(
            f"{grid_text}. {len(runs)} run(s), {done} completed; engines: {', '.join(engines)}."
            + (f" This invocation took {elapsed_s / 60:.1f} min." if elapsed_s else "")
            + _span(runs)
        ),
        doc.Para(
            "Every run starts from a fresh deployment of the service on the source and a "
            "destination without images of earlier runs (the last column of the first table "
            "counts the migration directories found before runs; 0 means fresh)."
        ),
        doc.Heading(1, "Conditions"),
        _conditions(summary, ENGINE),
        doc.Heading(1, "Results and the physical floor"),
        doc.Para(
            "Means with 95% confidence intervals (Student's t) over the completed runs. The "
            "floor is what the link needs for the bytes moved: transferred bytes / link rate, at "
            "the asked and at the measured rate; no technique can beat it."
        ),
        _results(summary, engines),
        doc.Heading(1, "Verdicts on the paper's findings"),
    )
    d.add(*_verdict_blocks(verdicts, others))
    d.add(*_against_baseline(runs))
    d.add(*_control(summary, spec))
    d.add(doc.Heading(1, "Figures"))
    for f in FIGURES:
        d.add(doc.Heading(2, f.title), doc.FigureBlock(f.name, figures.get(f.name), png=pngs))
    return d, verdicts


def write_report(
    out: Path, *, spec: GridSpec | None = None, elapsed_s: float | None = None, png: bool = True
) -> ReportFiles:
    """Figures, ``report.md`` and ``report.html`` in ``out`` from the runs stored there."""
    runs = load_runs(out)
    summary = Summary(runs)
    writer = PngWriter() if png else None
    try:
        figures = write_figures(summary, out, png=writer)
    finally:
        if writer is not None:
            writer.close()
    pngs = writer is not None and writer.problem is None
    document, verdicts = build_report(
        runs, spec=spec, figures=figures, pngs=pngs, elapsed_s=elapsed_s
    )
    if writer is not None and writer.problem:
        document.blocks.insert(0, doc.Para(writer.problem))
    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.to_markdown(document))
    page.write_text(doc.to_html(document))
    written = sorted((out / "figures").glob("*.html")) + (writer.written if writer else [])
    return ReportFiles(
        markdown=md,
        html=page,
        figures=written,
        png_problem=writer.problem if writer else None,
        verdicts=verdicts,
    )
