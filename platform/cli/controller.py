"""CLI of the controller: ``fogmig controller`` (the daemon), ``fogmig drain NODE`` and
``fogmig controller-bench``.

``controller`` runs in the root namespace against the testbed's broker with the ``controller``
certificate and shows its decisions live; ``drain`` asks a node to drain and waits until the
controller has moved every service off it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fogmig.platform.base import paths
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.controller.actions import ControllerEvent, EventKind
from fogmig.platform.controller.config import (
    OBJECTIVES,
    config_for_testbed,
    load_cost_constants,
)
from fogmig.platform.controller.drain import drain_node
from fogmig.platform.controller.runner import run_controller

console = Console()

_STYLES = {
    EventKind.DECISION: "bold cyan",
    EventKind.DONE: "green",
    EventKind.NODE_EMPTY: "bold green",
    EventKind.REJECTED: "yellow",
    EventKind.SEND_FAILED: "yellow",
    EventKind.GAVE_UP: "red",
    EventKind.LOST: "red",
    EventKind.HOLD: "dim",
    EventKind.RESUMED: "bold",
    EventKind.STATE_REJECTED: "red",
}


def default_decision_log() -> Path:
    return paths.state_dir() / "controller" / "decisions.jsonl"


class LiveView:
    """Prints controller events as lines; migration progress only when the phase changes."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self._phase: dict[str, str] = {}

    def __call__(self, event: ControllerEvent) -> None:
        if event.kind is EventKind.PROGRESS:
            phase = str(event.data.get("phase"))
            key = f"{event.service}:{event.data.get('command_id')}"
            if self._phase.get(key) == phase:
                return
            self._phase[key] = phase
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        style = _STYLES.get(event.kind, "")
        kind = f"[{style}]{event.kind.value:>13}[/]" if style else f"{event.kind.value:>13}"
        self.out.print(f"[dim]{stamp}[/] {kind} {escape(event.message)}", highlight=False)


def _cmd_controller(args: argparse.Namespace) -> int:
    threshold = args.load_threshold
    constants = load_cost_constants(args.constants) if args.constants is not None else None
    target = args.load_target if args.load_target is not None else round(threshold * 0.75, 3)
    config = config_for_testbed(
        debounce_s=args.debounce,
        load_threshold=threshold,
        load_target=target,
        load_reports=args.load_reports,
        objective=args.objective,
        decision_log=args.decision_log or default_decision_log(),
        cost_constants=constants,
        state_file=None if args.no_state else (args.state_file or paths.controller_state_file()),
    )
    console.print(
        f"controller: debounce {config.debounce_s:g} s, load > {config.load_threshold:g} for "
        f"{config.load_reports} reports, objective {config.objective}, assumed link "
        f"{config.default_link.throughput_mbit_per_s:g} Mbit/s / "
        f"{config.default_link.rtt_s * 1000:g} ms; decisions in {config.decision_log}; "
        f"cost constants {'from ' + str(args.constants) if args.constants else 'the defaults'}; "
        f"state {config.state_file or 'not kept'}"
    )
    run_async(lambda: run_controller(config, on_event=LiveView(console)))
    return 0


# --- drain --------------------------------------------------------------------------------


def _cmd_drain(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    if args.node not in state.node_names:
        raise ConfigError(
            f"no node {args.node!r} on the testbed; nodes: {', '.join(state.node_names)}"
        )

    async def go() -> float:
        async with open_testbed_bus("operator") as bus:
            return await drain_node(bus, args.node, timeout=args.timeout, on_update=console.print)

    took = run_async(go)
    console.print(f"[bold green]{args.node} is empty and ready to power down[/] ({took:.1f} s)")
    return 0


# --- benchmark ----------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from fogmig.platform.apps.bench.controller import BenchOptions, format_report, run_bench

    rates = [0 if p.strip() == "max" else int(p) for p in args.rates.split(",")]
    options = BenchOptions(
        devices=args.devices,
        nodes=args.nodes,
        samples=args.samples,
        load_rate=args.load_rate,
        rates=tuple(rates),
        phase_s=args.phase_s,
        debounce_s=args.debounce,
    )
    report = run_async(lambda: run_bench(options, on_progress=console.print))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("controller", help="run the controller (mobility, load, drain)")
    p.add_argument("--debounce", type=float, default=1.5, metavar="S", help="default 1.5 s")
    p.add_argument("--load-threshold", type=float, default=0.8, metavar="X")
    p.add_argument("--load-target", type=float, default=None, metavar="X")
    p.add_argument("--load-reports", type=int, default=3, metavar="K")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="downtime")
    p.add_argument("--decision-log", type=Path, default=None, metavar="FILE")
    p.add_argument(
        "--constants",
        type=Path,
        default=None,
        metavar="FILE",
        help="the cost model's constants, as `fogmig calibrate` writes them (default: built-in)",
    )
    p.add_argument(
        "--state-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="what outlives a restart: attachments, drains, queued and running migrations "
        "(default: <state dir>/controller/state.json)",
    )
    p.add_argument(
        "--no-state", action="store_true", help="keep nothing across a restart (start empty)"
    )
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("drain", help="empty a node (the controller moves its services off)")
    p.add_argument("node")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S")
    p.set_defaults(func=_cmd_drain)

    p = sub.add_parser(
        "controller-bench", help="controller reaction time and attach rate on a local broker"
    )
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--samples", type=int, default=100, help="reaction-time samples per run")
    p.add_argument(
        "--load-rate", type=int, default=1000, help="attach/s in the background of the 2nd run"
    )
    p.add_argument("--rates", default="1000,2000,5000,max", help="offered attach/s to try")
    p.add_argument("--phase-s", type=float, default=3.0, help="seconds per offered rate")
    p.add_argument("--debounce", type=float, default=0.0, metavar="S")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=_cmd_bench)
