"""``fogmig baseline``: the paper's toolchain (runc, CRIU, rsync over ssh) on the testbed.

Parses the options, runs a series of baseline migrations (see
``fogmig.experiments.baseline_series``) and prints each record; ``--json`` prints them as a
JSON list. Exits 1 when a migration did not complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from fogmig.experiments.baseline import engine_of
from fogmig.experiments.baseline_series import BaselineSeries, run_series
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord

console = Console(stderr=True)

TECHNIQUES = {
    "cold": Technique.COLD,
    "pre-copy": Technique.PRECOPY,
    "post-copy": Technique.POSTCOPY,
    "hybrid": Technique.HYBRID,
}


def technique(text: str) -> Technique:
    """``pre-copy`` as the paper spells it, or fogmig's own ``precopy``."""
    for name, value in TECHNIQUES.items():
        if text in (name, value.value):
            return value
    raise argparse.ArgumentTypeError(f"one of {', '.join(TECHNIQUES)}")


def summary(r: MigrationRecord) -> str:
    line = (
        f"{engine_of(r)} {r.technique} {r.source}->{r.destination}: {r.outcome.value}, "
        f"total {r.total_time_s:.2f} s, downtime {r.downtime_s:.2f} s "
        f"(dump {r.dump_time_s:.2f}, transfer {r.dump_transfer_time_s:.2f}, "
        f"resume {r.resume_time_s:.2f}), sent {r.transferred_bytes / 1e6:.2f} MB"
    )
    if r.error:
        line += f"\n  failed in {r.failed_phase}: {r.error}"
    return line


def _cmd(args: argparse.Namespace) -> int:
    series = BaselineSeries(
        technique=args.technique,
        profile=args.profile,
        state_mb=args.state_mb,
        dirty_kbps=args.dirty_kbps,
        service=args.service,
        repeat=args.repeat,
        out=Path(args.out) if args.out else None,
        ssh_port=args.ssh_port,
    )

    def say(message: str) -> None:
        console.print(message, highlight=False, markup=False)

    records = run_async(lambda: run_series(series, say=say))
    for r in records:
        say(summary(r))
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    return 0 if all(r.outcome is Outcome.COMPLETED for r in records) else 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "baseline",
        help="migrate a service with the paper's toolchain (runc, CRIU, rsync over ssh)",
    )
    p.add_argument("--technique", type=technique, required=True, help="cold, pre-copy, ...")
    p.add_argument("--profile", default="orchestration", help="link profile (e.g. mobility)")
    p.add_argument("--state-mb", type=int, default=75)
    p.add_argument("--dirty-kbps", type=float, default=10.0)
    p.add_argument("--service", default="bench")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", help="save every record here (JSON each, one CSV)")
    p.add_argument("--ssh-port", type=int, default=2222, help="port of the run's own sshd")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd)
