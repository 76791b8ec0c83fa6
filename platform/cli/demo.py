"""CLI of the demo: ``fogmig demo``, the whole platform on the embedded testbed in one command.

It takes the testbed's lease (so test sessions and other runs wait rather than collide), turns
SIGINT and SIGTERM into a clean early end, prints the summary and exits 0 only when every
migration completed and every continuity check held (1 otherwise, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from rich.console import Console

from fogmig.platform.base.aio import run_async
from fogmig.platform.testbed.lease import hold_testbed_lease

console = Console()

INTERRUPTED = 130


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from fogmig.platform.apps.demo.plan import DemoOptions, default_out_dir
    from fogmig.platform.apps.demo.results import DemoSummary
    from fogmig.platform.apps.demo.run import Demo, DemoInterruptedError
    from fogmig.platform.apps.demo.view import summary_renderable

    options = DemoOptions(
        out=Path(args.out) if args.out else default_out_dir(),
        duration_s=args.duration,
        devices=args.devices,
        nodes=args.nodes,
        profile=args.profile,
        state_mb=args.state_mb,
        dirty_kbps=args.dirty_kbps,
        interval_s=args.interval,
        debounce_s=args.debounce,
        objective=args.objective,
        roam=args.roam,
        roams=args.roams,
        seed=args.seed,
        settle_timeout_s=args.settle_timeout,
        probe_hz=args.probe_hz,
    )
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a log or a pipe: room for the tables
    demo = Demo(options, console=console, live=False if args.no_live else None)

    async def main() -> DemoSummary:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, demo.interrupt)
        try:
            return await demo.run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    with hold_testbed_lease(
        args.lease_timeout,
        take=not args.no_lease,
        on_wait=lambda line: console.print(line, highlight=False),
    ):
        try:
            summary = run_async(main)
        except DemoInterruptedError as exc:
            console.print(f"{exc}; everything it started is cleaned up", highlight=False)
            return INTERRUPTED
    console.print(summary_renderable(summary))
    console.print(
        f"report: {options.out / 'report.html'}; raw files in {options.out}", highlight=False
    )
    if summary.interrupted:
        return INTERRUPTED
    return 0 if summary.ok else 1


def register(sub: Any) -> None:
    from fogmig.platform.controller.config import OBJECTIVES

    p = sub.add_parser(
        "demo",
        help="the platform at work: testbed, agents, controller, roaming devices, a report",
        description=(
            "Bring up the testbed, start the agents, deploy one sensor service per device, run "
            "the controller and the devices; the devices roam and the controller migrates their "
            "services. Ends with a summary and an HTML report, and cleans everything up. Exits "
            "0 only when every migration completed and every continuity check held."
        ),
    )
    p.add_argument("--duration", type=float, default=60.0, metavar="S", help="default 60")
    p.add_argument("--devices", type=int, default=3, metavar="N", help="default 3")
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="gateways, default 3")
    p.add_argument("--profile", default="orchestration", help="link profile (name or .toml file)")
    p.add_argument("--state-mb", type=int, default=8, metavar="M", help="per service, default 8")
    p.add_argument(
        "--dirty-kbps", type=float, default=10.0, metavar="K", help="memory dirtied per second"
    )
    p.add_argument("--out", metavar="DIR", help="results directory (default results/demo-<time>)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="between readings")
    p.add_argument("--debounce", type=float, default=1.5, metavar="S", help="controller's")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="downtime")
    p.add_argument(
        "--roam",
        choices=["schedule", "random"],
        default="schedule",
        help="devices take turns (schedule) or roam at random times (random, seeded)",
    )
    p.add_argument("--roams", type=int, default=None, metavar="N", help="per device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe-hz",
        type=float,
        default=20.0,
        metavar="HZ",
        help="pings a second of each service's probe device (0: no probes), default 20",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="after the duration, wait this long at most for migrations to finish",
    )
    p.add_argument("--no-live", action="store_true", help="event lines instead of live tables")
    p.add_argument(
        "--lease-timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="wait this long at most for the testbed's lease",
    )
    p.add_argument(
        "--no-lease",
        action="store_true",
        help="do not take the testbed's lease (the caller already holds it)",
    )
    p.set_defaults(func=_cmd_demo)
