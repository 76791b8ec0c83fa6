"""``fogmig doctor``: check and explain everything the platform relies on.

Prints one row per check (ok / note / FAIL with the consequence). Exit 0 when the platform can
run, 1 otherwise; ``--json`` prints the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from fogmig.platform.apps.doctor import can_run, run_checks


def _cmd(args: argparse.Namespace) -> int:
    checks = run_checks()
    ok = can_run(checks)
    if args.json:
        doc: dict[str, Any] = {"ok": ok, "checks": [asdict(c) for c in checks]}
        print(json.dumps(doc, indent=2))
        return 0 if ok else 1
    table = Table(title="fogmig doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    style = {"ok": "[green]ok[/]", "note": "[yellow]note[/]", "fail": "[bold red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, style[c.status], c.detail)
    console = Console()
    console.print(table)
    if ok:
        console.print("[green]the platform can run on this machine[/]")
    else:
        failed = ", ".join(c.name for c in checks if c.status == "fail")
        console.print(f"[bold red]the platform cannot run here:[/] {failed}")
    return 0 if ok else 1


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check everything the platform relies on")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_cmd)
