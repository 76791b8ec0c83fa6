"""CLI of the soak: ``fogmig soak --migrations N --devices D [--json]``.

It takes the testbed's lease, shows the migrations as they end (rich), prints the summary and
the processes' samples (or the JSON summary with ``--json``, the progress then on stderr) and
exits 1 when a reading was lost or doubled, a ledger did not match, a migration failed, or a
process kept growing after its warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fogmig.platform.base.aio import run_async
from fogmig.platform.base.fmt import megabytes
from fogmig.platform.testbed.lease import hold_testbed_lease


def _usage(u: Any) -> str:
    if u is None:
        return "-"
    return f"pid {u.pid}: {megabytes(u.rss_bytes, missing='?')}, {u.open_fds} fds"


def _table(summary: Any) -> Table:
    t = Table(title="soak", show_header=False)
    m, r, c = summary.migrations, summary.requests, summary.continuity
    t.add_row(
        "migrations",
        f"{m.asked} asked, {m.completed} completed, {m.rolled_back} rolled back, "
        f"{m.failed} failed ({m.learned} learned from status)",
    )
    t.add_row("techniques", ", ".join(f"{k} {v}" for k, v in sorted(m.by_technique.items())))
    t.add_row(
        "requests",
        f"{r.sent} sent, {r.acknowledged} acknowledged, {r.lost} lost, {r.doubled} doubled",
    )
    t.add_row(
        "ledgers",
        f"{c.checks} checks: {c.passed} matched, {c.mismatched} mismatched, "
        f"{c.unverified} unverified",
    )
    t.add_row("restarts", ", ".join(f"{k} {v}" for k, v in summary.restarts.items()))
    for name, p in summary.processes.items():
        t.add_row(name, f"{_usage(p.start)} -> {_usage(p.end)}")
    for name, v in summary.memory.items():
        colour = {"flat": "green", "growing": "red"}.get(v.verdict, "yellow")
        t.add_row(f"{name} memory", f"[{colour}]{v.verdict}[/]: {escape(v.detail)}")
    t.add_row("verdict", "[green]ok[/]" if summary.ok else "[red]" + "; ".join(summary.problems))
    return t


def _samples_table(summary: Any) -> Table:
    """One row per sampling (migrations ended), one column per process; a restart marked."""
    names = sorted(summary.samples)
    t = Table(title=f"processes (every {summary.sample_every} migrations)")
    t.add_column("after", justify="right")
    for name in names:
        t.add_column(name, justify="right")
    rows: dict[tuple[int, int], dict[str, str]] = {}
    for name in names:
        seen: dict[int, int] = {}
        for s in summary.samples[name]:
            # The end's sample may repeat the last migration index: keep both, in order.
            n = seen[s.migration] = seen.get(s.migration, -1) + 1
            cell = f"{megabytes(s.rss_bytes, missing='?')}, {_count(s.open_fds)} fds"
            if s.restarted:
                cell = f"[yellow]restarted, pid {s.pid}[/] {cell}"
            rows.setdefault((s.migration, n), {})[name] = cell
    for (migration, _n), cells in sorted(rows.items()):
        t.add_row(str(migration), *(cells.get(name, "-") for name in names))
    return t


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


async def _run(soak: Any) -> Any:
    """The run, with SIGINT and SIGTERM ending it early (still summarised and cleaned up)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, soak.interrupt)
    try:
        return await soak.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _cmd_soak(args: argparse.Namespace) -> int:
    from fogmig.platform.apps.soak.plan import SoakOptions, default_out_dir
    from fogmig.platform.apps.soak.run import Soak, write_summary

    options = SoakOptions(
        out=Path(args.out) if args.out else default_out_dir(),
        migrations=args.migrations,
        devices=args.devices,
        services=args.services,
        nodes=args.nodes,
        profile=args.profile,
        state_mb=args.state_mb,
        broker_restarts=args.broker_restarts,
        agent_restarts=args.agent_restarts,
        seed=args.seed,
        sample_every=args.sample_every,
    )
    console = Console(stderr=args.json)
    progress = Progress(
        TextColumn("[bold]soak"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("migrations", total=options.migrations)

    def step(done: int, line: str) -> None:
        progress.console.print(line, highlight=False)
        progress.update(task, completed=done)

    soak = Soak(
        options, say=lambda line: progress.console.print(line, highlight=False), on_step=step
    )
    with (
        hold_testbed_lease(
            args.lease_timeout,
            take=not args.no_lease,
            on_wait=lambda line: console.print(line, highlight=False),
        ),
        progress,
    ):
        summary = run_async(lambda: _run(soak))
    write_summary(options.out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
    else:
        if summary.samples:
            console.print(_samples_table(summary))
        console.print(_table(summary))
        console.print(f"raw files in {options.out}", highlight=False)
    return 0 if summary.ok else 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "soak",
        help="many migrations under device traffic and restarts, checked for lost readings",
    )
    p.add_argument("--migrations", type=int, default=20, metavar="N", help="default 20")
    p.add_argument("--devices", type=int, default=3, metavar="D", help="default 3")
    p.add_argument(
        "--services", type=int, default=None, metavar="S", help="default: one per two devices"
    )
    p.add_argument("--nodes", type=int, default=2, metavar="N", help="gateways, default 2")
    p.add_argument("--profile", default="orchestration", help="link profile (name or .toml file)")
    p.add_argument("--state-mb", type=int, default=2, metavar="M", help="per service, default 2")
    p.add_argument("--broker-restarts", type=int, default=1, metavar="K", help="default 1")
    p.add_argument("--agent-restarts", type=int, default=1, metavar="K", help="default 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample-every",
        type=int,
        default=None,
        metavar="K",
        help="sample the processes' memory every K migrations (default: about 20 samples)",
    )
    p.add_argument("--out", metavar="DIR", help="results directory (default results/soak-<time>)")
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    p.add_argument("--lease-timeout", type=float, default=900.0, metavar="S")
    p.add_argument(
        "--no-lease",
        action="store_true",
        help="do not take the testbed's lease (the caller already holds it)",
    )
    p.set_defaults(func=_cmd_soak)
