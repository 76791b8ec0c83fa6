"""Where a simulated device is attached over time: a fixed schedule, a cycle or a random walk.

Plans are pure values; :meth:`hops` yields the moves (seconds since the start, gateway) in
time order, lazily, so a random walk needs no end and a test can replay it from its seed.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.nodes import check_node_name


@dataclass(frozen=True, slots=True)
class Hop:
    """At ``at_s`` seconds after the start, the device attaches to ``gateway``."""

    at_s: float
    gateway: str


@dataclass(frozen=True, slots=True)
class Static:
    """The device never moves."""

    def hops(self, start: str) -> Iterator[Hop]:
        return iter(())


@dataclass(frozen=True, slots=True)
class Schedule:
    """An explicit list of moves; a move to the gateway the device is already on is skipped."""

    moves: tuple[Hop, ...]

    def __post_init__(self) -> None:
        times = [h.at_s for h in self.moves]
        if any(t < 0 for t in times) or times != sorted(times):
            raise ConfigError(f"a roaming schedule needs times >= 0 in order, got {times}")
        for hop in self.moves:
            check_node_name(hop.gateway)

    def hops(self, start: str) -> Iterator[Hop]:
        current = start
        for hop in self.moves:
            if hop.gateway != current:
                current = hop.gateway
                yield hop


@dataclass(frozen=True, slots=True)
class Cycle:
    """Every ``dwell_s`` seconds the device moves to the next gateway of ``gateways``."""

    gateways: tuple[str, ...]
    dwell_s: float

    def __post_init__(self) -> None:
        _check_walk(self.gateways, self.dwell_s)

    def hops(self, start: str) -> Iterator[Hop]:
        if len(self.gateways) < 2:
            return
        i = self.gateways.index(start) if start in self.gateways else -1
        for n in itertools.count(1):
            i = (i + 1) % len(self.gateways)
            yield Hop(n * self.dwell_s, self.gateways[i])


@dataclass(frozen=True, slots=True)
class RandomWalk:
    """Exponential dwell times of mean ``dwell_s``; each move goes to another gateway, chosen
    uniformly. The same ``seed`` gives the same walk."""

    gateways: tuple[str, ...]
    dwell_s: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_walk(self.gateways, self.dwell_s)

    def hops(self, start: str) -> Iterator[Hop]:
        rng = random.Random(self.seed)
        current, at = start, 0.0
        while True:
            others = [g for g in self.gateways if g != current]
            if not others:
                return
            at += rng.expovariate(1.0 / self.dwell_s)
            current = rng.choice(others)
            yield Hop(at, current)


Roaming: TypeAlias = Static | Schedule | Cycle | RandomWalk


def _check_walk(gateways: Sequence[str], dwell_s: float) -> None:
    if not gateways:
        raise ConfigError("roaming needs at least one gateway")
    for g in gateways:
        check_node_name(g)
    if len(set(gateways)) != len(gateways):
        raise ConfigError(f"a gateway is listed twice: {', '.join(gateways)}")
    if not dwell_s > 0:
        raise ConfigError(f"the dwell time must be positive, got {dwell_s}")


def parse_schedule(text: str) -> Schedule:
    """``"10:gw2,20:gw1"`` -> move to gw2 after 10 s, back to gw1 after 20 s."""
    moves = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        at, sep, gateway = item.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = math.nan
        if not sep or not math.isfinite(seconds):
            raise ConfigError(
                f"bad schedule entry {item!r}", hint="write SECONDS:GATEWAY[,SECONDS:GATEWAY...]"
            )
        moves.append(Hop(seconds, gateway.strip()))
    if not moves:
        raise ConfigError("an empty roaming schedule", hint="e.g. --schedule 10:gw2,20:gw1")
    return Schedule(tuple(moves))


def hops_until(plan: Roaming, start: str, horizon_s: float) -> list[Hop]:
    """The moves of ``plan`` before ``horizon_s`` (for a preview or a test)."""
    return list(itertools.takewhile(lambda h: h.at_s < horizon_s, plan.hops(start)))
