"""What a ``fogmig soak`` run will do: its options and its seeded plan, without the machine.

Services ``k<i>`` (one per two devices, at least one) start on alternate gateways; migration
``n`` moves service ``n mod S`` to another gateway by a technique drawn from the seeded
generator; the broker and agent restarts are drawn among the migrations, each at a random
delay into it (a restart may hit a migration in any phase).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fogmig.device_sim.roaming import RandomWalk
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Technique

MAX_MIGRATIONS = 100_000
MAX_DEVICES = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakOptions:
    """One soak run; every field but ``out`` has the documented default."""

    out: Path
    migrations: int = 20
    devices: int = 3
    services: int | None = None
    """Services the devices share (``None``: one per two devices, at least one)."""
    nodes: int = 2
    profile: str = "orchestration"
    state_mb: int = 2
    """Small, so a migration takes seconds on the orchestration link."""
    dirty_kbps: float = 10.0
    broker_restarts: int = 1
    agent_restarts: int = 1
    seed: int = 0
    interval_s: float = 0.5
    """Between a device's readings."""
    dwell_s: float = 6.0
    """Mean time a device stays on a gateway."""
    pause_s: float = 1.0
    """Between two migrations: the devices' traffic finds the service's new home."""
    migration_timeout_s: float = 180.0
    port_base: int = 5800
    sample_every: int | None = None
    """Migrations between two samples of the processes' memory and descriptors (``None``:
    about 20 samples a run)."""

    def __post_init__(self) -> None:
        if not 1 <= self.migrations <= MAX_MIGRATIONS:
            raise ConfigError(f"--migrations must be between 1 and {MAX_MIGRATIONS}")
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ConfigError(f"--devices must be between 1 and {MAX_DEVICES}")
        if self.services is not None and not 1 <= self.services <= self.devices:
            raise ConfigError("--services must be between 1 and the number of devices")
        if self.nodes < 2:
            raise ConfigError("--nodes must be at least 2: a migration needs somewhere to go")
        if self.broker_restarts < 0 or self.agent_restarts < 0:
            raise ConfigError("restarts must not be negative")
        if self.broker_restarts + self.agent_restarts > self.migrations:
            raise ConfigError("at most one restart per migration: ask for more migrations")
        if self.state_mb < 0 or self.dirty_kbps < 0:
            raise ConfigError("--state-mb and --dirty-kbps must not be negative")
        if self.interval_s <= 0 or self.dwell_s <= 0 or self.pause_s < 0:
            raise ConfigError("the interval and dwell must be positive, the pause not negative")
        if self.sample_every is not None and self.sample_every < 1:
            raise ConfigError("--sample-every must be at least 1")
        if not 0 < self.port_base <= 65535 - self.devices:
            raise ConfigError(f"invalid port base {self.port_base}")

    @property
    def service_count(self) -> int:
        return self.services if self.services is not None else max(1, self.devices // 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        return out


Disruption = Literal["broker", "agent"]


@dataclass(frozen=True, slots=True)
class Step:
    """Migration ``index``: ``service`` to ``destination`` by ``technique``; ``disruption``
    (if any) strikes ``delay_s`` after the command was sent, on ``target`` (an agent's node)."""

    index: int
    service: str
    destination: str
    technique: Technique
    disruption: Disruption | None = None
    target: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ServicePlan:
    name: str
    port: int
    start: str


@dataclass(frozen=True, slots=True)
class DevicePlan:
    name: str
    service: str
    port: int
    start: str
    roaming: RandomWalk


@dataclass(frozen=True, slots=True)
class SoakPlan:
    services: list[ServicePlan]
    devices: list[DevicePlan]
    steps: list[Step]


def plan_soak(
    options: SoakOptions, gateways: Sequence[str], techniques: Sequence[Technique]
) -> SoakPlan:
    """The run's services, devices and migrations; the same seed gives the same plan.

    ``techniques`` are those the nodes can do (post-copy and hybrid need userfaultfd).
    """
    o = options
    if len(gateways) < 2:
        raise ConfigError("a soak needs at least two gateways")
    if not techniques:
        raise ConfigError("no migration technique to draw from")
    rng = random.Random(o.seed)
    services = [
        ServicePlan(name=f"k{i}", port=o.port_base + i, start=gateways[i % len(gateways)])
        for i in range(o.service_count)
    ]
    devices = [
        DevicePlan(
            name=f"d{i}",
            service=services[i % len(services)].name,
            port=services[i % len(services)].port,
            start=gateways[(i + 1) % len(gateways)],
            roaming=RandomWalk(tuple(gateways), o.dwell_s, seed=o.seed * 1000 + i),
        )
        for i in range(o.devices)
    ]
    # Restarts strike during distinct migrations, never the first (the run is warm by then).
    candidates = list(range(1, o.migrations)) or [0]
    count = o.broker_restarts + o.agent_restarts
    struck = rng.sample(candidates, min(count, len(candidates)))
    broker: list[Disruption] = ["broker"]
    agent: list[Disruption] = ["agent"]
    kinds = broker * o.broker_restarts + agent * o.agent_restarts
    disruptions = dict(zip(struck, kinds, strict=False))
    where = {s.name: s.start for s in services}
    steps = []
    for n in range(o.migrations):
        service = services[n % len(services)].name
        source = where[service]
        destination = rng.choice([g for g in gateways if g != source])
        technique = rng.choice(list(techniques))
        kind = disruptions.get(n)
        target = rng.choice([source, destination]) if kind == "agent" else None
        delay = round(rng.uniform(0.0, 3.0), 3) if kind is not None else 0.0
        steps.append(Step(n, service, destination, technique, kind, target, delay))
        where[service] = destination
    return SoakPlan(services=services, devices=devices, steps=steps)


def default_out_dir() -> Path:
    return Path("results") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
