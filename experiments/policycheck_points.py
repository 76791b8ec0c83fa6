"""The points of the policy check: link rate, RTT, state size and dirty rate, each a role.

The paper's four configurations keep their links and dirty rates with a smaller state; the other
points lie between and beyond them (a faster and a slower link, a longer RTT, a dirty rate close
to and above the link rate). Each point is either fitted on or held out for validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.testbed.profiles import LinkProfile
from fogmig.policies.conditions import LinkConditions

KB = 1024
"""The sensor service's kilobyte (``--dirty-kbps``)."""


class Role(StrEnum):
    """What a point's measurements are for."""

    FIT = "fit"
    """The cost model's constants are fitted on it."""
    VALIDATE = "validate"
    """Held out: the fitted model and the policy are judged on it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    """One set of conditions the techniques are measured under."""

    name: str
    state_mb: int
    """MiB of data the sensor service holds (its checkpoint adds the runtime's own memory)."""
    rate_mbit: float
    rtt_ms: float
    dirty_kbps: float
    """KB/s (1024 bytes) the service dirties."""
    role: Role
    note: str
    """Where the point lies against the paper's configurations."""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"point name {self.name!r} must be a plain identifier")
        if self.state_mb <= 0 or self.rate_mbit <= 0 or self.rtt_ms < 0 or self.dirty_kbps < 0:
            raise ConfigError(f"point {self.name}: sizes and rates out of range")

    @property
    def link(self) -> LinkConditions:
        return LinkConditions.from_mbit(self.rate_mbit, self.rtt_ms)

    @property
    def dirty_rate_bytes_per_s(self) -> float:
        return self.dirty_kbps * KB

    @property
    def dirty_to_link(self) -> float:
        """D/B: the dirty rate as a share of the link rate (1: dirtying as fast as the link)."""
        return self.dirty_rate_bytes_per_s / self.link.throughput_bytes_per_s

    def profile(self) -> LinkProfile:
        """A testbed link profile of this point's rate and RTT."""
        return LinkProfile(name=f"point-{self.name}", rate_mbit=self.rate_mbit, rtt_ms=self.rtt_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state_mb": self.state_mb,
            "rate_mbit": self.rate_mbit,
            "rtt_ms": self.rtt_ms,
            "dirty_kbps": self.dirty_kbps,
            "role": self.role.value,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        return cls(
            name=str(data["name"]),
            state_mb=int(data["state_mb"]),
            rate_mbit=float(data["rate_mbit"]),
            rtt_ms=float(data["rtt_ms"]),
            dirty_kbps=float(data["dirty_kbps"]),
            role=Role(data["role"]),
            note=str(data["note"]),
        )


MOBILITY = (11.34, 122.95)
ORCHESTRATION = (72.41, 6.94)
"""The paper's two links (Table 2): Mbit/s and ms."""


def _p(  # noqa: PLR0917 - one row of the grid table below
    name: str, mb: int, link: tuple[float, float], kbps: float, role: Role, note: str
) -> Point:
    return Point(
        name=name,
        state_mb=mb,
        rate_mbit=link[0],
        rtt_ms=link[1],
        dirty_kbps=kbps,
        role=role,
        note=note,
    )


F, V = Role.FIT, Role.VALIDATE

# Fitted on: three state sizes, RTTs from 1 to 40 ms, rates from 30 to 100 Mbit/s, so that
# every constant's column varies. Held out: the paper's slow link (an RTT beyond any fitted),
# a dirty rate close to the link rate, and the paper's fast link.
QUICK_POINTS: tuple[Point, ...] = (
    _p("C", 8, ORCHESTRATION, 10, F, "paper C: management link, low dirty rate"),
    _p("E", 16, (30.0, 40.0), 100, F, "between the links, dirty rate between"),
    _p("G", 32, (100.0, 1.0), 2000, F, "beyond: faster link, larger state, higher dirty rate"),
    _p("B", 8, MOBILITY, 500, V, "paper B: mobility link, high dirty rate"),
    _p("D", 8, ORCHESTRATION, 500, V, "paper D: management link, high dirty rate"),
    _p("F", 8, (16.0, 20.0), 1800, V, "dirty rate close to the link rate (D/B 0.92)"),
)
"""About ten minutes of testbed time at one run per technique."""

FULL_POINTS: tuple[Point, ...] = (
    *QUICK_POINTS,
    _p("A", 8, MOBILITY, 10, V, "paper A: mobility link, low dirty rate"),
    _p("H", 16, (6.0, 60.0), 10, F, "beyond: slower link, prolonged pre-copy (S/B > 30 s)"),
    _p("I", 8, (20.0, 250.0), 50, V, "beyond: RTT twice the mobility link's"),
    _p("J", 8, (10.0, 20.0), 1400, F, "beyond: dirty rate above the link rate (D/B 1.15)"),
    _p("K", 32, (50.0, 15.0), 500, V, "between: large state on a mid-rate link"),
    _p("L", 16, ORCHESTRATION, 2000, V, "beyond: management link, dirty rate 4x paper D"),
)


def grid(*, quick: bool) -> tuple[Point, ...]:
    """The points to measure: the quick subset, or every point."""
    return QUICK_POINTS if quick else FULL_POINTS


def select(points: Sequence[Point], names: Sequence[str] | None) -> tuple[Point, ...]:
    """The points named (all when ``names`` is empty), in grid order; an unknown name is an
    error."""
    if not names:
        return tuple(points)
    known = {p.name for p in points}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"no point {', '.join(unknown)} in this grid", hint=f"points: {', '.join(known)}"
        )
    return tuple(p for p in points if p.name in names)


def split(points: Sequence[Point]) -> tuple[tuple[Point, ...], tuple[Point, ...]]:
    """(fitted on, held out). A grid needs both: without held-out points nothing is validated,
    without fitted ones the constants stay the defaults and that is not a calibration."""
    fit = tuple(p for p in points if p.role is Role.FIT)
    held = tuple(p for p in points if p.role is Role.VALIDATE)
    if not fit or not held:
        raise ConfigError(
            f"the points need at least one of each role (fit: {len(fit)}, validate: {len(held)})"
        )
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"point names repeat: {', '.join(names)}")
    return fit, held
