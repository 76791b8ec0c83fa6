"""``fogmig experiment``: the paper's evaluation grid on the testbed, its figures and report.

Runs the grid (``fogmig.experiments.run``), or resumes one (``--resume DIR``), or only rebuilds
the figures and report from stored runs (``--report DIR``); then writes the figures and the
report. Exits 1 when a migration of this invocation did not complete. docs/evaluation.md
describes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from fogmig.device_sim.probe import MAX_RATE_HZ
from fogmig.experiments.grid import (
    CONFIGURATIONS,
    CONTROL_MTU,
    DEFAULT_RUNS,
    FULL_STATE_MB,
    QUICK_RUNS,
    QUICK_STATE_MB,
    GridSpec,
)
from fogmig.experiments.report import write_report
from fogmig.experiments.run import run_grid
from fogmig.experiments.store import GRID_FILE, read_grid, write_grid
from fogmig.experiments.table import summary_table
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Technique

console = Console()


def _names(text: str, known: Any, what: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n and n != "none")
    bad = [n for n in names if n not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}")
    return names


def _spec(args: argparse.Namespace) -> GridSpec:
    if not 0 <= args.probe_hz <= MAX_RATE_HZ:
        raise ConfigError(f"--probe-hz must be between 0 and {MAX_RATE_HZ:g}")
    fields: dict[str, Any] = {
        "configurations": args.configurations,
        "techniques": args.techniques,
        "control": args.control,
        "control_mtu": args.control_mtu,
        "probe_hz": args.probe_hz,
    }
    if args.baseline is not None:
        fields["baseline"] = args.baseline
    if args.runs is not None:
        fields["runs"] = args.runs
    if args.state_mb is not None:
        fields["state_mb"] = args.state_mb
    return GridSpec.quick_grid(**fields) if args.quick else GridSpec(**fields)


def _cmd(args: argparse.Namespace) -> int:
    if args.report:
        out = Path(args.report)
        spec = read_grid(out) if (out / GRID_FILE).is_file() else None
        return _write(out, spec, None, png=not args.no_png)
    if args.resume:
        out = Path(args.resume)
        spec = read_grid(out)
        console.print(f"resuming the grid in {out}")
    else:
        out = Path(args.out)
        spec = _spec(args)
        if (out / GRID_FILE).is_file() and read_grid(out) != spec:
            raise ConfigError(
                f"{out} holds another grid",
                hint=f"resume it with --resume {out}, or choose another --out",
            )
        write_grid(out, spec)
    result = run_async(lambda: run_grid(spec, out, say=console.print))
    if result.ran:
        console.print(summary_table([r.record for r in result.ran]))
    console.print(
        f"{len(result.ran)} run(s) in {result.elapsed_s / 60:.1f} min"
        + (f", {result.skipped} done before" if result.skipped else "")
    )
    code = _write(out, spec, result.elapsed_s, png=not args.no_png)
    failed = [r for r in result.ran if not r.completed]
    return 1 if failed else code


def _write(out: Path, spec: GridSpec | None, elapsed: float | None, *, png: bool) -> int:
    files = write_report(out, spec=spec, elapsed_s=elapsed, png=png)
    if files.png_problem:
        console.print(f"[yellow]{files.png_problem}[/]")
    counts: dict[str, int] = {}
    for v in files.verdicts:
        counts[v.status.value] = counts.get(v.status.value, 0) + 1
    console.print("verdicts: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    console.print(f"raw runs: {out / 'runs.csv'}, {out / 'runs.json'}")
    console.print(f"report: {files.markdown}, {files.html}; figures in {out / 'figures'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="the paper's evaluation grid (configurations A-D) on the testbed, with report",
        description="Runs configurations A-D x the four techniques, each run from a fresh "
        "deployment, plus a control on a 1500-byte MTU; writes raw runs (CSV, JSON), figures "
        "and a report with verdicts on the paper's findings. See docs/evaluation.md.",
    )
    p.add_argument(
        "--configurations",
        type=lambda t: _names(t, CONFIGURATIONS, "configuration"),
        default=("A", "B", "C", "D"),
        help="comma-separated, of A,B,C,D",
    )
    p.add_argument(
        "--techniques",
        type=lambda t: _names(t, set(Technique), "technique"),
        default=tuple(Technique),
        help="comma-separated, of " + ",".join(Technique),
    )
    p.add_argument(
        "--runs",
        "--repeat",
        dest="runs",
        type=int,
        default=None,
        help=f"runs per cell ({DEFAULT_RUNS}; --quick: {QUICK_RUNS})",
    )
    p.add_argument(
        "--state-mb",
        type=int,
        default=None,
        help=f"service state ({FULL_STATE_MB}; --quick: {QUICK_STATE_MB})",
    )
    p.add_argument(
        "--control",
        type=lambda t: _names(t, CONFIGURATIONS, "configuration"),
        default=("C",),
        help="configurations also run at MTU --control-mtu (default C; 'none': no control)",
    )
    p.add_argument("--control-mtu", type=int, default=CONTROL_MTU)
    p.add_argument("--quick", action="store_true", help="the scaled-down grid (minutes)")
    p.add_argument(
        "--probe-hz",
        type=float,
        default=20.0,
        metavar="HZ",
        help="a probe device pings the service at this rate during every migration (0: none)",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run every cell with the paper's toolchain (runc, CRIU, rsync over ssh); "
        "default: on with --quick, off on the full grid",
    )
    p.add_argument("--out", default="results/evaluation", help="where everything goes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--resume", metavar="DIR", help="continue the interrupted grid in DIR")
    where.add_argument(
        "--report", metavar="DIR", help="only rebuild the figures and report from DIR's runs"
    )
    p.add_argument("--no-png", action="store_true", help="write the figures as HTML only")
    p.set_defaults(func=_cmd)
