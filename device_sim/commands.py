"""``fogmig device-sim``: N simulated devices on the testbed's device host, measured.

The command re-enters the device host's network namespace by itself, announces each device's
attachment as the device host's bus user, and ends with a summary on the terminal and, with
the timeline, in the output directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fogmig.device_sim.device import DeviceConfig, RequestSettings
from fogmig.device_sim.events import ContinuityCheck, FleetEvent, MigrationSeen, Outage, Roam
from fogmig.device_sim.roaming import Cycle, RandomWalk, Roaming, Static, parse_schedule
from fogmig.device_sim.summary import FleetSummary, format_summary
from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.proc import NETNS_DIR

console = Console()
err_console = Console(stderr=True)

DEFAULT_SERVICE_PREFIX = "s"
DEFAULT_PORT_BASE = 5700
DEFAULT_DEVICE_PREFIX = "d"
PRESENCE_WAIT_S = 1.0


def parse_service(text: str) -> tuple[str, int]:
    """``"s0:5700"`` -> ("s0", 5700)."""
    name, sep, port = text.rpartition(":")
    if not sep or not name or not port.isdigit():
        raise ConfigError(f"bad --service {text!r}", hint="write SERVICE:PORT, e.g. s0:5700")
    return name, int(port)


def device_services(
    n: int, *, explicit: Sequence[str] = (), prefix: str, port_base: int
) -> list[tuple[str, int]]:
    """The (service, port) of each of ``n`` devices: the i-th ``--service``, else
    ``<prefix><i>`` on ``port_base + i``."""
    if len(explicit) > n:
        raise ConfigError(f"{len(explicit)} --service options for {n} device(s)")
    given = [parse_service(s) for s in explicit]
    return given + [(f"{prefix}{i}", port_base + i) for i in range(len(given), n)]


def roaming_plan(
    kind: str,
    *,
    gateways: Sequence[str],
    dwell_s: float,
    schedule: str | None,
    seed: int,
) -> Roaming:
    if kind == "none":
        return Static()
    if kind == "schedule":
        return parse_schedule(schedule) if schedule else Cycle(tuple(gateways), dwell_s)
    if kind == "random":
        return RandomWalk(tuple(gateways), dwell_s, seed)
    raise ConfigError(f"unknown roaming kind {kind!r}")


def default_out_dir() -> Path:
    return paths.state_dir() / "device-sim" / time.strftime("%Y%m%d-%H%M%S")


def _in_netns(netns: str) -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return False


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
                f"{event.device} saw {event.service} down {event.downtime_s:.3f} s "
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
                f"({event.technique}): {event.outcome}, downtime {event.downtime_s:.3f} s"
            )
    return None


@contextlib.asynccontextmanager
async def _device_bus(state: Any) -> AsyncIterator[Any]:
    from fogmig.platform.bus.client import Bus
    from fogmig.platform.testbed.credentials import load_credentials

    creds = load_credentials()
    user = state.device_host.name
    async with Bus(
        host=state.broker.ip,
        port=state.broker.port,
        username=user,
        password=creds.password(user),
        client_id=f"device-sim-{uuid.uuid4().hex[:8]}",
        known_nodes=state.node_names,
    ) as bus:
        yield bus


async def service_locations(bus: Any, services: set[str]) -> dict[str, str]:
    """Where each of ``services`` runs now, from the agents' retained presence messages."""
    from fogmig.platform.bus.schemas import ServicePresence, topics

    found: dict[str, str] = {}
    async with bus.subscribe(topics.service()) as sub:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PRESENCE_WAIT_S):
                async for _, msg in sub:
                    if isinstance(msg, ServicePresence) and msg.service in services:
                        if msg.present:
                            found[msg.service] = msg.node
                        if set(found) == services:
                            break
    return found


async def run_device_sim(args: argparse.Namespace) -> FleetSummary:
    from fogmig.device_sim.fleet import DeviceFleet
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    gateways = {n.name: n.data_ip for n in state.nodes}
    names = list(gateways)
    services = device_services(
        args.devices, explicit=args.service, prefix=args.service_prefix, port_base=args.port_base
    )
    settings = RequestSettings(
        interval_s=args.interval,
        timeout_s=args.timeout,
        ack_timeout_s=args.ack_timeout,
        check_every_s=args.check_every or None,
    )
    out = Path(args.out)
    async with contextlib.AsyncExitStack() as stack:
        bus = None if args.no_bus else await stack.enter_async_context(_device_bus(state))
        located: dict[str, str] = {}
        if bus is not None and args.gateway is None:
            located = await service_locations(bus, {s for s, _ in services})
        devices = []
        for i, (service, port) in enumerate(services):
            start = args.gateway or located.get(service) or names[i % len(names)]
            plan = roaming_plan(
                args.roam,
                gateways=names,
                dwell_s=args.dwell,
                schedule=args.schedule,
                seed=args.seed + i,
            )
            devices.append(
                DeviceConfig(
                    name=f"{args.device_prefix}{i}",
                    service=service,
                    port=port,
                    gateway=start,
                    roaming=plan,
                )
            )
        show = (lambda _e: None) if args.json else _live_view
        fleet = DeviceFleet(
            devices=devices,
            gateways=gateways,
            bus=bus,
            out=out,
            settings=settings,
            on_event=show,
            seed=args.seed,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)
        try:
            return await fleet.run(args.duration or None)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _live_view(event: FleetEvent) -> None:
    line = _describe(event)
    if line is not None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}", highlight=False)


def _cmd_device_sim(args: argparse.Namespace) -> int:
    from fogmig.platform.base.aio import run_async
    from fogmig.platform.testbed.state import load_state

    if args.devices < 1:
        raise ConfigError("--devices must be at least 1")
    if args.out is None:
        args.out = str(default_out_dir())
    netns = load_state().device_host.netns
    if not _in_netns(netns):
        argv = reexec_argv(netns, args)
        os.execvp(argv[0], argv)
    summary = run_async(lambda: run_device_sim(args))
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
