"""Running N simulated devices on the testbed's device host: their services, roaming plans and
starting gateways, their bus connections (one each), and the fleet run itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogmig.device_sim.device import DeviceConfig, RequestSettings
from fogmig.device_sim.fleet import DeviceFleet, EventHandler
from fogmig.device_sim.roaming import Cycle, RandomWalk, Roaming, Static, parse_schedule
from fogmig.device_sim.summary import FleetSummary
from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError

DEFAULT_SERVICE_PREFIX = "s"
DEFAULT_PORT_BASE = 5700
DEFAULT_DEVICE_PREFIX = "d"
PRESENCE_WAIT_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    """What ``fogmig device-sim`` runs: how many devices, how they roam, how they measure."""

    devices: int
    out: Path
    """Where the timeline, the events and the summary go."""
    duration_s: float = 60.0
    """Seconds to run (0: until stopped)."""
    interval_s: float = 1.0
    timeout_s: float = 2.0
    ack_timeout_s: float = 0.4
    roam: str = "none"
    """``none``, ``schedule`` or ``random`` (see :func:`roaming_plan`)."""
    dwell_s: float = 30.0
    schedule: str | None = None
    gateway: str | None = None
    """Start every device here (default: where its service runs, else round robin)."""
    services: tuple[str, ...] = ()
    """``NAME:PORT`` of the first devices' services; the rest follow the prefix and base."""
    service_prefix: str = DEFAULT_SERVICE_PREFIX
    port_base: int = DEFAULT_PORT_BASE
    device_prefix: str = DEFAULT_DEVICE_PREFIX
    check_every_s: float = 30.0
    seed: int = 0
    bus: bool = True
    """Announce each attachment on the bus (each device with its own certificate)."""


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


async def service_locations(bus: Any, services: set[str]) -> dict[str, str]:
    """Where each of ``services`` runs now, from the agents' retained presence messages."""
    from fogmig.platform.bus.schemas import ServicePresence
    from fogmig.platform.bus.topics import topics

    # Per topic the latest presence (a node's withdrawal, present=false, ends its claim); of a
    # service's claims the highest (seq, node) wins, as on the gateways.
    latest: dict[tuple[str, str], ServicePresence] = {}

    def winners() -> dict[str, str]:
        best: dict[str, ServicePresence] = {}
        for p in latest.values():
            held = best.get(p.service)
            if p.present and (held is None or (p.seq, p.node) > (held.seq, held.node)):
                best[p.service] = p
        return {service: p.node for service, p in best.items()}

    async with bus.subscribe(topics.service()) as sub:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PRESENCE_WAIT_S):
                async for _, msg in sub:
                    if isinstance(msg, ServicePresence) and msg.service in services:
                        key = (msg.service, msg.node)
                        held = latest.get(key)
                        if held is None or msg.seq >= held.seq:
                            latest[key] = msg
                        if set(winners()) == services:
                            break
    return winners()


async def run_device_sim(
    options: SimOptions, *, on_event: EventHandler | None = None
) -> FleetSummary:
    """Run the fleet on the testbed's device host until its duration ends or SIGINT/SIGTERM.

    Call it inside the device host's network namespace; ``on_event`` sees every fleet event.
    """
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    gateways = {n.name: n.data_ip for n in state.nodes}
    names = list(gateways)
    services = device_services(
        options.devices,
        explicit=options.services,
        prefix=options.service_prefix,
        port_base=options.port_base,
    )
    settings = RequestSettings(
        interval_s=options.interval_s,
        timeout_s=options.timeout_s,
        ack_timeout_s=options.ack_timeout_s,
        check_every_s=options.check_every_s or None,
    )
    out = options.out
    device_names = [f"{options.device_prefix}{i}" for i in range(len(services))]
    async with contextlib.AsyncExitStack() as stack:
        buses = None
        if options.bus:
            from fogmig.platform.testbed.devices import device_buses

            bound = {
                name: service for name, (service, _) in zip(device_names, services, strict=True)
            }
            buses = await stack.enter_async_context(device_buses(bound, state))
        located: dict[str, str] = {}
        if buses and options.gateway is None:
            located = await service_locations(next(iter(buses.values())), {s for s, _ in services})
        devices = []
        for i, (service, port) in enumerate(services):
            start = options.gateway or located.get(service) or names[i % len(names)]
            plan = roaming_plan(
                options.roam,
                gateways=names,
                dwell_s=options.dwell_s,
                schedule=options.schedule,
                seed=options.seed + i,
            )
            devices.append(
                DeviceConfig(
                    name=device_names[i],
                    service=service,
                    port=port,
                    gateway=start,
                    roaming=plan,
                )
            )
        fleet = DeviceFleet(
            devices=devices,
            gateways=gateways,
            buses=buses,
            out=out,
            settings=settings,
            on_event=on_event,
            seed=options.seed,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)
        try:
            return await fleet.run(options.duration_s or None)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
