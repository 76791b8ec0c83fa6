"""``fogmig device-sim``: N simulated devices on the testbed's device host, measured.

The command re-enters the device host's network namespace by itself, has the testbed issue each
device its own certificate (bound to the device's service), announces each device's attachment
on that device's own bus connection, and ends with a summary on the terminal and, with the
timeline, in the output directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fogmig.device_sim.events import ContinuityCheck, FleetEvent, MigrationSeen, Outage, Roam
from fogmig.device_sim.run import (
    DEFAULT_DEVICE_PREFIX,
    DEFAULT_PORT_BASE,
    DEFAULT_SERVICE_PREFIX,
    SimOptions,
    default_out_dir,
    run_device_sim,
)
from fogmig.device_sim.summary import format_summary
from fogmig.platform.base import fmt
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.netns import running_in_netns
from fogmig.platform.base.proc import NETNS_DIR

console = Console()


def reexec_argv(netns: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs this same ``device-sim`` inside ``netns``."""
    argv = [
        "nsenter",
        f"--net={NETNS_DIR / netns}",
        "--",
        sys.executable,
        # -P: never let the current directory (a checkout with its own `platform/`) shadow stdlib.
        "-P",
        "-m",
        "fogmig.platform.cli.main",
    ]
    argv += ["-v"] * min(getattr(args, "verbose", 0), 2)
    argv += ["device-sim", *option_argv(args)]
    return argv


def option_argv(args: argparse.Namespace) -> list[str]:
    """``args`` of ``device-sim`` back as options (the output directory made absolute)."""
    out = [
        "--devices",
        str(args.devices),
        "--duration",
        f"{args.duration:g}",
        "--interval",
        f"{args.interval:g}",
        "--timeout",
        f"{args.timeout:g}",
        "--ack-timeout",
        f"{args.ack_timeout:g}",
        "--roam",
        args.roam,
        "--dwell",
        f"{args.dwell:g}",
        "--service-prefix",
        args.service_prefix,
        "--port-base",
        str(args.port_base),
        "--device-prefix",
        args.device_prefix,
        "--check-every",
        f"{args.check_every:g}",
        "--seed",
        str(args.seed),
        "--out",
        str(Path(args.out).resolve()),
    ]
    for service in args.service:
        out += ["--service", service]
    if args.schedule:
        out += ["--schedule", args.schedule]
    if args.gateway:
        out += ["--gateway", args.gateway]
    if args.json:
        out.append("--json")
    if args.no_bus:
        out.append("--no-bus")
    return out


def _describe(event: FleetEvent) -> str | None:
    match event:
        case Roam(from_gateway=None):
            return f"{event.device} attached to {event.to_gateway}"
        case Roam():
            return f"{event.device} roamed {event.from_gateway} -> {event.to_gateway}"
        case Outage():
            return (
                f"{event.device} saw {event.service} down {fmt.seconds(event.downtime_s)} "
                f"({event.failed} failed request(s), {event.gateway_before} -> "
                f"{event.gateway_after})"
            )
        case ContinuityCheck(verified=False):
            return (
                f"{event.device} could not check {event.service} ({event.reason}): {event.detail}"
            )
        case ContinuityCheck():
            verdict = "ok" if event.matches else f"MISMATCH: {event.detail}"
            return (
                f"{event.device} continuity ({event.reason}): {verdict}, "
                f"{event.service_count} readings"
            )
        case MigrationSeen():
            return (
                f"migration of {event.service} {event.source} -> {event.destination} "
                f"({event.technique}): {event.outcome}, downtime {fmt.seconds(event.downtime_s)}"
            )
    return None


def _live_view(event: FleetEvent) -> None:
    line = _describe(event)
    if line is not None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}", highlight=False)


def _cmd_device_sim(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.state import load_state

    if args.devices < 1:
        raise ConfigError("--devices must be at least 1")
    if args.out is None:
        args.out = str(default_out_dir())
    netns = load_state().device_host.netns
    if not running_in_netns(netns):
        argv = reexec_argv(netns, args)
        os.execvp(argv[0], argv)
    options = SimOptions(
        devices=args.devices,
        out=Path(args.out),
        duration_s=args.duration,
        interval_s=args.interval,
        timeout_s=args.timeout,
        ack_timeout_s=args.ack_timeout,
        roam=args.roam,
        dwell_s=args.dwell,
        schedule=args.schedule,
        gateway=args.gateway,
        services=tuple(args.service),
        service_prefix=args.service_prefix,
        port_base=args.port_base,
        device_prefix=args.device_prefix,
        check_every_s=args.check_every,
        seed=args.seed,
        bus=not args.no_bus,
    )
    show = None if args.json else _live_view
    summary = run_async(lambda: run_device_sim(options, on_event=show))
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        console.print(format_summary(summary), highlight=False)
        console.print(f"timeline and summary in {args.out}", highlight=False)
    return 0 if summary.healthy else 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "device-sim",
        help="simulated IoT devices that post to their services and roam between gateways",
        description=(
            "Run N devices on the testbed's device host. Device i posts one reading per "
            "interval to service <prefix>i on port <base>+i at its current gateway, roams, "
            "announces each attachment on the bus and verifies the service's state. Exits 1 "
            "when a continuity check failed (or none could run)."
        ),
    )
    p.add_argument("--devices", type=int, default=1, metavar="N")
    p.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds to run (0: until ^C)"
    )
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="between readings")
    p.add_argument(
        "--timeout", type=float, default=2.0, metavar="S", help="per request, then resend"
    )
    p.add_argument(
        "--ack-timeout", type=float, default=0.4, metavar="S", help="first CoAP retransmission"
    )
    p.add_argument("--roam", choices=["none", "schedule", "random"], default="none")
    p.add_argument(
        "--dwell", type=float, default=30.0, metavar="S", help="time on a gateway (mean if random)"
    )
    p.add_argument(
        "--schedule",
        metavar="T:GW,...",
        help="with --roam schedule: explicit moves (default: cycle the gateways every --dwell)",
    )
    p.add_argument(
        "--gateway",
        metavar="NODE",
        help="start every device here (default: where its service runs, else round robin)",
    )
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME:PORT",
        help="service of device i (repeat, in device order); the rest follow the defaults",
    )
    p.add_argument("--service-prefix", default=DEFAULT_SERVICE_PREFIX)
    p.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE)
    p.add_argument("--device-prefix", default=DEFAULT_DEVICE_PREFIX)
    p.add_argument(
        "--check-every",
        type=float,
        default=30.0,
        metavar="S",
        help="verify the state at least this often (0: only after disruptions and at the end)",
    )
    p.add_argument("--seed", type=int, default=0, help="of the random walks and the readings")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: a new one under the state directory)",
    )
    p.add_argument("--no-bus", action="store_true", help="publish no attachments")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.set_defaults(func=_cmd_device_sim)
