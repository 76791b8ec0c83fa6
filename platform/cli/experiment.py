"""``fogmig experiment``: the paper's evaluation (configurations A-D) on the embedded testbed.

Parses the plan, runs it (see ``fogmig.experiments.paper``), prints the summary table and, with
``--json``, every record; exits 1 when a migration did not complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fogmig.device_sim.probe import MAX_RATE_HZ
from fogmig.experiments.paper import (
    PAPER_CONFIGURATIONS,
    ExperimentPlan,
    console,
    run_plan,
    summary_table,
)
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.vocabulary import Outcome, Technique


def _techniques(text: str) -> list[Technique]:
    try:
        return [Technique(name) for name in text.split(",")]
    except ValueError:
        known = ", ".join(Technique)
        raise argparse.ArgumentTypeError(f"a comma-separated list of {known}") from None


def _cmd(args: argparse.Namespace) -> int:
    plan = ExperimentPlan(
        configurations=args.configurations.split(","),
        techniques=args.techniques,
        state_mb=args.state_mb,
        repeat=args.repeat,
        out=Path(args.out),
        probe_hz=args.probe_hz,
    )
    if not 0 <= args.probe_hz <= MAX_RATE_HZ:
        console.print(f"[red]--probe-hz must be between 0 and {MAX_RATE_HZ:g}[/]")
        return 2
    for c in plan.configurations:
        if c not in PAPER_CONFIGURATIONS:
            console.print(f"[red]unknown configuration {c}; use A, B, C, D[/]")
            return 2
    records = run_async(lambda: run_plan(plan))
    console.print(summary_table(records))
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    failed = [r for r in records if r.outcome is not Outcome.COMPLETED]
    return 1 if failed else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "experiment", help="reproduce the paper's evaluation (configurations A-D) on the testbed"
    )
    p.add_argument("--configurations", default="A,B,C,D", help="comma-separated, of A,B,C,D")
    p.add_argument("--techniques", type=_techniques, default=list(Technique))
    p.add_argument("--state-mb", type=int, default=75)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default="results/paper")
    p.add_argument(
        "--probe-hz",
        type=float,
        default=20.0,
        metavar="HZ",
        help="a probe device pings the service at this rate during every migration (0: none)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd)
