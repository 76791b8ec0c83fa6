"""What a ``fogmig demo`` run will do: its options, and each device's plan (its service, its
first gateway, when it roams where), computed without touching the machine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fogmig.device_sim.probe import MAX_RATE_HZ
from fogmig.device_sim.roaming import Hop, Schedule
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.controller.config import OBJECTIVES, ObjectiveName

MIN_DURATION_S = 15.0
MIN_ROAM_SPACING_S = 2.0
"""Roams of different devices at least this far apart: a migration needs its turn on a node."""
MAX_ROAMS = 2

RoamKind = Literal["schedule", "random"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """One demo run; every field but ``out`` has the documented default."""

    out: Path
    duration_s: float = 60.0
    devices: int = 3
    nodes: int = 3
    profile: str = "orchestration"
    state_mb: int = 8
    dirty_kbps: float = 10.0
    interval_s: float = 1.0
    debounce_s: float = 1.5
    objective: ObjectiveName = "downtime"
    roam: RoamKind = "schedule"
    roams: int | None = None
    """Roams per device; None: as many as fit the duration (one or two)."""
    seed: int = 0
    port_base: int = 5700
    check_every_s: float = 10.0
    probe_hz: float = 20.0
    """Pings a second of each service's probe device; 0: no probes."""
    settle_timeout_s: float = 60.0
    """After the duration: how long to wait for migrations under way to finish."""

    def __post_init__(self) -> None:
        if self.duration_s < MIN_DURATION_S:
            raise ConfigError(
                f"--duration must be at least {MIN_DURATION_S:g} s (devices need time to roam "
                f"and their services to follow), got {self.duration_s:g}"
            )
        if self.devices < 1:
            raise ConfigError("--devices must be at least 1")
        if self.nodes < 2:
            raise ConfigError("--nodes must be at least 2: a device needs somewhere to roam")
        if self.state_mb < 0 or self.dirty_kbps < 0:
            raise ConfigError("--state-mb and --dirty-kbps must not be negative")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}")
        if self.roams is not None and not 1 <= self.roams <= 10:
            raise ConfigError("--roams must be between 1 and 10")
        if not 0 < self.port_base <= 65535 - self.devices:
            raise ConfigError(f"invalid port base {self.port_base}")
        if not 0 <= self.probe_hz <= MAX_RATE_HZ:
            raise ConfigError(f"--probe-hz must be between 0 and {MAX_RATE_HZ:g}")
        if self.interval_s <= 0 or self.settle_timeout_s < 0:
            raise ConfigError("the interval must be positive and the settle timeout not negative")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        return out


# --- the devices and their plans --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """Device ``name`` uses ``service`` on ``port``; it starts on ``start`` and roams."""

    name: str
    service: str
    port: int
    start: str
    roaming: Schedule


def roam_window(duration_s: float) -> tuple[float, float]:
    """When devices roam: after a short lead (baselines) and before a tail long enough for the
    last migration and the final continuity checks."""
    lead = min(5.0, 0.15 * duration_s)
    tail = max(8.0, 0.25 * duration_s)
    return lead, duration_s - tail


def plan_devices(
    devices: int,
    gateways: Sequence[str],
    duration_s: float,
    *,
    roams: int | None = None,
    kind: RoamKind = "schedule",
    seed: int = 0,
    port_base: int = 5700,
) -> list[DevicePlan]:
    """Device ``d<i>`` uses service ``s<i>`` on port ``port_base + i`` and starts on gateway
    ``i mod N``; every device roams ``roams`` times within the roam window.

    ``schedule`` staggers the roams evenly over the window (devices take turns, each moves to
    the next gateway in order); ``random`` draws the times in the window and the gateways from
    a seeded generator (the same seed gives the same walk).
    """
    if len(gateways) < 2:
        raise ConfigError("devices need at least two gateways to roam between")
    start, end = roam_window(duration_s)
    window = end - start
    if window <= 0:
        raise ConfigError(f"a {duration_s:g} s run leaves no time to roam")
    if roams is None:
        roams = int(max(1, min(MAX_ROAMS, window // (devices * MIN_ROAM_SPACING_S))))
    slots = roams * devices
    rng = random.Random(seed)
    plans = []
    for i in range(devices):
        first = gateways[i % len(gateways)]
        hops: list[Hop] = []
        current = first
        if kind == "schedule":
            for k in range(roams):
                at = start + (k * devices + i) * window / slots
                current = gateways[(gateways.index(current) + 1) % len(gateways)]
                hops.append(Hop(round(at, 3), current))
        else:
            times = sorted(rng.uniform(start, end) for _ in range(roams))
            for at in times:
                current = rng.choice([g for g in gateways if g != current])
                hops.append(Hop(round(at, 3), current))
        plans.append(
            DevicePlan(
                name=f"d{i}",
                service=f"s{i}",
                port=port_base + i,
                start=first,
                roaming=Schedule(tuple(hops)),
            )
        )
    return plans


def default_out_dir() -> Path:
    return Path("results") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"


# --- the run ----------------------------------------------------------------------------------
